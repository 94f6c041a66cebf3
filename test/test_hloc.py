"""hloc interoperability: maps built from files in hloc's exact layouts (written here as hloc's extract_features
writes them: one group per relative image path, nested at '/', half precision, (D, N) descriptors), the name
mapping, the error paths, and export then import giving the same map."""
import re

import h5py
import numpy as np
import pytest

from vpr_rerank_ros.cli import map_main
from vpr_rerank_ros.hloc import match_names
from vpr_rerank_ros.mapdb import MapBundle, MapError

from test_local_features import photos, scene

DIM, N = 32, 5


def write_hloc(path, entries):
    """A file as hloc writes it: `fd.create_group(name)` per image (intermediate groups from the '/'), every
    float32 array stored as float16 (as_half)."""
    with h5py.File(path, "w", libver="latest") as fd:
        for name, data in entries.items():
            group = fd.create_group(name)
            for key, value in data.items():
                value = np.asarray(value)
                group.create_dataset(key, data=value.astype(np.float16) if value.dtype == np.float32 else value)


def global_entry(seed, dim=DIM):
    x = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return {"global_descriptor": x / np.linalg.norm(x), "image_size": np.array([320, 240])}


def local_entry(seed, n=40, dim=64):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(dim, n)).astype(np.float32)
    return {"keypoints": rng.uniform(0, 239, (n, 2)).astype(np.float32), "descriptors": d / np.linalg.norm(d, axis=0),
            "scores": rng.uniform(0, 1, n).astype(np.float32), "image_size": np.array([320, 240])}


@pytest.fixture
def hloc_setup(tmp_path):
    """Map images under images/db (a CSV source: keys are file stems) and hloc files for images/db and
    images/query, whose file names are the same: only the path tells them apart."""
    from PIL import Image

    (tmp_path / "images" / "db").mkdir(parents=True)
    rows = ["path,lat,lon,heading"]
    for i in range(N):
        Image.fromarray(scene(i)).save(tmp_path / "images" / "db" / f"{i:04d}.jpg")
        rows.append(f"images/db/{i:04d}.jpg,55.70,{13.20 + i * 1e-4:.6f},90")
    (tmp_path / "map.csv").write_text("\n".join(rows) + "\n")
    names = [f"{side}/{i:04d}.jpg" for side in ("db", "query") for i in range(N)]
    write_hloc(tmp_path / "global-feats-netvlad.h5", {n: global_entry(k) for k, n in enumerate(names)})
    write_hloc(tmp_path / "feats-superpoint.h5", {n: local_entry(k) for k, n in enumerate(names)})
    return tmp_path


def build(root, *extra):
    return map_main(["build", "--csv", str(root / "map.csv"), "--out", str(root / "map"), "--overwrite", *extra])


def test_a_map_from_hloc_files(hloc_setup):
    root = hloc_setup
    assert build(root, "--global-features", str(root / "global-feats-netvlad.h5"),
                 "--local-features-file", str(root / "feats-superpoint.h5")) == 0
    bundle = MapBundle.load(root / "map")
    assert list(bundle.table.keys) == [f"{i:04d}" for i in range(N)]
    expected = np.stack([global_entry(i)["global_descriptor"].astype(np.float16).astype(np.float32) for i in range(N)])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(bundle.descriptors, expected, atol=1e-7)           # the db/ entries, not query/
    assert bundle.meta.descriptor.kind == "precomputed" and bundle.meta.descriptor.name == "netvlad"
    features = bundle.local_features
    assert features.extractor == "superpoint" and features.dim == 64 and features.dtype == "float16"
    for i in (0, 3):
        entry, read = local_entry(i), features.read(f"{i:04d}")
        assert read.keypoints.dtype == np.float32 and read.descriptors.shape == (40, 64)
        assert np.array_equal(read.keypoints, entry["keypoints"].astype(np.float16).astype(np.float32))
        assert np.array_equal(read.descriptors, entry["descriptors"].T.astype(np.float16))
        assert read.image_size == (320, 240)
    with pytest.raises(MapError, match="holds superpoint local features imported from hloc: this package cannot "
                                       "extract them from a query"):
        bundle.local_extractor()                   # no geometric verification with them


def test_names_match_by_key_or_path_tail():
    items = [("0001", "/data/db/0001.jpg"), ("x", "/data/db/sub/0002.jpg")]
    assert match_names(["query/0001.jpg", "db/0001.jpg", "sub/0002.jpg"], items, "f") == ["db/0001.jpg",
                                                                                         "sub/0002.jpg"]
    assert match_names(["0001", "x"], items, "f") == ["0001", "x"]              # by key
    with pytest.raises(ValueError, match=r"f: several entries \(0001.jpg, db/0001.jpg\) for map image '0001'"):
        match_names(["0001.jpg", "db/0001.jpg", "x"], items, "f")
    with pytest.raises(ValueError, match="f: no entry for map image 'x'"):
        match_names(["db/0001.jpg", "b/0002.jpg"], items, "f")


