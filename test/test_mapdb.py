"""The map bundle: atomic build, validated load, retrieval (flat, IVF-PQ, GPS hint), error paths, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_rerank_ros import mapdb
from vpr_rerank_ros.cli import map_main
from vpr_rerank_ros.geo import UtmZone
from vpr_rerank_ros.mapdb import DescriptorInfo, IndexConfig, MapBundle, MapError, MapMeta, MapTable

ZONE = UtmZone(33)
DESCRIPTOR = {"kind": "test-random", "identity": "0" * 64}


def unit_rows(n, dim, seed):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_table(n, seed=0, spread=600.0):
    rng = np.random.default_rng(seed)
    return MapTable(keys=[f"img{i:05d}" for i in range(n)],
                    easting=386000.0 + rng.uniform(0, spread, n), northing=6174000.0 + rng.uniform(0, spread, n),
                    heading=rng.uniform(0, 360, n), zone=ZONE, captured_at=1.7e9 + np.arange(n),
                    path=[f"/data/img{i:05d}.jpg" for i in range(n)])


@pytest.fixture
def small_map(tmp_path):
    table = make_table(300)
    desc = unit_rows(300, 64, seed=1)
    return MapBundle.build(tmp_path / "map", table, desc, DESCRIPTOR), table, desc


def test_build_and_load_round_trip(small_map):
    bundle, table, desc = small_map
    loaded = MapBundle.load(bundle.root)
    assert len(loaded) == 300 and loaded.dim == 64 and loaded.table.zone == ZONE
    assert list(loaded.table.keys) == list(table.keys)
    for col in ("easting", "northing", "heading", "captured_at"):
        assert np.array_equal(getattr(loaded.table, col), getattr(table, col))
    assert np.allclose(loaded.table.lat, 55.7, atol=0.1) and np.allclose(loaded.table.lon, 13.2, atol=0.1)
    assert list(loaded.table.path) == list(table.path)
    assert isinstance(loaded.descriptors, np.memmap) and np.array_equal(loaded.descriptors, desc)
    assert loaded.meta.descriptor == DescriptorInfo(**DESCRIPTOR, dim=64, dtype="float32")
    assert MapMeta.from_json(json.loads((loaded.root / "map.json").read_text()), "x") == loaded.meta
    assert loaded.overlap.size == 300 and loaded.meta.overlap_pairs > 0
    assert not any(p.name.startswith(".map") for p in bundle.root.parent.iterdir())  # no temporary left


def test_search_matches_brute_force(small_map):
    bundle, _, desc = small_map
    queries = unit_rows(20, 64, seed=2)
    result = bundle.search(queries, k=10)
    expected = np.argsort(-(queries @ desc.T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(result.ids, expected)
    assert np.allclose(result.scores, np.take_along_axis(queries @ desc.T, expected, 1), atol=1e-5)
    assert not result.restricted.any() and not result.fallback.any()
    wide = bundle.search(queries[:2], k=400)  # more than the map holds: padded
    assert wide.ids.shape == (2, 400) and (wide.ids[:, 300:] == -1).all() and np.isneginf(wide.scores[:, 300:]).all()
    assert wide.valid.sum() == 600


def test_search_near_gps_hint(small_map):
    bundle, table, desc = small_map
    queries = unit_rows(3, 64, seed=3)
    hints = np.array([[table.easting[0], table.northing[0]], [0.0, 0.0], [np.nan, np.nan]])
    result = bundle.search(queries, k=5, hint_xy=hints, radius=80.0)
    assert result.restricted.tolist() == [True, False, False]
    assert result.fallback.tolist() == [False, True, False]  # nothing within 80 m of (0, 0): whole map
    near = np.flatnonzero(np.hypot(table.easting - hints[0, 0], table.northing - hints[0, 1]) <= 80.0)
    expected = near[np.argsort(-(desc[near] @ queries[0]), kind="stable")][:5]
    assert np.array_equal(result.ids[0, :expected.size], expected)
    whole = bundle.search(queries[1:], k=5)
    assert np.array_equal(result.ids[1:], whole.ids)
    # The same hint given as latitude/longitude.
    lat_lon_hint = bundle.hint_from_latlon(table.lat[0], table.lon[0])
    assert np.allclose(lat_lon_hint, hints[:1], atol=1e-3)
    with pytest.raises(ValueError, match="radius"):
        bundle.search(queries, k=5, hint_xy=hints)
    # One hint for several queries applies to each (the README's example).
    shared = bundle.search(queries, k=5, hint_xy=lat_lon_hint, radius=80.0)
    assert shared.restricted.all() and np.array_equal(shared.ids[0], result.ids[0])
    with pytest.raises(ValueError, match="2 hints for 3 queries"):
        bundle.search(queries, k=5, hint_xy=hints[:2], radius=80.0)


def test_search_rejects_bad_queries(small_map):
    bundle, _, _ = small_map
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        bundle.search(unit_rows(2, 32, seed=4), k=3)
    bad = unit_rows(2, 64, seed=4)
    bad[1, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bundle.search(bad, k=3)
    with pytest.raises(ValueError, match="k must"):
        bundle.search(unit_rows(1, 64, seed=4), k=0)


def test_ivfpq_index(tmp_path):
    n, dim = 3000, 32
    desc = unit_rows(n, dim, seed=5)
    config = IndexConfig(kind="ivfpq", nlist=16, pq_m=8, nprobe=16, pca_dim=16, rescore=40)
    bundle = MapBundle.build(tmp_path / "big", make_table(n, spread=3000.0), desc, DESCRIPTOR, index=config)
    assert MapBundle.load(bundle.root).meta.index == config
    queries = desc[:50] + 0.05 * unit_rows(50, dim, seed=6)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    result = bundle.search(queries, k=10)
    assert (result.ids[:, 0] == np.arange(50)).mean() >= 0.9    # approximate, yet finds its source
    # The short list is re-scored exactly: the scores are the inner products, best first.
    exact = np.einsum("bkd,bd->bk", desc[result.ids], queries)
    assert np.allclose(result.scores, exact, atol=1e-6) and (np.diff(result.scores, axis=1) <= 0).all()
    # A PCA dimension at or above D keeps the descriptors' own, and says so.
    assert MapBundle.build(tmp_path / "nopca", make_table(n), desc, DESCRIPTOR,
                           index=IndexConfig("ivfpq", nlist=16, pq_m=8, pca_dim=64)).meta.index.pca_dim == 0
    with pytest.raises(ValueError, match="flat"):
        MapBundle.build(tmp_path / "tiny", make_table(100), unit_rows(100, dim, 7), DESCRIPTOR, index=config)
    with pytest.raises(ValueError, match="divide"):
        MapBundle.build(tmp_path / "odd", make_table(n), desc, DESCRIPTOR, index=IndexConfig("ivfpq", pq_m=5))


def test_build_streams_chunks_from_any_array_like(tmp_path, monkeypatch):
    """Descriptors are read BUILD_CHUNK rows at a time, from an array-like such as an HDF5 dataset; the stored
    map equals one built from the whole array, and rows() reads them back (float32, any index shape)."""
    h5py = pytest.importorskip("h5py")
    n, dim = 1000, 24
    desc = unit_rows(n, dim, seed=12)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["descriptors"] = desc
    monkeypatch.setattr(mapdb, "BUILD_CHUNK", 128)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        bundle = MapBundle.build(tmp_path / "m", make_table(n), f["descriptors"], DESCRIPTOR, dtype="float16")
    whole = MapBundle.build(tmp_path / "w", make_table(n), desc, DESCRIPTOR, dtype="float16")
    assert np.array_equal(bundle.descriptors, whole.descriptors)
    ids = np.array([[5, 6, 7, 999], [0, 5, 5, 300]])
    assert bundle.rows(ids).dtype == np.float32
    assert np.array_equal(bundle.rows(ids), np.asarray(whole.descriptors, np.float32)[ids])
    with pytest.raises(IndexError):
        bundle.rows([n])
    bad = desc.copy()
    bad[700] *= 2
    with pytest.raises(ValueError, match="img00700"):          # a bad row in a later chunk is named
        MapBundle.build(tmp_path / "bad", make_table(n), bad, DESCRIPTOR)
    assert not (tmp_path / "bad").exists()


def test_a_killed_build_leaves_a_staging_directory_the_next_build_removes(small_map):
    bundle, table, desc = small_map
    stale = bundle.root.parent / f".{bundle.root.name}.tmp-deadbeef"
    stale.mkdir()
    (stale / "descriptors.npy").write_bytes(b"half")
    with pytest.raises(MapError):
        MapBundle.load(stale)                                     # never loadable
    MapBundle.build(bundle.root, table, desc, DESCRIPTOR, overwrite=True)
    assert not stale.exists()


def test_float16_descriptors(tmp_path):
    desc = unit_rows(50, 16, seed=8)
    bundle = MapBundle.build(tmp_path / "m16", make_table(50), desc, DESCRIPTOR, dtype="float16")
    assert bundle.descriptors.dtype == np.float16
    assert bundle.search(desc[:5], k=1).ids[:, 0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("problem, match", [
    ("empty", "no images"),
    ("not_normalised", "L2-normalised"),
    ("nan", "NaN"),
    ("shape", r"\(20, D\)"),
    ("duplicate_keys", "unique"),
])
def test_build_rejects_bad_input(tmp_path, problem, match):
    table, desc = make_table(20), unit_rows(20, 8, seed=9)
    if problem == "empty":
        table, desc = make_table(0), np.zeros((0, 8), np.float32)
    elif problem == "not_normalised":
        desc = desc * 2
    elif problem == "nan":
        desc[3, 0] = np.nan
    elif problem == "shape":
        desc = desc[:10]
    with pytest.raises(ValueError, match=match):
        if problem == "duplicate_keys":
            table = MapTable(keys=["a"] * 20, easting=table.easting, northing=table.northing,
                             heading=table.heading, zone=ZONE)
        MapBundle.build(tmp_path / "m", table, desc, DESCRIPTOR)
    assert not (tmp_path / "m").exists()


def test_build_never_leaves_a_half_map(tmp_path, monkeypatch, small_map):
    bundle, table, desc = small_map
    before = sorted(p.name for p in bundle.root.parent.iterdir())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mapdb.OverlapGraph, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        MapBundle.build(bundle.root, table, unit_rows(300, 64, seed=10), DESCRIPTOR, overwrite=True)
    assert sorted(p.name for p in bundle.root.parent.iterdir()) == before  # old map intact, no temporaries
    assert np.array_equal(MapBundle.load(bundle.root).descriptors, desc)
    with pytest.raises(FileExistsError):
        MapBundle.build(bundle.root, table, desc, DESCRIPTOR)


def test_overwrite_replaces_map(small_map):
    bundle, table, _ = small_map
    new = unit_rows(300, 64, seed=11)
    MapBundle.build(bundle.root, table, new, DESCRIPTOR, overwrite=True)
    assert np.array_equal(MapBundle.load(bundle.root).descriptors, new)


def corrupt(root, problem):
    if problem == "flipped_byte":
        data = bytearray((root / "descriptors.npy").read_bytes())
        data[-5] ^= 0xFF
        (root / "descriptors.npy").write_bytes(bytes(data))
    elif problem == "truncated":
        data = (root / "index.faiss").read_bytes()
        (root / "index.faiss").write_bytes(data[:100])
    elif problem == "missing":
        (root / "overlap.npz").unlink()
    elif problem == "no_map_json":
        (root / "map.json").unlink()
    elif problem == "bad_json":
        (root / "map.json").write_text("{not json")
    elif problem in META_EDITS:
        meta = json.loads((root / "map.json").read_text())
        META_EDITS[problem](meta)
        (root / "map.json").write_text(json.dumps(meta))


META_EDITS = {
    "version": lambda meta: meta.update(version=99),
    "wrong_dim": lambda meta: meta["descriptor"].update(dim=128),
    "count": lambda meta: meta.update(count=299),
    "empty": lambda meta: meta.update(count=0),
    "index_kind": lambda meta: meta["index"].update(kind="hnsw"),
    "zone": lambda meta: meta.update(utm_zone="99X"),
    "no_fov": lambda meta: meta.pop("fov"),
    "descriptor_key": lambda meta: meta["descriptor"].update(colour="red"),
    "fov_mismatch": lambda meta: meta["fov"].update(radius_m=80.0),
    "nprobe": lambda meta: meta["index"].update(nprobe=0),
}


@pytest.mark.parametrize("problem, match", [
    ("flipped_byte", r"descriptors\.npy: checksum"),
    ("truncated", r"index\.faiss: size"),
    ("missing", r"overlap\.npz: missing"),
    ("no_map_json", r"map\.json: missing"),
    ("bad_json", "not valid JSON"),
    ("version", "format version 99"),
    ("wrong_dim", r"descriptors\.npy: float32\[300, 64\], map\.json says float32\[300, 128\]"),
    ("count", r"images\.csv: 300 rows, map\.json says 299"),
    ("empty", "at least one image"),
    ("index_kind", r"'index': kind must be one of"),
    ("zone", r"map\.json: 'utm_zone': not a UTM zone"),
    ("no_fov", r"map\.json: missing field 'fov'"),
    ("descriptor_key", r"map\.json: 'descriptor' needs kind, dim and dtype"),
    ("fov_mismatch", r"overlap\.npz: FoV 50\.0 m / 90\.0°, map\.json says 80\.0 m"),
    ("nprobe", r"map\.json: index nprobe must be positive"),
])
def test_load_names_the_broken_file(small_map, problem, match):
    bundle, _, _ = small_map
    corrupt(bundle.root, problem)
    with pytest.raises(MapError, match=match):
        MapBundle.load(bundle.root)


def test_load_without_checksums_still_checks_structure(small_map):
    bundle, _, _ = small_map
    corrupt(bundle.root, "flipped_byte")
    MapBundle.load(bundle.root, verify=False)  # same size: only `verify` reads every byte
    with pytest.raises(MapError, match="no such map"):
        MapBundle.load(bundle.root / "nope")


def test_cli_info_and_verify(small_map, capsys):
    bundle, _, _ = small_map
    assert map_main(["info", str(bundle.root)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 300 and info["utm_zone"] == "33N" and info["descriptor"]["dim"] == 64
    assert map_main(["verify", str(bundle.root)]) == 0
    assert "OK" in capsys.readouterr().out
    corrupt(bundle.root, "flipped_byte")
    assert map_main(["verify", str(bundle.root)]) == 1
    assert "checksum" in capsys.readouterr().err
    # The installed console script (make setup installs it) exits non-zero too.
    script = Path(sys.prefix) / "bin" / "vpr-map"
    done = subprocess.run([str(script), "verify", str(bundle.root)], capture_output=True, text=True)
    assert done.returncode == 1 and "checksum mismatch" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_search_finds_what_the_cpu_finds(small_map):
    """use_gpu=True: faiss-gpu when installed, else an exact torch search over the descriptors on the GPU."""
    bundle, _, desc = small_map
    gpu = MapBundle.load(bundle.root, use_gpu=True)
    queries = desc[:20] + 0.01 * unit_rows(20, desc.shape[1], seed=13)
    cpu_result, gpu_result = bundle.search(queries, k=5), gpu.search(queries, k=5)
    assert gpu.use_gpu and (gpu_result.ids[:, 0] == cpu_result.ids[:, 0]).all()
    assert np.allclose(gpu_result.scores, cpu_result.scores, atol=2e-3)       # float16 on the GPU
