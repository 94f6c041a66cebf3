"""Building a map bundle from geotagged images (describe, index, record the model's identity) and
querying it with the model it was built with."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .datasets.geotagged import ImageSet, read_exif_gps
from .descriptors.extract import DescriptorExtractor, DescriptorStore, read_descriptors
from .descriptors.loaders import load_model
from .descriptors.model import GlobalDescriptor, load_native, save_model
from .descriptors.offline import fit_offline_model
from .feature_store import FEATURES_FILE, FeatureStore, extract_into
from .geo import latlon_to_utm
from .hloc import import_local_features, read_global_features
from .local_features import OpenCVExtractor
from .mapdb import IndexConfig, MapBundle

log = logging.getLogger(__name__)
MODEL_FILE = "model.safetensors"
MODEL_CONFIG = "model.json"
DESCRIBING_SUFFIX = ".describing.h5"     # <out> + this: the global descriptors of an unfinished build
FEATURES_SUFFIX = ".features.h5"         # <out> + this: its local features
# The offline default whitens with a PCA fitted on the map's own images, which keeps at most N - 1 dimensions for
# N images: below this many dimensions its descriptors tell places apart poorly, and the build warns.
MIN_OFFLINE_DIM = 32


@dataclass
class BuildReport:
    bundle: MapBundle
    model: GlobalDescriptor | None   # None for a map of precomputed descriptors
    skipped: dict            # key -> reason (no GPS, unreadable image)
    warnings: list = field(default_factory=list)   # what the user should know about the map (one line each)


def refuse_existing(out: str | Path, overwrite: bool) -> None:
    """A FileExistsError naming --overwrite when `out` exists and may not be replaced: the first check of a build,
    before any image is read or model loaded."""
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True, or --overwrite, to replace it)")


def build_map(out: str | Path, images: ImageSet, model: GlobalDescriptor | None = None, device: str | None = None,
              fp16: bool = False, batch_size: int = 8, workers: int = 0, index: IndexConfig = IndexConfig(),
              dtype: str = "float32", overwrite: bool = False, progress: bool = False,
              descriptor_file: str | Path | None = None, global_features: str | Path | None = None,
              local_features: str | None = None, local_features_file: str | Path | None = None) -> BuildReport:
    """Describe the images and write the map. Without `model`, the offline default is fitted on these images and
    stored in the map (it is map-specific; when its fit saw every image, the fit's descriptors are used); with a
    model, only its identity is recorded. Images are described into `<out>.describing.h5` first, so a build that
    is killed resumes with the images it had not described yet (and the map is written from that file in bounded
    memory). With `descriptor_file` (HDF5 keyed by image key, see `read_descriptors`) or `global_features`
    (hloc's global-feats-*.h5, see `hloc`), their rows are used as they are.
    `local_features` (an OpenCV extractor, `local_features.EXTRACTORS`) or `local_features_file` (hloc's
    feats-*.h5) adds every map image's local features to the map as local_features.h5, extracted (resumably, into
    `<out>.features.h5`) after the global descriptors."""
    out = Path(out)
    refuse_existing(out, overwrite)
    if local_features is not None and local_features_file is not None:
        raise ValueError("give a local feature extractor or hloc's local feature file, not both")
    features = (local_features, local_features_file)
    if local_features is not None:
        OpenCVExtractor(local_features)              # an unknown name is refused before any image is described
    if descriptor_file is not None or global_features is not None:
        if model is not None or (descriptor_file is not None and global_features is not None):
            raise ValueError("give one of a descriptor model, a file of precomputed descriptors and hloc's global "
                             "features")
        if descriptor_file is not None:
            rows, identity = read_descriptors(descriptor_file, list(images.table.keys))
            name = f"precomputed ({Path(descriptor_file).name})"
        else:
            rows, identity = read_global_features(global_features, images.items), ""
            name = Path(global_features).stem.removeprefix("global-feats-")
        descriptor = {"kind": "precomputed", "name": name, "identity": identity, "stored_model": False}
        bundle = _write(out, images, images.table.keys.tolist(), rows, descriptor, index, dtype, overwrite, progress,
                        {}, features)
        return BuildReport(bundle=bundle, model=None, skipped=dict(images.skipped))
    attachments, warnings, stored = {}, [], model is None
    with tempfile.TemporaryDirectory() as tmp:
        if stored:
            fit = fit_offline_model(images.items, device=device, batch_size=batch_size, workers=workers,
                                    progress=progress)
            model = fit.model
            save_model(model, Path(tmp) / MODEL_FILE)
            attachments = {MODEL_FILE: Path(tmp) / MODEL_FILE, MODEL_CONFIG: Path(tmp) / MODEL_CONFIG}
            extraction = fit.descriptors_of_all(images.items)
            if extraction is not None:             # the fit described every image: no second pass
                warnings = _offline_warnings(model, len(extraction.keys))
                bundle = _write(out, images, extraction.keys, extraction.descriptors,
                                _descriptor_info(model, stored), index, dtype, overwrite, progress, attachments,
                                features)
                return BuildReport(bundle=bundle, model=model, skipped={**images.skipped, **extraction.failed},
                                   warnings=warnings)
        store_path = out.with_name(out.name + DESCRIBING_SUFFIX)
        out.parent.mkdir(parents=True, exist_ok=True)
        with DescriptorStore(store_path, model.identity, model.output_dim) as store:
            failed = DescriptorExtractor(model, device, batch_size, fp16=fp16, workers=workers).describe_files(
                images.items, progress=progress, store=store).failed
            keys = store.ordered_keys()
            bundle = _write(out, images, keys, store.file["descriptors"], _descriptor_info(model, stored), index,
                            dtype, overwrite, progress, attachments, features)
            warnings = _offline_warnings(model, len(keys)) if stored else []
        store_path.unlink()
    return BuildReport(bundle=bundle, model=model, skipped={**images.skipped, **failed}, warnings=warnings)


def _write(out: Path, images: ImageSet, keys: list[str], descriptors, descriptor: dict, index: IndexConfig,
           dtype: str, overwrite: bool, progress: bool, attachments: dict, features: tuple) -> MapBundle:
    """The map of the described `keys` (rows of `descriptors`, any array-like, in that order) that are still
    among the `images` (a resumed describing file may hold images removed since), with their local features
    when `features` (extractor name, hloc file) names a source."""
    row = {k: i for i, k in enumerate(images.table.keys)}
    kept = [i for i, k in enumerate(keys) if k in row]
    if len(kept) < len(keys):
        keys, descriptors = [keys[i] for i in kept], _Rows(descriptors, kept)
    if not keys:
        raise ValueError("no map image could be described")
    paths = dict(images.items)
    work = _local_features(out, [(k, paths[k]) for k in keys], *features, progress)
    if work is not None:
        attachments = {**attachments, FEATURES_FILE: work}
    bundle = MapBundle.build(out, images.table.take([row[k] for k in keys]), descriptors, descriptor, index=index,
                             dtype=dtype, overwrite=overwrite, progress=progress, attachments=attachments)
    if work is not None:
        work.unlink()
    return bundle


def _local_features(out: Path, items: list[tuple[str, str]], extractor: str | None,
                    hloc_file: str | Path | None, progress: bool) -> Path | None:
    """`<out>.features.h5` holding the local features of the (key, path) items, from the OpenCV `extractor` or
    `hloc_file` (None when neither is given). Entries already there from an interrupted build are kept."""
    if extractor is None and hloc_file is None:
        return None
    work = out.with_name(out.name + FEATURES_SUFFIX)
    out.parent.mkdir(parents=True, exist_ok=True)
    if hloc_file is not None:
        return import_local_features(hloc_file, items, work)
    chosen = OpenCVExtractor(extractor)
    with FeatureStore(work, chosen.name, chosen.settings) as store:
        extract_into(store, chosen, items, progress)
        store.keep(key for key, _ in items)
    return work


class _Rows:
    """Some rows (increasing indices) of an array-like, read a slice at a time as `MapBundle.build` reads."""

    def __init__(self, data, rows: list[int]) -> None:
        self.data, self.rows = data, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), data.shape[1])

    def __getitem__(self, part: slice) -> np.ndarray:
        return np.asarray(self.data[self.rows[part]])


def _offline_warnings(model: GlobalDescriptor, images: int) -> list[str]:
    """A warning when the offline default came out with fewer than MIN_OFFLINE_DIM dimensions (too few map
    images for its PCA)."""
    if model.output_dim >= MIN_OFFLINE_DIM:
        return []
    return [f"the offline descriptor has only {model.output_dim} dimensions: its PCA whitening is fitted on the "
            f"{images} map images and keeps at most one fewer; retrieval with it is unreliable. Build from at "
            f"least {MIN_OFFLINE_DIM + 1} images, or give trained weights with --model"]


def _descriptor_info(model: GlobalDescriptor, stored: bool) -> dict:
    config = model.config
    return {"kind": "netvlad", "name": config.name, "backbone": config.backbone, "identity": model.identity,
            "stored_model": stored}


def map_model(bundle: MapBundle, weights: str | Path | None = None) -> GlobalDescriptor:
    """The descriptor model to describe queries for `bundle`: `weights` when given, else the model stored in
    the map. Refuses a model whose identity differs from the one the map was built with."""
    if weights is not None:
        model = load_model(weights)
    else:
        stored = bundle.attachment(MODEL_FILE)
        if stored is None:
            raise ValueError(f"{bundle.root} stores no descriptor model (it was built with "
                             f"{bundle.meta.descriptor.name or 'external weights'}): give those weights")
        model = load_native(stored)
    bundle.check_model(model)
    return model


def query_images(bundle: MapBundle, model: GlobalDescriptor, items: list, top_k: int, device: str | None = None,
                 batch_size: int = 8, workers: int = 0, fp16: bool = False) -> list[dict]:
    """One row per query image and rank: query, rank, key, score, easting, northing, query_easting,
    query_northing (the last two None when the query has no EXIF GPS)."""
    extraction = DescriptorExtractor(model, device, batch_size, fp16=fp16, workers=workers).describe_files(items)
    paths = dict(items)
    result = bundle.search(extraction.descriptors, top_k) if extraction.keys else None
    rows = []
    for q, key in enumerate(extraction.keys):
        gps = read_exif_gps(paths[key])
        qe = qn = None
        if gps is not None:
            e, n, _ = latlon_to_utm(gps.lat, gps.lon, bundle.table.zone)
            qe, qn = float(e), float(n)
        for rank, (i, score) in enumerate(zip(result.ids[q], result.scores[q]), start=1):
            if i < 0:
                break
            rows.append({"query": key, "rank": rank, "key": str(bundle.table.keys[i]), "score": float(score),
                         "easting": float(bundle.table.easting[i]), "northing": float(bundle.table.northing[i]),
                         "query_easting": qe, "query_northing": qn})
    for key, reason in extraction.failed.items():
        log.warning("query %s skipped: %s", key, reason)
    return rows
