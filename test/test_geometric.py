"""Spatial verification (geometric.py): the matcher on constructed descriptors and against OpenCV, the fitter on
real and rendered images warped by a known homography and on rendered views of one place, degenerate inputs,
the combined score, the trigger, and the threaded verifier against the sequential one."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from vpr_rerank_ros.datasets.street_render import StreetRenderer
from vpr_rerank_ros.datasets.synth_town import route_poses
from vpr_rerank_ros.datasets.town import TownConfig, generate_town
from vpr_rerank_ros.geometric import (Features, GeometricSettings, GeometricVerifier, combined_scores, fit,
                                      geometric_order, geometric_settings, match, trigger_fires)
from vpr_rerank_ros.local_features import LocalFeatures

SIFT = cv2.SIFT_create(1000)
TRUE_H = np.array([[0.92, 0.08, 14.0], [-0.06, 0.95, 9.0], [1.2e-4, -0.8e-4, 1.0]])


def sift_features(rgb: np.ndarray) -> Features:
    keypoints, descriptors = SIFT.detectAndCompute(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), None)
    return Features.from_arrays(np.array([k.pt for k in keypoints]).reshape(-1, 2), descriptors)


@pytest.fixture(scope="module")
def street():
    """Renderer of a small town, and views every 4 m along one street (position, heading)."""
    town = generate_town(TownConfig(blocks_x=2, blocks_y=2), 5)
    points, headings = route_poses(town, [0, 1, 2], 4.0, 2.0)
    return StreetRenderer(town, 320, 240), points, headings


def view(street, index: int, dx: float = 0.0, dy: float = 0.0, turn: float = 0.0, seed: int = 0) -> np.ndarray:
    renderer, points, headings = street
    return renderer.render(points[index][0] + dx, points[index][1] + dy, headings[index] + turn, seed=seed)


@pytest.fixture(params=["rendered", "lund"])
def image(request, street):
    if request.param == "rendered":
        return view(street, 6)
    rgb = cv2.imread(str(request.getfixturevalue("shared_data") / "lund" / "05.jpg"))[..., ::-1]
    return cv2.resize(rgb, (640, 480), interpolation=cv2.INTER_AREA)


def corner_error(estimate: np.ndarray, truth: np.ndarray, width: int, height: int) -> float:
    """Largest distance (px) between where the two homographies send the image's corners."""
    corners = np.array([[[0, 0], [width, 0], [width, height], [0, height]]], np.float64)
    return float(np.abs(cv2.perspectiveTransform(corners, estimate) - cv2.perspectiveTransform(corners, truth)).max())


def test_homography_of_a_known_warp_is_recovered_and_an_unrelated_image_is_not(image, street):
    height, width = image.shape[:2]
    warped = cv2.warpPerspective(image, TRUE_H, (width, height))
    query, other = sift_features(image), sift_features(warped)
    pairs = match(query, other)
    result = fit(query.keypoints[pairs[:, 0]], other.keypoints[pairs[:, 1]], "homography")
    assert result.inliers >= 60 and result.inliers >= 0.6 * len(pairs), (result.inliers, len(pairs))
    assert corner_error(result.matrix / result.matrix[2, 2], TRUE_H, width, height) < 2.0
    truth = cv2.perspectiveTransform(query.keypoints[pairs[:, 0]][None].astype(np.float64), TRUE_H)[0]
    residual = np.linalg.norm(truth - other.keypoints[pairs[:, 1]], axis=1)
    assert (residual[result.mask] < 4.0).all()        # the inliers are true correspondences

    unrelated = sift_features(cv2.resize(view(street, 20, turn=180.0), (width, height)))
    pairs = match(query, unrelated)
    assert fit(query.keypoints[pairs[:, 0]], unrelated.keypoints[pairs[:, 1]], "homography").inliers < 15


def test_fundamental_matrix_separates_views_of_one_place_from_other_places(street):
    query = sift_features(view(street, 8, dx=1.0, dy=1.5, turn=3.0, seed=9))
    same, elsewhere = sift_features(view(street, 8)), sift_features(view(street, 20, turn=180.0))
    counts = []
    for candidate in (same, elsewhere):
        pairs = match(query, candidate)
        result = fit(query.keypoints[pairs[:, 0]], candidate.keypoints[pairs[:, 1]], "fundamental", threshold=2.0)
        counts.append(result.inliers)
        if result.inliers:        # the inliers lie near their epipolar lines F p in the candidate image
            p, q = (np.c_[f.keypoints[pairs[result.mask, i]], np.ones(result.inliers)]
                    for i, f in enumerate((query, candidate)))
            lines = p @ result.matrix.T
            assert (np.abs((q * lines).sum(1)) / np.hypot(lines[:, 0], lines[:, 1]) < 2 * 2.0).all()
    assert counts[0] >= 40 and counts[1] < 20, counts


