"""Spatial verification (vpr_rerank_ros/geometric.py) on the CPU. First the matcher: mutual nearest neighbours +
ratio test between two sets of 2000 RootSIFT descriptors, as geometric.match does it (NumPy matrix product)
against torch, faiss (IndexFlatIP both ways) and OpenCV's BFMatcher doing the same. Then the per-frame latency
of verifying the top N = 5, 10, 20, 50 candidates (match + MAGSAC fundamental matrix each) with the map's SIFT
features precomputed, on rendered synthetic-town views at 320x240 and 640x480, sequential and in 2 threads;
the query's own SIFT extraction (once per frame) is timed beside it. Issue target: <= 100 ms at N = 20.
The verifier runs NumPy's BLAS on one thread itself (threadpoolctl; candidates are the parallel axis), whatever
OPENBLAS_NUM_THREADS says; `--blas-threads` leaves BLAS its default threads inside the verifier, to measure what
that limit saves."""
from __future__ import annotations

import argparse
import contextlib

import cv2
import faiss
import numpy as np
import torch
from threadpoolctl import threadpool_limits
from timing import best_time

from vpr_rerank_ros import geometric
from vpr_rerank_ros.datasets.street_render import Condition, StreetRenderer
from vpr_rerank_ros.datasets.synth_town import route_poses
from vpr_rerank_ros.datasets.town import TownConfig, generate_town
from vpr_rerank_ros.geometric import Features, GeometricSettings, GeometricVerifier, match

RATIO = 0.8
NS = (5, 10, 20, 50)
QUERIES = 6
# width, height, SIFT's most features and contrast threshold (0.02 lets 640x480 views reach 2000 features)
SETUPS = ((320, 240, 1000, 0.04), (640, 480, 1000, 0.04), (640, 480, 2000, 0.02))
QUERY_CONDITIONS = (Condition(), Condition(time="dusk", weather="overcast"), Condition(season="autumn"))


def best_ms(fn, repeat: int = 5) -> float:
    return 1e3 * best_time(fn, repeat)


def root_sift_features(sift, rgb: np.ndarray) -> Features:
    """RootSIFT (L1-normalise, square root) features of an RGB image."""
    keypoints, descriptors = sift.detectAndCompute(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), None)
    root = np.sqrt(descriptors / np.maximum(descriptors.sum(1, keepdims=True), 1e-12))
    return Features.from_arrays(np.array([k.pt for k in keypoints]).reshape(-1, 2), root)


def street_views(width: int, height: int) -> tuple[StreetRenderer, np.ndarray, np.ndarray]:
    """A town's renderer and map poses every 4 m along a route of several streets (positions, headings)."""
    town = generate_town(TownConfig(blocks_x=3, blocks_y=3), 7)
    points, headings = route_poses(town, [0, 1, 2, 3, 7, 11], 4.0, 2.0)   # along the town's edge, then across
    return StreetRenderer(town, width, height), points, headings


# ------------------------------------------------------------------ matchers doing the same thing


def torch_match(query: Features, candidate: Features) -> int:
    similarity = torch.from_numpy(query.vectors) @ torch.from_numpy(candidate.vectors).T
    best, nearest = similarity.max(1)
    mutual = best >= similarity.amax(0)[nearest]
    similarity[torch.arange(len(query)), nearest] = -float("inf")
    second = similarity.amax(1)
    distance = lambda s: (2 - 2 * s).clamp_min(0).sqrt()   # noqa: E731
    return int((mutual & (distance(best) < RATIO * distance(second))).sum())


def faiss_match(query: Features, candidate: Features) -> int:
    forward, backward = faiss.IndexFlatIP(query.vectors.shape[1]), faiss.IndexFlatIP(query.vectors.shape[1])
    forward.add(candidate.vectors)
    backward.add(query.vectors)
    similarity, nearest = forward.search(query.vectors, 2)
    _, back = backward.search(candidate.vectors, 1)
    mutual = back[nearest[:, 0], 0] == np.arange(len(query))
    distance = np.sqrt(np.maximum(2 - 2 * similarity, 0))
    return int((mutual & (distance[:, 0] < RATIO * distance[:, 1])).sum())


