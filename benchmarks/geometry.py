"""Geometry and metrics benchmark: the closed-form FoV overlap against shapely polygons, overlap-graph builds
and lookups (on MSLS Melbourne and on a synthetic 1,000,000-image road network) against recomputation, and
metric scoring speed, each measured side by side in one run. Uses ../shared/data when it is present."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from million_map import memory_gb, street_poses
from vpr_rerank_ros.geo import OverlapGraph, _fov_overlap_shapely, fov_overlap
from vpr_rerank_ros.metrics import positives_within, retrieval_metrics

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    """Best wall time of `repeat` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def fov_accuracy_and_speed(rng: np.random.Generator) -> None:
    k = np.c_[rng.uniform(0, 80, (320, 2)) + [386000.0, 6174000.0], rng.uniform(0, 360, 320)]
    rows, cols = k[:, None, :], k[None, :128, :]
    t_shapely, _ = timed(lambda: fov_overlap(rows, cols, exact=True), repeat=1)
    threads = torch.get_num_threads()
    times = {}
    for n in sorted({1, 2, threads}):
        torch.set_num_threads(n)
        times[n], closed = timed(lambda: fov_overlap(rows, cols), repeat=10)
    torch.set_num_threads(threads)
    t_closed = times[threads]
    print(f"FoV overlap, 320x128 matrix of poses within 80 m: shapely (512-segment arcs) {t_shapely:.2f} s, closed form "
          + ", ".join(f"{t * 1e3:.1f} ms on {n} thread{'s' * (n > 1)}" for n, t in times.items())
          + f" -> {t_shapely / t_closed:.0f}x faster than shapely, target >= 500x")
    # shapely's polygons miss their arcs' caps: its ratio is within 2·missed/polygon of the true one.
    segments, half = 4096, math.pi / 4
    polygon = segments / 2 * math.sin(2 * half / segments)
    fine = _fov_overlap_shapely(rows - [k[0, 0], k[0, 1], 0.0], cols[:, :32] - [k[0, 0], k[0, 1], 0.0], 50.0, 90.0,
                                segments)
    print(f"  max |error| vs shapely with {segments}-segment arcs on 320x32 of them: "
          f"{np.abs(closed[:, :32] - fine).max():.1e} (shapely's own bound {2 * (half - polygon) / polygon:.1e}, "
          f"target <= 1e-6)")
    if torch.cuda.is_available():
        rows_t, cols_t = torch.from_numpy(rows).cuda(), torch.from_numpy(cols).cuda()
        batch = (rows_t.expand(32, -1, -1, -1), cols_t.expand(32, -1, -1, -1))
        for args in ((rows_t, cols_t), batch):
            fov_overlap(*args)
        torch.cuda.synchronize()
        t_gpu, gpu = timed(lambda: (fov_overlap(rows_t, cols_t), torch.cuda.synchronize())[0], repeat=10)
        t_batch, _ = timed(lambda: (fov_overlap(*batch), torch.cuda.synchronize())[0], repeat=10)
        print(f"  on {torch.cuda.get_device_name()}: 320x128 {t_gpu * 1e3:.2f} ms, 32x320x128 {t_batch * 1e3:.2f} ms; "
              f"max |GPU - CPU| {np.abs(gpu.cpu().numpy() - closed).max():.1e}")


def candidates(poses: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A realistic candidate list: the 319 images nearest one place."""
    centre = rng.integers(len(poses))
    return np.argsort(np.hypot(*(poses[:, :2] - poses[centre, :2]).T))[:319]


def overlap_graph_on_msls(rng: np.random.Generator) -> None:
    path = SHARED / "msls_geometry" / "msls_amman_austin_melbourne_utm_heading_derived.npz"
    if not path.exists():
        print(f"(skipping the MSLS graph benchmark: {path} not found)")
        return
    z = np.load(path)
    poses = np.c_[z["melbourne_db_utm_en"], z["melbourne_db_heading_deg_derived"]]
    t_build, graph = timed(lambda: OverlapGraph.build(poses), repeat=1)
    pairs = (graph.matrix.nnz - len(poses)) // 2
    print(f"Overlap graph, MSLS Melbourne database ({len(poses)} images, real positions): built in {t_build:.2f} s, "
          f"{pairs} overlapping pairs ({pairs / len(poses):.1f} per image)")
    cand = candidates(poses, rng)
    t_lookup, lut = timed(lambda: graph.lookup(cand, cand[:127]), repeat=5)
    t_direct, direct = timed(lambda: fov_overlap(poses[cand][:, None], poses[cand[:127]][None]))
    print(f"319x127 candidate affinities: graph lookup {t_lookup * 1e3:.2f} ms, recomputed {t_direct * 1e3:.1f} ms "
          f"-> lookup {t_direct / t_lookup:.0f}x faster, identical to {np.abs(lut - direct).max():.1e} (float32)")
    q = np.c_[z["melbourne_q_utm_en"]]
    t_pos, pos = timed(lambda: positives_within(q, poses[:, :2], 25.0))
    with_pos = sum(p.size > 0 for p in pos)
    print(f"Positives within 25 m for {len(q)} Melbourne queries: {t_pos * 1e3:.0f} ms, "
          f"{with_pos} queries have at least one ({np.mean([p.size for p in pos]):.1f} on average)")


def overlap_graph_of_a_million_images(rng: np.random.Generator) -> None:
    small = street_poses(5_000, rng)[0]
    small_graph = OverlapGraph.build(small)
    big = street_poses(1_000_000, rng)[0]
    rss = memory_gb()["VmRSS"] * 1024
    Path("/proc/self/clear_refs").write_text("5")        # resets VmHWM, the peak, to the current RSS
    t_build, graph = timed(lambda: OverlapGraph.build(big), repeat=1)
    m = graph.matrix
    stored = (m.data.nbytes + m.indices.nbytes + m.indptr.nbytes) / 2**20
    print(f"Overlap graph, synthetic road network of {len(big):,} images: built in {t_build:.1f} s, "
          f"{(m.nnz - len(big)) // 2:,} overlapping pairs, peak memory +{memory_gb()['VmHWM'] * 1024 - rss:.0f} MiB "
          f"for a {stored:.0f} MiB matrix")
    times = []
    for poses, g in ((small, small_graph), (big, graph)):
        cand = candidates(poses, rng)
        times.append(timed(lambda: g.lookup(cand, cand[:127]), repeat=20)[0])
    print(f"319x127 lookup: {times[0] * 1e3:.2f} ms on a {len(small):,}-image road network, {times[1] * 1e3:.2f} ms "
          f"on the {len(big):,}-image one")


def metrics_speed(rng: np.random.Generator) -> None:
    ranked = rng.integers(0, 1_000_000, (100_000, 20))
    positives = [rng.integers(0, 1_000_000, 5) for _ in range(100_000)]
    t, _ = timed(lambda: retrieval_metrics(ranked, positives), repeat=1)
    print(f"retrieval_metrics, 100,000 queries x top 20: {t:.2f} s")


def main() -> None:
    print(f"torch threads: {torch.get_num_threads()}, CUDA: {torch.cuda.is_available()}")
    rng = np.random.default_rng(0)
    overlap_graph_of_a_million_images(rng)      # first: its peak memory is measured from a lean process
    fov_accuracy_and_speed(rng)
    overlap_graph_on_msls(rng)
    metrics_speed(rng)


if __name__ == "__main__":
    main()