def random_unit(rng: np.random.Generator, n: int, d: int = 64) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def points(n: int) -> np.ndarray:
    return np.zeros((n, 2), np.float32)


def test_mutual_nearest_neighbours_and_the_ratio_test_on_constructed_descriptors():
    rng = np.random.default_rng(0)
    base = random_unit(rng, 50)
    permutation = rng.permutation(50)
    noisy = base[permutation] + 0.02 * rng.normal(size=base.shape).astype(np.float32)
    pairs = match(Features.from_arrays(points(50), base), Features.from_arrays(points(50), noisy))
    assert len(pairs) == 50 and (permutation[pairs[:, 1]] == pairs[:, 0]).all()

    # Query 0's two nearest candidates are almost equally close: ambiguous under ratio 0.8, kept at 1.
    # Queries 1 and 2 share their nearest candidate (2): only the closer one, query 2, is its mutual neighbour.
    a, b, c = random_unit(rng, 3)
    query = np.stack([a, b, b + 0.004 * c])
    candidates = np.stack([a + 0.3 * b, a + 0.31 * b, b + 0.005 * c, c])
    q, k = Features.from_arrays(points(3), query * 7.0), Features.from_arrays(points(4), candidates)  # scale-free
    assert match(q, k).tolist() == [[2, 2]]
    assert match(q, k, ratio=1.0).tolist() == [[0, 0], [2, 2]]


def test_the_matcher_agrees_with_opencv_cross_check():
    rng = np.random.default_rng(1)
    a, b = random_unit(rng, 300, 128), random_unit(rng, 400, 128)
    b[:200] = a[rng.permutation(300)[:200]] + 0.1 * rng.normal(size=(200, 128)).astype(np.float32)
    b /= np.linalg.norm(b, axis=1, keepdims=True)     # as the matcher normalises them
    expected = sorted((m.queryIdx, m.trainIdx) for m in cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(a, b))
    got = match(Features.from_arrays(points(300), a), Features.from_arrays(points(400), b), ratio=1.0)
    assert [tuple(p) for p in got.tolist()] == expected


def test_binary_descriptors_are_matched_by_hamming_distance():
    rng = np.random.default_rng(2)
    query = rng.integers(0, 256, (1, 32), dtype=np.uint8)
    bits = np.unpackbits(query, axis=1)
    two, three, far = bits.copy(), bits.copy(), 1 - bits
    two[0, [0, 1]] ^= 1
    three[0, [5, 6, 7]] ^= 1
    candidates = np.packbits(np.vstack([far, three, two]), axis=1)
    q, k = Features.from_arrays(points(1), query, binary=True), Features.from_arrays(points(3), candidates, binary=True)
    # Hamming 2 against 3: ratio 0.67 passes 0.7 (an L2 ratio, sqrt(2/3) = 0.82, would not) and fails 0.6.
    assert match(q, k, ratio=0.7).tolist() == [[0, 2]]
    assert match(q, k, ratio=0.6).size == 0
    with pytest.raises(ValueError, match="different kinds"):
        match(q, Features.from_arrays(points(3), np.unpackbits(candidates, axis=1).astype(np.float32)))


def test_degenerate_inputs_give_no_inliers_and_no_exception():
    rng = np.random.default_rng(3)
    empty = Features.from_arrays(np.zeros((0, 2)), np.zeros((0, 128), np.float32))
    some = Features.from_arrays(rng.uniform(0, 300, (20, 2)), random_unit(rng, 20, 128))
    one = Features.from_arrays(points(1), some.vectors[:1])
    assert match(empty, some).shape == (0, 2) and match(some, empty).shape == (0, 2)
    assert match(some, one).tolist() == [[0, 0]]     # no second neighbour: the ratio test passes
    verifier = GeometricVerifier()
    assert verifier.verify(empty, some).inliers == 0 and verifier.verify(some, one).inliers == 0
    for model in ("homography", "fundamental"):
        few = fit(np.ones((3, 2)), np.ones((3, 2)), model)
        assert few.inliers == 0 and few.matrix is None and few.mask.shape == (3,)
        line = np.c_[np.arange(30.0), 2 * np.arange(30.0)]
        for p, q in ((np.ones((30, 2)), np.ones((30, 2))), (line, line + 5), (line, np.full((30, 2), np.nan))):
            result = fit(p, q, model)                # collinear, coincident or invalid points
            assert result.inliers == int(result.mask.sum()) and result.mask.shape == (30,)
    with pytest.raises(ValueError, match="model"):
        fit(line, line, "affine")