def opencv_match(query: Features, candidate: Features) -> int:
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    back = {m.queryIdx: m.trainIdx for m in matcher.match(candidate.vectors, query.vectors)}
    return sum(1 for first, second in matcher.knnMatch(query.vectors, candidate.vectors, k=2)
               if back[first.trainIdx] == first.queryIdx and first.distance < RATIO * second.distance)


def compare_matchers(renderer: StreetRenderer, points: np.ndarray, headings: np.ndarray) -> None:
    sift = cv2.SIFT_create(2000, contrastThreshold=0.02)
    query = root_sift_features(sift, renderer.render(points[3][0] + 1.0, points[3][1], headings[3] + 3.0, seed=1))
    candidate = root_sift_features(sift, renderer.render(*points[4], headings[4]))
    print(f"Matcher: mutual nearest neighbours + ratio {RATIO}, {len(query)} x {len(candidate)} RootSIFT descriptors, "
          "one thread each as in the verifier's workers")
    threads = torch.get_num_threads(), faiss.omp_get_max_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    cv2.setNumThreads(1)
    with threadpool_limits(1, "blas"):
        for name, fn in (("numpy matmul (geometric.match)", lambda: len(match(query, candidate, RATIO))),
                         ("torch matmul", lambda: torch_match(query, candidate)),
                         ("faiss IndexFlatIP, both ways", lambda: faiss_match(query, candidate)),
                         ("OpenCV BFMatcher knn + match", lambda: opencv_match(query, candidate))):
            print(f"  {name:32s} {best_ms(fn):7.1f} ms  ({fn()} matches)")
    torch.set_num_threads(threads[0])
    faiss.omp_set_num_threads(threads[1])
    cv2.setNumThreads(threads[2])


# ------------------------------------------------------------------ per-frame verification latency


def verification_latency(width: int, height: int, features: int, contrast: float) -> None:
    renderer, points, headings = street_views(width, height)
    sift = cv2.SIFT_create(features, contrastThreshold=contrast)
    map_features = [root_sift_features(sift, renderer.render(*p, h, seed=i))
                    for i, (p, h) in enumerate(zip(points, headings))]
    rng = np.random.default_rng(0)
    rows = rng.choice(np.arange(len(points)), QUERIES, replace=False)
    frames = [renderer.render(points[r][0] + rng.uniform(-1, 1), points[r][1] + rng.uniform(-1, 1),
                              headings[r] + rng.uniform(-5, 5), QUERY_CONDITIONS[i % len(QUERY_CONDITIONS)], seed=99 + i)
              for i, r in enumerate(rows)]
    extraction = np.median([best_ms(lambda: root_sift_features(sift, frame), 3) for frame in frames])
    queries = [root_sift_features(sift, frame) for frame in frames]
    sizes = [len(f) for f in map_features]
    print(f"\n{width}x{height}, SIFT <= {features} features (map: {len(map_features)} images, median "
          f"{np.median(sizes):.0f} features; queries median {np.median([len(q) for q in queries]):.0f}); "
          f"query extraction {extraction:.1f} ms per frame")
    print(f"  {'N':>3s} " + "".join(f"{f'{w} worker' + 's' * (w > 1):>22s}" for w in (1, 2)) + "   (median ms per frame, "
          "max in brackets; candidates = the N map images nearest the query)")
    for n in NS:
        cells = []
        for workers in (1, 2):
            verifier = GeometricVerifier(GeometricSettings(workers=workers))
            times = []
            for row, query in zip(rows, queries):
                nearest = np.argsort(np.hypot(*(points - points[row]).T))[:n]
                candidates = [map_features[i] for i in nearest]
                times.append(best_ms(lambda: verifier.inliers(query, candidates), 2))
            cells.append(f"{np.median(times):9.1f} ({np.max(times):6.1f})")
        print(f"  {n:3d} " + "".join(f"{c:>22s}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blas-threads", action="store_true",
                        help="leave NumPy's BLAS its default threads inside the verifier (what geometric.py avoids)")
    parser.add_argument("--latency-only", action="store_true", help="only the per-frame latency at 320x240")
    args = parser.parse_args()
    if args.blas_threads:   # the verifier's limit made a no-op
        geometric._thread_pools().limit = lambda *a, **k: contextlib.nullcontext()
    if not args.latency_only:
        compare_matchers(*street_views(640, 480))
    for setup in SETUPS[:1] if args.latency_only else SETUPS:
        verification_latency(*setup)


if __name__ == "__main__":
    main()
