"""End-to-end latency of one camera frame through the localizer (descriptor, retrieval, re-ranking, pose) with
VGG16-NetVLAD at 640x480 on a generated map (default 100,000 images, the million-map benchmark's generator), per
re-ranker at the thesis sizes (K = 319 candidates, L = 127), on the GPU when there is one (there also with the
descriptor under float16 autocast); then retrieval alone at
batch 1 and 32 and, when onnxruntime is installed, the descriptor through the ONNX path.

    .venv/bin/python benchmarks/frame_latency.py [--images 100000] [--device cuda]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from million_map import generate
from vpr_rerank_ros.descriptors.model import DescriptorConfig, GlobalDescriptor
from vpr_rerank_ros.geo import UtmZone
from vpr_rerank_ros.localizer import Localizer, LocalizerSettings
from vpr_rerank_ros.mapdb import MapBundle, MapTable

RERANKERS = [("none", {}), ("superglobal", {}), ("gnn", {"layers": 1}), ("gnn", {"layers": 2})]
TOP_K = 320
TARGET_MS = 15.0


def build(work: Path, n: int) -> Path:
    """A flat float16 map of n generated images (reused when present)."""
    map_dir = work / f"map-flat-{n}"
    if (map_dir / "map.json").exists():
        return map_dir
    desc_path, world_path = generate(work, n, seed=0)
    poses = np.load(world_path)["poses"]
    table = MapTable(keys=np.char.add("img", np.arange(n).astype(str)), easting=poses[:, 0], northing=poses[:, 1],
                     heading=poses[:, 2], zone=UtmZone(33))
    MapBundle.build(map_dir, table, np.load(desc_path, mmap_mode="r"), {"kind": "precomputed", "name": "synthetic"},
                    dtype="float16")
    return map_dir


def frames(localizer: Localizer, image: np.ndarray, count: int, hint=None) -> dict[str, np.ndarray]:
    """Per-stage and total milliseconds over `count` frames after three warm-up frames."""
    for _ in range(3):
        localizer.localize(image, hint)
    rows = []
    for _ in range(count):
        start = time.perf_counter()
        out = localizer.localize(image, hint)
        rows.append({**{k: v * 1e3 for k, v in out.timings.items()}, "total": (time.perf_counter() - start) * 1e3})
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def report(label: str, t: dict[str, np.ndarray]) -> None:
    stages = ", ".join(f"{k} {np.median(v):.2f}" for k, v in t.items() if k != "total")
    print(f"{label:34s} total median {np.median(t['total']):7.2f} ms, p95 {np.percentile(t['total'], 95):7.2f} "
          f"({stages})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vpr_frame_latency"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    gpu = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}; map of {args.images:,} images; VGG16-NetVLAD 640x480; "
          f"top {TOP_K}; rows: re-ranker (GNN layers), _fp16 = descriptor under float16 autocast; times in ms")
    t = time.perf_counter()
    bundle = MapBundle.load(build(args.work, args.images), verify=False, use_gpu=gpu)
    print(f"map ready in {time.perf_counter() - t:.0f} s; search through {type(bundle.index).__name__}")
    model = GlobalDescriptor(DescriptorConfig(max_side=640))
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    settings = LocalizerSettings(top_k=TOP_K, device=args.device)
    results = {}
    rows = [(r, p, False) for r, p in RERANKERS] + ([(r, p, True) for r, p in RERANKERS] if gpu else [])
    for reranker, params, fp16 in rows:
        localizer = Localizer(bundle, model, reranker, replace(settings, fp16=fp16), reranker_params=params)
        label = reranker + (f"{params['layers']}" if params else "") + ("_fp16" if fp16 else "")
        results[label] = frames(localizer, image, args.frames)
        report(label, results[label])
    lat, lon = float(bundle.table.lat[0]), float(bundle.table.lon[0])
    report("none, GPS hint (50 m)", frames(Localizer(bundle, model, "none", settings), image, args.frames,
                                          (lat, lon, 5.0)))
    queries = np.asarray(bundle.descriptors[:32], np.float32)
    for b in (1, 32):
        bundle.search(queries[:b], TOP_K)
        start = time.perf_counter()
        for _ in range(20):
            bundle.search(queries[:b], TOP_K)
        print(f"retrieval alone, batch {b:2d}, top {TOP_K}: {(time.perf_counter() - start) / 20 / b * 1e3:.3f} ms "
              f"per query ({type(bundle.index).__name__})")
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime not installed: ONNX path not measured")
    else:
        providers = ",".join(onnxruntime.get_available_providers())
        onnx = replace(settings, backend="onnxruntime", onnx_providers="auto")   # exported into the cache
        report("none, descriptor by onnxruntime", frames(Localizer(bundle, model, "none", onnx), image, 10))
        print(f"  (onnxruntime {onnxruntime.__version__}, providers available: {providers})")
    print("frame-latency: " + " ".join(f"{k}_ms={np.median(v['total']):.2f}" for k, v in results.items())
          + f" target_ms={TARGET_MS:g}")


if __name__ == "__main__":
    main()