def test_the_combined_score_adds_geometry_to_the_global_similarity():
    settings = GeometricSettings(weight=0.1, half_inliers=50.0, min_inliers=30, min_margin=10)
    # Many inliers lift a close runner-up...
    assert combined_scores([0.80, 0.78, 0.70], [10, 200, 60], 0.1, 50.0).argmax() == 1
    assert geometric_order([0.80, 0.78, 0.70], [10, 200, 60], settings).order.tolist() == [1, 0, 2]
    # ...but never make up for a large gap in global similarity, whatever the count (the term is below `weight`).
    verification = geometric_order([0.90, 0.60], [40, 100_000], settings)
    assert verification.fired and verification.order.tolist() == [0, 1] and not verification.changed_top1
    # Equal evidence keeps the previous order; so does no evidence.
    assert geometric_order([0.5, 0.5, 0.49], [40, 40, 200], settings).order.tolist() == [2, 0, 1]
    np.testing.assert_allclose(combined_scores([0.3, 0.2], [0, 0], 0.1, 50.0), [0.3, 0.2])


def test_the_trigger_leaves_the_previous_order_when_evidence_is_weak():
    settings = GeometricSettings(min_inliers=30, min_margin=10)
    prior = np.array([0.700, 0.699, 0.698, 0.697, 0.696])
    assert not trigger_fires([12, 25, 29], 30, 10)          # weak: nobody reaches 30 inliers
    assert not trigger_fires([45, 52, 9], 30, 10)           # not decisive: 7 more than the previous top 1
    assert not trigger_fires([], 30, 10)
    assert trigger_fires([5, 80, 9], 30, 10) and trigger_fires([35, 45], 30, 10)
    kept = geometric_order(prior, [45, 52, 9], settings)    # the combined score alone would swap 0 and 1
    assert combined_scores(prior[:2], [45, 52], 0.1, 50.0).argmax() == 1
    assert not kept.fired and kept.order.tolist() == [0, 1, 2, 3, 4] and not kept.changed_top1
    moved = geometric_order(prior, [5, 80, 3], settings)    # only the first three verified: 3 and 4 stay put
    assert moved.fired and moved.changed_top1 and moved.order.tolist() == [1, 0, 2, 3, 4]
    assert (moved.top_inliers, moved.support(30), kept.top_inliers, kept.support(90)) == (80, 1.0, 45, 0.5)
    assert geometric_order(prior, [0, 3], settings).support(0) == 1.0    # no trigger threshold: no doubt
    with pytest.raises(ValueError, match="inlier counts"):
        geometric_order(prior[:2], [1, 2, 3], settings)
    with pytest.raises(ValueError, match="ratio"):
        GeometricSettings(ratio=1.5)


def test_settings_from_a_mapping_name_what_is_wrong():
    assert geometric_settings({"top_n": 5, "model": "homography"}) == GeometricSettings(top_n=5, model="homography")
    with pytest.raises(ValueError, match="no parameter 'topn' \\(it takes top_n, model, "):
        geometric_settings({"topn": 5})
    with pytest.raises(ValueError, match="geometric verification parameters .*'top_n': 'a'"):
        geometric_settings({"top_n": "a"})
    with pytest.raises(ValueError, match="min_inliers must be >= 0"):
        geometric_settings({"min_inliers": -1})


def test_features_of_an_extractors_output_are_float_or_binary_by_dtype():
    keypoints = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    sift = Features.of(LocalFeatures(keypoints, np.array([[3, 4], [0, 2]], np.float16), np.ones(2), (8, 8)))
    assert not sift.binary and np.allclose(sift.vectors, [[0.6, 0.8], [0, 1]])
    orb = Features.of(LocalFeatures(keypoints, np.array([[0b1010], [255]], np.uint8), np.ones(2), (8, 8)))
    assert orb.binary and orb.bits.tolist() == [2.0, 8.0] and orb.vectors.shape == (2, 8)


def test_threaded_verifier_equals_sequential_and_promotes_the_right_place(street):
    query = sift_features(view(street, 10, dx=-1.0, dy=1.0, turn=-4.0, seed=3))
    candidates = [sift_features(view(street, i)) for i in (2, 16, 10, 22, 5, 13)]   # the true place third
    sequential = GeometricVerifier(GeometricSettings(workers=1)).inliers(query, candidates)
    threaded = GeometricVerifier(GeometricSettings(workers=2)).inliers(query, candidates)
    np.testing.assert_array_equal(threaded, sequential)
    assert sequential.argmax() == 2, sequential

    prior = np.array([0.71, 0.70, 0.69, 0.68, 0.67, 0.66, 0.65])     # one more candidate than verified
    verification = GeometricVerifier(GeometricSettings(top_n=4)).rerank(query, candidates, prior)
    np.testing.assert_array_equal(verification.inliers, sequential[:4])
    assert verification.fired and verification.changed_top1 and verification.order[0] == 2
    assert sorted(verification.order[:4]) == [0, 1, 2, 3] and verification.order[4:].tolist() == [4, 5, 6]
