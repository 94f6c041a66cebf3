"""The reference k-reciprocal re-ranking that `k_reciprocal` is both checked and timed against, in one place:
benchmarks/rerank.py imports it (it runs from this folder) and test/test_rerank_classic.py loads it by its path,
so the benchmark never depends on the test suite and the test checks exactly what the benchmark times.

`re_ranking` is k-reciprocal re-ranking (Zhong et al., CVPR 2017) as the authors' Python version
(zhunzhong07/person-re-ranking, python-version/re_ranking_ranklist.py) computes it: written here from the
paper and that code's algorithm, not copied. It keeps the reference's input convention (probe-gallery,
probe-probe and gallery-gallery Euclidean distances), its float32 arithmetic (the feature-input version's
float16 would change orders) and its computational structure (numpy with Python loops over every probe and
gallery item, per-item intersections and unions of index arrays, an inverted index for the Jaccard distance),
so that timing it times what users compare against."""
from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def distance_matrices(probe: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`re_ranking`'s inputs for (P, D) probe and (G, D) gallery features: the probe-gallery, probe-probe and
    gallery-gallery Euclidean distances, computed as its users do (scipy's cdist)."""
    return cdist(probe, gallery), cdist(probe, probe), cdist(gallery, gallery)


def _reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """R(i, k): those of i's k + 1 nearest (i itself included) that have i among their own k + 1 nearest."""
    forward = rank[i, :k + 1]
    backward = rank[forward, :k + 1]
    return forward[np.where(backward == i)[0]]


def re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3) -> np.ndarray:
    """(num_probe, num_gallery) final distances (smaller = better) from the three Euclidean distance matrices."""
    num_probe = q_g_dist.shape[0]
    dist = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]])
    dist = np.power(dist, 2).astype(np.float32)
    dist = np.transpose(dist / np.max(dist, axis=0))          # item i's squared distances over their maximum
    num = dist.shape[0]
    rank = np.argsort(dist).astype(np.int32)
    v = np.zeros_like(dist)
    half = int(np.around(k1 / 2.0))
    for i in range(num):                                      # encode every item by its expanded R(i, k1)
        neighbours = _reciprocal(rank, i, k1)
        expansion = neighbours
        for j in neighbours:
            candidate = _reciprocal(rank, j, half)
            if len(np.intersect1d(candidate, neighbours)) > 2.0 / 3.0 * len(candidate):
                expansion = np.append(expansion, candidate)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    if k2 != 1:                                               # local query expansion over the k2 nearest
        expanded = np.zeros_like(v)
        for i in range(num):
            expanded[i] = np.mean(v[rank[i, :k2]], axis=0)
        v = expanded
    holders = [np.where(v[:, column] != 0)[0] for column in range(num)]   # inverted index: who uses each item
    jaccard = np.zeros((num_probe, num), dtype=np.float32)
    for i in range(num_probe):                                # sum of minima over the probe's non-zero entries
        overlap = np.zeros(num, dtype=np.float32)
        for column in np.where(v[i] != 0)[0]:
            rows = holders[column]
            overlap[rows] += np.minimum(v[i, column], v[rows, column])
        jaccard[i] = 1 - overlap / (2.0 - overlap)
    final = jaccard * (1 - lambda_value) + dist[:num_probe] * lambda_value
    return final[:, num_probe:]
