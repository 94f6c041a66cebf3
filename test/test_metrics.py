"""Recall@k / mAP@k as the MSLS challenge defines them, positives from positions, localisation errors."""
import numpy as np
import pytest

from vpr_rerank_ros.metrics import localization_errors, positives_within, retrieval_metrics


def reference_apk(actual, predicted, k):
    """AP@k written out loop by loop (the MSLS challenge's definition)."""
    predicted = list(predicted)[:k]
    score, hits = 0.0, 0
    for i, p in enumerate(predicted):
        if p in actual and p not in predicted[:i]:
            hits += 1
            score += hits / (i + 1)
    return score / min(len(actual), k)


def test_hand_computed_example():
    ranked = [[7, 3, 9, 1], [5, 6, 8, 2], [4, 4, 2, 0]]
    positives = [{3, 1}, {2}, {4, 0}]
    m = retrieval_metrics(ranked, positives, ks=(1, 2, 4))
    # q0: hits at ranks 2 and 4 -> AP@4 = (1/2 + 2/4)/2; q1: hit at 4 -> 1/4; q2: 4 at rank 1, its repeat
    # at rank 2 does not count, 0 at rank 4 -> (1 + 2/4)/2.
    assert m["map@4"] == pytest.approx(((0.5 + 0.5) / 2 + 0.25 + (1 + 0.5) / 2) / 3)
    assert m["map@1"] == pytest.approx(1 / 3) and m["recall@1"] == pytest.approx(1 / 3)
    assert m["map@2"] == pytest.approx((0.5 / 2 + 0 + 1 / 2) / 3)
    assert m["recall@2"] == pytest.approx(2 / 3) and m["recall@4"] == 1.0
    assert m["queries"] == 3 and m["queries_without_positives"] == 0


def test_matches_reference_on_random_lists():
    rng = np.random.default_rng(1)
    q = 1500
    ranked = [rng.integers(0, 50, rng.integers(0, 25)).tolist() for _ in range(q)]
    positives = [set(rng.integers(0, 50, rng.integers(0, 6)).tolist()) for _ in range(q)]
    m = retrieval_metrics(ranked, positives)
    scored = [i for i in range(q) if positives[i]]
    assert m["queries"] == len(scored) and m["queries_without_positives"] == q - len(scored)
    for k in (1, 5, 10, 20):
        assert m[f"map@{k}"] == pytest.approx(np.mean([reference_apk(positives[i], ranked[i], k) for i in scored]))
        hit = [any(p in positives[i] for p in ranked[i][:k]) for i in scored]
        assert m[f"recall@{k}"] == pytest.approx(np.mean(hit))


def test_string_ids_and_ndarray_input_agree():
    rng = np.random.default_rng(2)
    ranked = rng.integers(0, 100, (200, 20))
    positives = [rng.integers(0, 100, 3) for _ in range(200)]
    as_str = retrieval_metrics([[f"key{x}" for x in r] for r in ranked], [[f"key{x}" for x in p] for p in positives])
    assert as_str == retrieval_metrics(ranked, positives)


def test_queries_without_positives_are_excluded():
    m = retrieval_metrics([[1, 2], [1, 2]], [{2}, set()], ks=(1, 2))
    assert m["queries"] == 1 and m["map@2"] == pytest.approx(0.5) and m["recall@1"] == 0.0
    empty = retrieval_metrics([[1]], [set()], ks=(1,))
    assert empty["queries"] == 0 and np.isnan(empty["map@1"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="queries"):
        retrieval_metrics([[1]], [{1}, {2}])
    with pytest.raises(ValueError, match="positive"):
        retrieval_metrics([[1]], [{1}], ks=(0,))


def test_positives_within_matches_brute_force():
    rng = np.random.default_rng(4)
    map_xy = rng.uniform(0, 300, (800, 2))
    query_xy = rng.uniform(0, 300, (120, 2))
    pos = positives_within(query_xy, map_xy, radius=25.0)
    dist = np.linalg.norm(query_xy[:, None] - map_xy[None], axis=-1)
    for q in range(120):
        assert np.array_equal(pos[q], np.flatnonzero(dist[q] <= 25.0))
    qh, mh = rng.uniform(0, 360, 120), rng.uniform(0, 360, 800)
    facing = positives_within(query_xy, map_xy, 25.0, qh, mh, max_heading_diff=40.0)
    for q in range(120):
        diff = np.abs((qh[q] - mh + 180) % 360 - 180)
        assert np.array_equal(facing[q], np.flatnonzero((dist[q] <= 25.0) & (diff < 40.0)))


def test_positives_within_errors():
    with pytest.raises(ValueError, match="NaN"):
        positives_within([[0.0, np.nan]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        positives_within([0.0, 0.0, 0.0], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="heading"):
        positives_within([[0.0, 0.0]], [[0.0, 0.0]], max_heading_diff=40.0)
    assert [p.size for p in positives_within([[0.0, 0.0]], np.zeros((0, 2)))] == [0]


def test_localization_errors():
    true = np.zeros((10, 2))
    est = np.c_[np.arange(1, 11, dtype=float), np.zeros(10)]  # errors 1..10 m
    s = localization_errors(est, true, radii=(5, 10))
    assert s["median"] == 5.0 and s["p90"] == 9.0 and s["p95"] == 10.0 and s["max"] == 10.0
    assert s["within_5m"] == 0.5 and s["within_10m"] == 1.0 and s["missing"] == 0 and s["mean"] == 5.5
    est[9] = np.nan  # a frame without an estimate is a failure, not a skipped frame
    s = localization_errors(est, true, radii=(10,))
    assert s["missing"] == 1 and s["within_10m"] == 0.9 and s["max"] == np.inf
    with pytest.raises(ValueError, match="true positions"):
        localization_errors(est, np.full((10, 2), np.nan))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        localization_errors(est[:3], true)


def test_calibration_of_honest_too_small_and_too_large_covariances():
    """Errors drawn from the covariance itself cover the 95 % ellipse about 95 % of the time with mean NEES 2;
    covariances four times too small (errors twice their sigma) cover far less, four times too large far more."""
    from vpr_rerank_ros.metrics import CHI2_2DOF_95, calibration

    rng = np.random.default_rng(0)
    n = 20000
    a = rng.normal(size=(n, 2, 2))
    cov = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(2)               # random SPD covariances
    truth = rng.uniform(0, 1000, (n, 2))
    estimate = truth + np.einsum("nij,nj->ni", np.linalg.cholesky(cov), rng.normal(size=(n, 2)))
    honest = calibration(estimate, truth, cov)
    assert abs(honest["coverage95"] - 0.95) < 0.01 and abs(honest["mean_nees"] - 2.0) < 0.05
    small, large = calibration(estimate, truth, cov / 4), calibration(estimate, truth, cov * 4)
    # NEES scales by 4 and 1/4; P(chi-square(2) <= x) = 1 - exp(-x / 2).
    assert abs(small["coverage95"] - (1 - np.exp(-CHI2_2DOF_95 / 8))) < 0.01 and abs(small["mean_nees"] - 8.0) < 0.2
    assert large["coverage95"] > 0.999 and abs(large["mean_nees"] - 0.5) < 0.02
    estimate[0] = np.nan                                            # no estimate: left out, counted
    assert calibration(estimate, truth, cov)["frames_scored"] == n - 1
    with pytest.raises(ValueError, match="positive definite"):
        calibration(estimate[:2], truth[:2], np.zeros((2, 2, 2)))
