"""Geometry and metrics benchmark: fast vs exact FoV overlap, overlap-graph lookups vs recomputation, and
metric scoring speed, each measured side by side in one run. Uses ../shared/data when it is present."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from vpr_rerank_ros.geo import OverlapGraph, fov_overlap
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


def random_pairs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = np.c_[rng.uniform(0, 1000, (n, 2)) + [386000.0, 6174000.0], rng.uniform(0, 360, n)]
    d, ang = rng.uniform(0, 120, n), rng.uniform(0, 2 * np.pi, n)
    b = np.c_[a[:, :2] + np.c_[d * np.cos(ang), d * np.sin(ang)], rng.uniform(0, 360, n)]
    return a, b


def fov_accuracy_and_speed(rng: np.random.Generator) -> None:
    a, b = random_pairs(10_000, rng)
    exact = fov_overlap(a, b, exact=True)
    err = np.abs(fov_overlap(a, b) - exact)
    print(f"FoV overlap, 10,000 random pairs 0-120 m apart: fast vs exact max |error| {err.max():.4f}, "
          f"mean {err.mean():.5f}")
    k = np.c_[rng.uniform(0, 150, (320, 2)) + [386000.0, 6174000.0], rng.uniform(0, 360, 320)]
    rows, cols = k[:, None, :], k[None, :128, :]
    t_exact, m_exact = timed(lambda: fov_overlap(rows, cols, exact=True), repeat=1)
    t_fast, m_fast = timed(lambda: fov_overlap(rows, cols))
    print(f"320x128 matrix (all pairs within 150 m): exact {t_exact * 1e3:.0f} ms, fast {t_fast * 1e3:.1f} ms "
          f"-> {t_exact / t_fast:.0f}x faster, max |error| {np.abs(m_fast - m_exact).max():.4f}")
    if torch.cuda.is_available():
        rows_t, cols_t = torch.from_numpy(rows).cuda(), torch.from_numpy(cols).cuda()
        fov_overlap(rows_t, cols_t)
        torch.cuda.synchronize()
        t_gpu, _ = timed(lambda: (fov_overlap(rows_t, cols_t), torch.cuda.synchronize()))
        print(f"320x128 matrix on {torch.cuda.get_device_name()}: {t_gpu * 1e3:.2f} ms "
              f"-> {t_fast / t_gpu:.0f}x faster than this CPU")


def overlap_graph_on_msls() -> None:
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
    rng = np.random.default_rng(1)
    centre = rng.integers(len(poses))
    order = np.argsort(np.hypot(*(poses[:, :2] - poses[centre, :2]).T))
    cand = order[:319]  # a realistic candidate list: the 319 images nearest one place
    t_lookup, lut = timed(lambda: graph.lookup(cand, cand[:127]), repeat=5)
    t_direct, direct = timed(lambda: fov_overlap(poses[cand][:, None], poses[cand[:127]][None]))
    print(f"319x127 candidate affinities: graph lookup {t_lookup * 1e3:.2f} ms, recomputed {t_direct * 1e3:.1f} ms "
          f"-> lookup {t_direct / t_lookup:.0f}x faster, identical to {np.abs(lut - direct).max():.1e}")
    q = np.c_[z["melbourne_q_utm_en"]]
    t_pos, pos = timed(lambda: positives_within(q, poses[:, :2], 25.0))
    with_pos = sum(p.size > 0 for p in pos)
    print(f"Positives within 25 m for {len(q)} Melbourne queries: {t_pos * 1e3:.0f} ms, "
          f"{with_pos} queries have at least one ({np.mean([p.size for p in pos]):.1f} on average)")


def metrics_speed(rng: np.random.Generator) -> None:
    ranked = rng.integers(0, 1_000_000, (100_000, 20))
    positives = [rng.integers(0, 1_000_000, 5) for _ in range(100_000)]
    t, _ = timed(lambda: retrieval_metrics(ranked, positives), repeat=1)
    print(f"retrieval_metrics, 100,000 queries x top 20: {t:.2f} s")


def main() -> None:
    print(f"torch threads: {torch.get_num_threads()}, CUDA: {torch.cuda.is_available()}")
    rng = np.random.default_rng(0)
    fov_accuracy_and_speed(rng)
    overlap_graph_on_msls()
    metrics_speed(rng)


if __name__ == "__main__":
    main()
