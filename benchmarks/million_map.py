"""A million-image map on this machine: build time, size on disk, resident memory while serving, query time with
and without a GPS hint, and Recall@10 of the approximate index against exact search.

The map is generated, not downloaded: 1,000,000 poses along a synthetic street grid (both travel directions) and
4096-D descriptors with the structure that makes retrieval hard: districts share a component, each 20 m stretch
of street in one direction is a place whose images are noisy views of it, and the spectrum decays like a learned
descriptor's. Queries are new views of random places, with a GPS fix a few metres off. Descriptors are streamed to
a scratch .npy (float16) and the map is built from it with the default 'ivfpq' index (PCA, IVF-PQ, exact re-scoring
of the short list). Serving runs in a fresh process, so its resident memory is the server's, not the builder's.

    .venv/bin/python benchmarks/million_map.py [--images 1000000] [--work /tmp/vpr_million]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from vpr_rerank_ros.geo import UtmZone
from vpr_rerank_ros.mapdb import IndexConfig, MapBundle, MapTable

DIM, LATENT = 4096, 384
BLOCK_M, PLACE_M, DISTRICT_M = 100.0, 20.0, 1000.0
QUERIES, K, GPS_SIGMA_M, HINT_RADIUS_M = 300, 10, 5.0, 50.0
ORIGIN = np.array([380000.0, 6170000.0])
CHUNK = 65536


def street_poses(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) easting, northing, heading on a square street grid sized for ~3 m between images, and each image's
    place id (street, 20 m stretch, direction)."""
    side = np.sqrt(n * 3.0 * BLOCK_M / 2)                      # total street length ~ 3 m per image
    streets = int(side // BLOCK_M) + 1
    street = rng.integers(0, 2 * streets, n)                   # first half east-west, second half north-south
    along = rng.uniform(0, side, n)
    across = (street % streets) * BLOCK_M
    ns = street >= streets
    backwards = rng.random(n) < 0.5
    east, north = np.where(ns, across, along), np.where(ns, along, across)
    heading = np.where(ns, 0.0, 90.0) + 180.0 * backwards + rng.normal(0, 5.0, n)
    place = (street * int(side // PLACE_M + 1) + (along // PLACE_M).astype(np.int64)) * 2 + backwards
    poses = np.c_[east + ORIGIN[0] + rng.normal(0, 1.0, n), north + ORIGIN[1] + rng.normal(0, 1.0, n), heading % 360]
    return poses, place


class Appearance:
    """Descriptors of views of places: a fixed random projection of latent codes (district + place + view noise)
    plus isotropic noise, L2-normalised. Places and districts are dense indices into latent tables."""

    def __init__(self, places: int, districts: int, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.spectrum = (1.0 + torch.arange(LATENT) / 24.0) ** -0.8
        self.projection = torch.randn(LATENT, DIM, generator=self.g) / np.sqrt(LATENT)
        self.places = torch.randn(places, LATENT, generator=self.g) * self.spectrum
        self.districts = torch.randn(districts, LATENT, generator=self.g) * self.spectrum * 0.8

    def views(self, places: np.ndarray, districts: np.ndarray) -> np.ndarray:
        """(n, DIM) float16 unit descriptors of new views of `places` (a view's own noise each time)."""
        code = self.places[places] + self.districts[districts]
        code += torch.randn(code.shape, generator=self.g) * self.spectrum * 0.55
        x = code @ self.projection + torch.randn(len(places), DIM, generator=self.g) * (0.45 / np.sqrt(DIM))
        return torch.nn.functional.normalize(x, dim=1).numpy().astype(np.float16)


def district_of(poses: np.ndarray) -> np.ndarray:
    cell = ((poses[:, :2] - ORIGIN) // DISTRICT_M).astype(np.int64)
    return np.unique(cell[:, 0] * 100003 + cell[:, 1], return_inverse=True)[1]


def generate(work: Path, n: int, seed: int) -> tuple[Path, Path]:
    """Scratch descriptors (.npy, float16) and poses/places/queries (.npz) in `work`; reused when present."""
    desc_path, meta_path = work / f"descriptors-{n}-{seed}.npy", work / f"world-{n}-{seed}.npz"
    if desc_path.exists() and meta_path.exists():
        return desc_path, meta_path
    rng = np.random.default_rng(seed)
    poses, place = street_poses(n, rng)
    place = np.unique(place, return_inverse=True)[1]
    districts = district_of(poses)
    appearance = Appearance(place.max() + 1, districts.max() + 1, seed)
    partial = desc_path.with_suffix(".partial.npy")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(n, DIM))
    for start in range(0, n, CHUNK):
        out[start:start + CHUNK] = appearance.views(place[start:start + CHUNK], districts[start:start + CHUNK])
    out.flush()
    del out
    pick = rng.choice(n, QUERIES, replace=False)                # queries: new views of these images' places
    q_poses = poses[pick] + np.c_[rng.normal(0, 2.0, (QUERIES, 2)), rng.normal(0, 5.0, QUERIES)]
    queries = appearance.views(place[pick], districts[pick]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gps = q_poses[:, :2] + rng.normal(0, GPS_SIGMA_M, (QUERIES, 2))
    np.savez(meta_path, poses=poses, queries=queries, gps=gps)
    partial.rename(desc_path)
    return desc_path, meta_path


def exact_top(descriptors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) exact inner-product top-k over all rows, scanned in chunks (the reference for recall)."""
    q = torch.from_numpy(queries)
    best_s = torch.full((len(queries), k), -np.inf)
    best_i = torch.full((len(queries), k), -1, dtype=torch.int64)
    for start in range(0, len(descriptors), CHUNK):
        block = torch.from_numpy(np.asarray(descriptors[start:start + CHUNK], np.float32))
        s, i = (q @ block.T).topk(k, dim=1)
        merged_s, pos = torch.cat([best_s, s], 1).topk(k, dim=1)
        best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, pos)
        best_s = merged_s
    return best_i.numpy()


def memory_gb() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(status[name].split()[0]) / 2 ** 20 for name in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def serve(map_dir: Path, world: Path, exact: Path) -> dict:
    """In a fresh process: load the map, answer every query one at a time with and without its GPS hint, and the
    unrestricted queries again for other nprobe / rescore settings (Recall@K against `exact` for each)."""
    start = time.perf_counter()
    bundle = MapBundle.load(map_dir, verify=False)
    load_s = time.perf_counter() - start
    loaded = memory_gb()
    w, truth = np.load(world), np.load(exact)
    queries, gps = w["queries"], w["gps"]
    bundle.search(queries[:5], K)                                 # warm-up, both paths
    bundle.search(queries[:5], K, gps[:5], HINT_RADIUS_M)

    def run(hint: np.ndarray | None) -> dict:
        ids, times = [], []
        for q in range(len(queries)):
            t = time.perf_counter()
            r = bundle.search(queries[q:q + 1], K, None if hint is None else hint[q:q + 1],
                              None if hint is None else HINT_RADIUS_M)
            times.append(time.perf_counter() - t)
            ids.append(r.ids[0])
        recall = np.mean([len(set(a) & set(e)) / K for a, e in zip(ids, truth)])
        return {"ms_mean": 1e3 * float(np.mean(times)), "ms_p95": 1e3 * float(np.percentile(times, 95)),
                "recall": float(recall), "ids": np.array(ids).tolist()}

    out = {"load_s": load_s, "mem_loaded": loaded, "search": run(None), "hint_search": run(gps), "settings": []}
    default = bundle.meta.index
    ivf = faiss.extract_index_ivf(bundle.index)
    for nprobe in (32, 48, 64, 96):
        for rescore in (64, 128, 256):
            ivf.nprobe, bundle.meta = nprobe, replace(bundle.meta, index=replace(default, rescore=rescore))
            row = run(None)
            out["settings"].append({"nprobe": nprobe, "rescore": rescore, "ms": row["ms_mean"], "recall": row["recall"]})
    ids = bundle.search(queries[:1], 320).ids[0]                  # a frame's overlap lookup on this map
    t = time.perf_counter()
    for _ in range(20):
        bundle.overlap.lookup_batch(ids[None])
    out["lookup_320_ms"] = 1e3 * (time.perf_counter() - t) / 20
    out["mem_serving"] = memory_gb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vpr_million"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the built map in the work dir (8 GB)")
    parser.add_argument("--serve", nargs=3, type=Path, metavar=("MAP", "WORLD", "EXACT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        print(json.dumps(serve(*args.serve)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{args.images:,} images, {DIM}-D float16; torch {torch.get_num_threads()} threads; work dir {args.work}")
    t = time.perf_counter()
    desc_path, world_path = generate(args.work, args.images, args.seed)
    print(f"generated (or reused) descriptors and poses: {time.perf_counter() - t:.0f} s")
    world = np.load(world_path)
    poses = world["poses"]
    table = MapTable(keys=np.char.add("img", np.arange(len(poses)).astype(str)), easting=poses[:, 0],
                     northing=poses[:, 1], heading=poses[:, 2], zone=UtmZone(33))
    descriptors = np.load(desc_path, mmap_mode="r")
    map_dir = args.work / "map"
    t = time.perf_counter()
    bundle = MapBundle.build(map_dir, table, descriptors, {"kind": "precomputed", "name": "synthetic"},
                             index=IndexConfig(kind="ivfpq"), dtype="float16", overwrite=True, progress=True)
    build_s = time.perf_counter() - t
    disk_gb = sum(p.stat().st_size for p in map_dir.iterdir()) / 2 ** 30
    print(f"build: {build_s:.0f} s, {disk_gb:.2f} GB on disk "
          f"({', '.join(f'{p.name} {p.stat().st_size / 2 ** 20:.0f} MB' for p in sorted(map_dir.iterdir()))}); "
          f"index {bundle.meta.index}; {bundle.meta.overlap_pairs:,} overlapping pairs")
    del bundle, table
    t = time.perf_counter()
    exact_path = args.work / "exact.npy"
    np.save(exact_path, exact_top(descriptors, world["queries"], K))
    print(f"exact top-{K} of {len(world['queries'])} queries by a full scan: {time.perf_counter() - t:.1f} s")
    served = json.loads(subprocess.run([sys.executable, __file__, "--serve", str(map_dir), str(world_path),
                                        str(exact_path)], check=True, capture_output=True,
                                       text=True).stdout.splitlines()[-1])
    hinted = np.asarray(served["hint_search"]["ids"])
    near_truth = np.mean([np.hypot(*(poses[i[0], :2] - g)) < 25.0 for i, g in zip(hinted, world["gps"])])
    mem, loaded, search = served["mem_serving"], served["mem_loaded"], served["search"]
    print(f"serving (fresh process): load {served['load_s']:.1f} s; resident {mem['VmRSS']:.2f} GB "
          f"(anonymous {mem['RssAnon']:.2f}, file-backed {mem['RssFile']:.2f}; peak {mem['VmHWM']:.2f}; "
          f"{loaded['VmRSS']:.2f} right after loading)")
    print(f"search, one query at a time, top {K}: unrestricted {search['ms_mean']:.2f} ms mean "
          f"(p95 {search['ms_p95']:.2f}); within {HINT_RADIUS_M:g} m of a GPS fix "
          f"{served['hint_search']['ms_mean']:.2f} ms (p95 {served['hint_search']['ms_p95']:.2f}); "
          f"overlap lookup for 320 candidates {served['lookup_320_ms']:.2f} ms")
    print(f"Recall@{K} of the approximate index against exact search: {search['recall']:.3f} (target >= 0.9); "
          f"hinted top 1 within 25 m of the GPS fix: {near_truth:.2f}")
    print("other settings of the same index (unrestricted search): nprobe, rescore -> ms per query, Recall@10")
    for row in served["settings"]:
        print(f"  nprobe {row['nprobe']:3d}  rescore {row['rescore']:3d}  {row['ms']:6.2f} ms  {row['recall']:.3f}")
    print(f"million-map: build_s={build_s:.0f} search_ms={search['ms_mean']:.2f} "
          f"hint_search_ms={served['hint_search']['ms_mean']:.2f} rss_gb={mem['VmHWM']:.2f} "
          f"recall10={search['recall']:.3f}")
    if not args.keep:
        shutil.rmtree(map_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
