"""Shared fixtures: where ../shared/data lives, ROS isolation defaults for runs outside `make test`, the shared
synthetic town, photo sets as users give them (a CSV, the Lund folders), and a check of replay reports' pages."""
from __future__ import annotations

import csv
import html
import os
import random
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# `make test` sets these; a bare `pytest` in the venv gets the same isolation.
os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_HOME", str(REPO / ".ros_home"))
os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 101)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (the shared/ folder beside the checkout)")
    return SHARED_DATA


SYNTH_SEED = 11


def synth_config():
    """The configuration of the shared synthetic town (also used to drive bags through it)."""
    from vpr_rerank_ros.datasets.synth_town import SynthConfig
    from vpr_rerank_ros.datasets.town import TownConfig

    return SynthConfig(town=TownConfig(blocks_x=2, blocks_y=2), width=320, height=240, frame_spacing_m=6.0,
                       query_sequences=4, query_frames=8)


@pytest.fixture(scope="session")
def synthetic_map(tmp_path_factory):
    """A small synthetic town (2x2 blocks, 320x240) and a map of its database side with the offline default."""
    from vpr_rerank_ros.datasets import geotagged
    from vpr_rerank_ros.datasets.synth_town import generate
    from vpr_rerank_ros.mapbuild import build_map

    root = tmp_path_factory.mktemp("town")
    generate(root / "msls", cities=1, seed=SYNTH_SEED, config=synth_config())
    report = build_map(root / "map", geotagged.from_msls(root / "msls", ["synth0"]))
    return root, report


@pytest.fixture(scope="session")
def synthetic_map_with_features(synthetic_map):
    """The synthetic town's map again, with the RootSIFT local features of its images attached (geometric
    verification): the same table, descriptors and stored model, so only the features are extracted."""
    from dataclasses import asdict

    from vpr_rerank_ros.feature_store import FEATURES_FILE, FeatureStore, extract_into
    from vpr_rerank_ros.local_features import OpenCVExtractor
    from vpr_rerank_ros.mapdb import FILES, MapBundle

    root, report = synthetic_map
    bundle, extractor = report.bundle, OpenCVExtractor("rootsift")
    features = root / "features.h5"
    with FeatureStore(features, extractor.name, extractor.settings) as store:
        extract_into(store, extractor, list(zip(bundle.table.keys, bundle.table.path)))
    attachments = {name: bundle.root / name for name in bundle.meta.files if name not in FILES}
    descriptor = {k: v for k, v in asdict(bundle.meta.descriptor).items() if k not in ("dim", "dtype")}
    return MapBundle.build(root / "map_with_features", bundle.table, bundle.descriptors, descriptor,
                           dtype=bundle.meta.descriptor.dtype, attachments={**attachments, FEATURES_FILE: features})


def write_photos_csv(query, path: Path, count: int | None = None) -> Path:
    """The first `count` (default all) images of an MSLS side as the CSV of geotagged photos the map builder reads:
    key, path, lat, lon, compass heading."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "path", "lat", "lon", "heading"])
        for i in range(len(query) if count is None else count):
            writer.writerow([query.keys[i], query.image_path(i), query.lat[i], query.lon[i], query.heading[i]])
    return path


def lund_halves(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Folders of links to the even-numbered Lund photos (a map, 14) and the odd-numbered ones (queries, 15)."""
    even, odd = tmp_path / "even", tmp_path / "odd"
    even.mkdir()
    odd.mkdir()
    for path in sorted((shared_data / "lund").glob("*.jpg")):
        (even if int(path.stem) % 2 == 0 else odd).joinpath(path.name).symlink_to(path)
    return even, odd


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_page(folder: Path) -> str:
    """A replay report's page (`report.write_report`), unescaped, after checking that every image it shows is a
    non-empty PNG beside it, and that it loads nothing from elsewhere and runs no script."""
    page = (folder / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources, page
    for source in sources:
        assert re.fullmatch(r"[a-z_]+\.png", source), source
        data = (folder / source).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, source
    assert "<script" not in page and "http" not in page and "href" not in page
    return html.unescape(page)