@pytest.mark.parametrize("problem, flag, match", [
    ("missing", "--global-features", r"global-feats-netvlad.h5: no entry for map image '0003'"),
    ("dimension", "--global-features", r"global-feats-netvlad.h5: entry 'db/0002.jpg' is 16-D, 'db/0000.jpg' is 32-D"),
    ("not_unit", "--global-features", r"global-feats-netvlad.h5: global descriptors must be .* L2-normalised: "
                                      r"'db/0001.jpg' has norm 2\.99"),
    ("corrupt", "--global-features", r"global-feats-netvlad.h5: not a readable HDF5 file"),
    ("missing", "--local-features-file", r"feats-superpoint.h5: no entry for map image '0003'"),
    ("dimension", "--local-features-file", r"feats-superpoint.h5: entry 'db/0002.jpg': 16-D float16 descriptors, entry "
                                          r"'db/0000.jpg' has 64-D float16"),
    ("no_scores", "--local-features-file", r"feats-superpoint.h5: entry 'db/0001.jpg': no dataset scores"),
    ("corrupt", "--local-features-file", r"feats-superpoint.h5: not a readable HDF5 file"),
])
def test_bad_hloc_files_are_refused_by_name(hloc_setup, capsys, problem, flag, match):
    root = hloc_setup
    glob, local = root / "global-feats-netvlad.h5", root / "feats-superpoint.h5"
    target = glob if flag == "--global-features" else local
    entry = global_entry if target == glob else local_entry
    names = [f"db/{i:04d}.jpg" for i in range(N)]
    entries = {n: entry(i) for i, n in enumerate(names)}
    if problem == "missing":
        entries.pop("db/0003.jpg")
    elif problem == "dimension":
        entries["db/0002.jpg"] = entry(2, dim=16)
    elif problem == "not_unit":
        entries["db/0001.jpg"]["global_descriptor"] *= 3
    elif problem == "no_scores":
        entries["db/0001.jpg"].pop("scores")
    write_hloc(target, entries)
    if problem == "corrupt":
        target.write_bytes(target.read_bytes()[:200])
    extra = [flag, str(target)] + (["--global-features", str(glob)] if target == local else [])
    assert build(root, *extra) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err), err
    assert not (root / "map").exists()


def test_export_then_import_gives_the_same_map(tmp_path):
    images, descriptors = photos(tmp_path / "photos", n=4)
    first, exported = tmp_path / "first", tmp_path / "hloc"
    assert map_main(["build", "--images", str(tmp_path / "photos"), "--descriptors", str(descriptors),
                     "--local-features", "rootsift", "--out", str(first)]) == 0
    assert map_main(["export-hloc", str(first), "--out", str(exported), "--image-root", str(tmp_path)]) == 0
    glob = exported / "global-feats-precomputed-descriptors-h5.h5"
    local = exported / "feats-rootsift.h5"
    with h5py.File(glob) as g, h5py.File(local) as f:                  # hloc's layout, names = relative paths
        assert sorted(g["photos"]) == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]
        assert g["photos/02.jpg/global_descriptor"].shape == (16,)
        n = f["photos/02.jpg/keypoints"].shape[0]
        assert n > 20 and f["photos/02.jpg/descriptors"].shape == (128, n) and f["photos/02.jpg/scores"].shape == (n,)
    second = tmp_path / "second"
    assert map_main(["build", "--images", str(tmp_path / "photos"), "--global-features", str(glob),
                     "--local-features-file", str(local), "--out", str(second)]) == 0
    a, b = MapBundle.load(first), MapBundle.load(second)
    assert list(a.table.keys) == list(b.table.keys) and np.allclose(a.descriptors, b.descriptors, atol=1e-7)
    for key in a.table.keys:
        fa, fb = a.local_features.read(key), b.local_features.read(key)
        assert all(np.array_equal(getattr(fa, k), getattr(fb, k)) for k in ("keypoints", "descriptors", "scores"))
    extractor = a.local_extractor()                # a query's features as the map's, for geometric verification
    assert (extractor.name, extractor.settings) == ("rootsift", {"max_keypoints": 2048, "max_side": 1024})
    with pytest.raises(MapError, match="holds rootsift local features imported from hloc"):
        b.local_extractor()                        # hloc's file does not say how they were extracted
    by_key = tmp_path / "by_key"
    assert map_main(["export-hloc", str(first), "--out", str(by_key)]) == 0
    with h5py.File(by_key / "feats-rootsift.h5") as f:
        assert sorted(f) == ["00", "01", "02", "03"]
    assert map_main(["export-hloc", str(first), "--out", str(by_key), "--image-root", str(tmp_path / "x")]) == 1
