"""Retrieval and localisation metrics (docs/evaluation.md): Recall@k and mAP@k as the MSLS challenge defines
them, positives from positions, and statistics of localisation errors."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree

from .geo import heading_difference

DEFAULT_KS = (1, 5, 10, 20)     # the k of Recall@k / mAP@k in every table
POSITIVE_RADIUS_M = 25.0        # a map image within this distance of the query's position is a positive (MSLS)
RESULT_COLUMNS = ("map@1", "map@5", "map@10", "map@20", "recall@5", "recall@10", "recall@20")   # Table 4.1 layout


def ks_up_to(k: int) -> tuple[int, ...]:
    """The DEFAULT_KS that a ranking of `k` candidates can score."""
    return tuple(x for x in DEFAULT_KS if x <= k)


def retrieval_metrics(ranked: Sequence[Sequence], positives: Sequence, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Recall@k and mAP@k (fractions) over the queries that have at least one positive.

    `ranked[q]` is query q's ranked list of map ids (ints or strings; lists may differ in length),
    `positives[q]` a collection of its positive map ids. AP@k = Σ_{i≤k} y_i·P@i / min(k, n) with n the
    number of positives; an id repeated in a ranked list counts only at its first occurrence.
    Returns {'recall@k': .., 'map@k': .., 'queries': number scored, 'queries_without_positives': ..}.
    """
    if len(ranked) != len(positives):
        raise ValueError(f"ranked has {len(ranked)} queries but positives has {len(positives)}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    depth = ks[-1]
    ids, pos_q, pos_ids = _encode(ranked, positives, depth)
    n_pos = np.bincount(pos_q, minlength=len(ranked))
    scored = n_pos > 0
    hits = _first_hits(ids, pos_q, pos_ids)[scored]
    n_pos = n_pos[scored]
    result: dict = {}
    if hits.shape[0] == 0:
        for k in ks:
            result[f"recall@{k}"] = float("nan")
            result[f"map@{k}"] = float("nan")
    else:
        cum = np.cumsum(hits, axis=1)
        precision_terms = hits * cum / np.arange(1, depth + 1)
        ap_sums = np.cumsum(precision_terms, axis=1)
        for k in ks:
            result[f"recall@{k}"] = float((cum[:, k - 1] > 0).mean())
            result[f"map@{k}"] = float((ap_sums[:, k - 1] / np.minimum(k, n_pos)).mean())
    result["queries"] = int(scored.sum())
    result["queries_without_positives"] = int((~scored).sum())
    return result


def _encode(ranked, positives, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranked lists as a (Q, depth) int matrix padded with -1, positives as (query, id) pairs, ids shared."""
    q = len(ranked)
    rows = [list(r)[:depth] for r in ranked]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=q)
    flat_ranked = [x for r in rows for x in r]
    pos_lists = [list(p) for p in positives]
    pos_q = np.repeat(np.arange(q), [len(p) for p in pos_lists])
    flat_pos = [x for p in pos_lists for x in p]
    both = np.asarray(flat_ranked + flat_pos)
    if both.dtype.kind not in "iu":
        both = both.astype(str)
    codes = np.unique(both, return_inverse=True)[1].reshape(-1).astype(np.int64)
    ids = np.full((q, depth), -1, dtype=np.int64)
    ids[np.arange(depth)[None, :] < lengths[:, None]] = codes[:len(flat_ranked)]
    return ids, pos_q, codes[len(flat_ranked):]


def _first_hits(ids: np.ndarray, pos_q: np.ndarray, pos_ids: np.ndarray) -> np.ndarray:
    """(Q, depth) 1.0 where the id is a positive of its query and appears there for the first time."""
    q, depth = ids.shape
    span = int(max(ids.max(initial=0), pos_ids.max(initial=0))) + 2
    pair = (np.arange(q)[:, None] * span + ids + 1).ravel()
    is_pos = np.isin(pair, pos_q * span + pos_ids + 1).reshape(q, depth) & (ids >= 0)
    # First occurrence of each id in its row: sort the row stably and compare neighbours.
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    repeat_sorted = np.zeros_like(sorted_ids, dtype=bool)
    repeat_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    repeat = np.zeros_like(repeat_sorted)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    return (is_pos & ~repeat).astype(np.float64)


def positives_within(query_xy, map_xy, radius: float = POSITIVE_RADIUS_M, query_heading=None, map_heading=None,
                     max_heading_diff: float | None = None) -> list[np.ndarray]:
    """For each query, the sorted indices of map images within `radius` metres (KD-tree, no all-pairs matrix).

    With `max_heading_diff` (degrees; the MSLS paper uses 40), a positive must also face within that
    angle of the query; both headings are then required.
    """
    query_xy = _points(query_xy, "query_xy")
    map_xy = _points(map_xy, "map_xy")
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be positive, got {radius}")
    if len(map_xy) == 0:
        return [np.zeros(0, np.int64) for _ in range(len(query_xy))]
    neighbours = cKDTree(map_xy).query_ball_point(query_xy, r=radius, return_sorted=True)
    result = [np.asarray(n, dtype=np.int64) for n in neighbours]
    if max_heading_diff is None:
        return result
    if query_heading is None or map_heading is None:
        raise ValueError("max_heading_diff needs both query_heading and map_heading")
    qh = np.asarray(query_heading, dtype=np.float64)
    mh = np.asarray(map_heading, dtype=np.float64)
    if qh.shape != (len(query_xy),) or mh.shape != (len(map_xy),):
        raise ValueError("headings must have one value per query / map image")
    return [n[heading_difference(qh[i], mh[n]) < max_heading_diff] for i, n in enumerate(result)]


def _points(xy, name: str) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of easting, northing; got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError(f"{name} contains NaN or inf")
    return xy


RADII_M = (5.0, 10.0, 25.0)    # the within_<r>m shares that localisation reports give


def localization_errors(estimated_xy, true_xy, radii: Sequence[float] = RADII_M) -> dict:
    """Statistics of the planar distance between estimated and true positions, metres.

    Rows of `estimated_xy` that are NaN mean "no estimate for this frame": they count as failures
    (infinite error) in the percentiles and the within-radius fractions, and are reported as `missing`.
    True positions must be finite.
    """
    est = np.asarray(estimated_xy, dtype=np.float64)
    true = np.asarray(true_xy, dtype=np.float64)
    if est.shape != true.shape or est.ndim != 2 or est.shape[1] != 2:
        raise ValueError(f"estimated and true positions must both be (N, 2); got {est.shape} and {true.shape}")
    if not np.isfinite(true).all():
        raise ValueError("true positions contain NaN or inf")
    if len(est) == 0:
        raise ValueError("no positions to score")
    missing = ~np.isfinite(est).all(axis=1)
    errors = np.full(len(est), np.inf)
    errors[~missing] = np.linalg.norm(est[~missing] - true[~missing], axis=1)
    stats = {
        "frames": int(len(est)),
        "missing": int(missing.sum()),
        "mean": float(errors.mean()),
        "median": float(np.quantile(errors, 0.5, method="inverted_cdf")),
        "p90": float(np.quantile(errors, 0.9, method="inverted_cdf")),
        "p95": float(np.quantile(errors, 0.95, method="inverted_cdf")),
        "max": float(errors.max()),
    }
    for r in radii:
        stats[f"within_{r:g}m"] = float((errors <= r).mean())
    return stats


CHI2_2DOF_95 = 5.991464547107979      # P(chi-square with 2 degrees of freedom <= this) = 0.95


def calibration(estimated_xy, true_xy, covariances) -> dict:
    """How honest (N, 2, 2) position covariances are: `coverage95`, the fraction of frames whose true position
    lies inside the estimate's 95 % ellipse (about 0.95 when honest), and `mean_nees`, the mean normalised
    estimation error squared e^T S^-1 e (about 2, the dimension, when honest; larger: covariances too small).
    Frames without an estimate (NaN rows) are left out and counted in `frames_scored`."""
    est, true = np.asarray(estimated_xy, dtype=np.float64), _points(true_xy, "true_xy")
    cov = np.asarray(covariances, dtype=np.float64)
    if est.shape != true.shape or cov.shape != (len(true), 2, 2):
        raise ValueError(f"need (N, 2) estimates and truths and (N, 2, 2) covariances, got {est.shape}, "
                         f"{true.shape} and {cov.shape}")
    scored = np.isfinite(est).all(axis=1)
    if not scored.any():
        raise ValueError("no frame has an estimate")
    if not (np.allclose(cov[scored], cov[scored].transpose(0, 2, 1)) and
            (np.linalg.eigvalsh(cov[scored]).min(axis=1) > 0).all()):
        raise ValueError("covariances must be symmetric positive definite")
    scores = nees(est[scored], true[scored], cov[scored])
    return {"frames_scored": int(scored.sum()), "coverage95": float((scores <= CHI2_2DOF_95).mean()),
            "mean_nees": float(scores.mean())}


def nees(estimated_xy, true_xy, covariances) -> np.ndarray:
    """The normalised estimation error squared e^T S^-1 e of each (N, 2) estimate with its (N, 2, 2) covariance;
    the truth lies inside the estimate's 95 % ellipse when it is at most CHI2_2DOF_95."""
    error = np.asarray(estimated_xy, np.float64) - np.asarray(true_xy, np.float64)
    return np.einsum("ni,ni->n", error, np.linalg.solve(np.asarray(covariances, np.float64), error[..., None])[..., 0])
