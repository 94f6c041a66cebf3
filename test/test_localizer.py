"""The ROS-free Localizer on a synthetic town: poses close to the truth, honest covariances, GPS hints and
their fallbacks, re-ranker swaps, and refusals."""
import math

import cv2
import numpy as np
import pytest

import torch

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.descriptors.extract import DescriptorExtractor
from vpr_rerank_ros.geo import UtmZone, compass_to_grid, latlon_to_utm
from vpr_rerank_ros.images import read_rgb
from vpr_rerank_ros.localizer import Localizer, LocalizerSettings, distinctiveness
from vpr_rerank_ros.metrics import calibration
from vpr_rerank_ros.mapbuild import map_model
from vpr_rerank_ros.mapdb import MapBundle, MapTable
from vpr_rerank_ros.rerank import Reranker

from test_descriptors import small_model


@pytest.fixture(scope="module")
def localizer_and_queries(synthetic_map):
    root, report = synthetic_map
    query, _ = load_city(root / "msls", "synth0")
    localizer = Localizer(report.bundle, map_model(report.bundle), "none", LocalizerSettings(top_k=20))
    return localizer, query


def test_poses_are_close_and_covariances_honest(localizer_and_queries):
    """Every other query, as it is and darkened to 15 % (a night-like frame: some become ambiguous)."""
    localizer, query = localizer_and_queries
    errors, covariances, estimates, truths, ratios, matrices = [], [], [], [], [], []
    floor = localizer.settings.position_floor_m
    frames = [(i, rgb) for i in range(0, len(query), 2) for rgb in (read_rgb(query.image_path(i)),)]
    frames += [(i, cv2.convertScaleAbs(rgb, alpha=0.15)) for i, rgb in frames]
    for i, rgb in frames:
        result = localizer.localize(rgb, stamp=float(i))
        truth = latlon_to_utm(query.lat[i], query.lon[i], localizer.bundle.table.zone)[:2]
        errors.append(math.hypot(result.easting - float(truth[0]), result.northing - float(truth[1])))
        estimates.append((result.easting, result.northing))
        truths.append((float(truth[0]), float(truth[1])))
        ratios.append(result.distinctiveness)
        cov = result.position_covariance
        matrices.append(cov)
        assert np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() >= floor ** 2 - 1e-9
        assert result.heading_variance >= 100.0 and 0.0 <= result.confidence <= 1.0
        assert len(result.matches) == 20 and result.stamp == float(i)
        assert set(result.timings) == {"descriptor", "retrieval", "reranking", "pose"}
        east, north, _ = latlon_to_utm(result.lat, result.lon, localizer.bundle.table.zone)
        assert abs(float(east) - result.easting) < 0.01 and abs(float(north) - result.northing) < 0.01
        covariances.append(np.trace(cov))
    assert np.mean(np.array(errors[:len(frames) // 2]) <= 25.0) >= 0.6     # the frames as they are
    assert np.std(covariances) > 1.0                    # the uncertainty follows the matches, it is not a constant
    ratios, covariances = np.array(ratios), np.array(covariances)
    distinct = ratios >= localizer.settings.distinct_ratio
    ambiguous = ratios <= localizer.settings.ambiguous_ratio
    assert distinct.any() and ambiguous.any()
    assert covariances[ambiguous].min() > 100 * covariances[distinct].max()   # ambiguous: the candidates' spread
    honesty = calibration(np.array(estimates), np.array(truths), matrices)
    assert honesty["coverage95"] >= 0.85, honesty       # not overconfident (honest: 0.95) ...
    assert honesty["mean_nees"] >= 0.5, honesty         # ... nor ellipses far too wide (honest: 2)


def test_distinctiveness_is_a_ratio_test_between_places():
    sims = np.array([0.9, 0.5, 0.4, 0.3, 0.2, 0.1])
    elsewhere = np.array([False, True, True, True, True, True])
    ratio = distinctiveness(sims, 0.9, elsewhere)
    assert ratio == pytest.approx((0.9 - 0.35) / (0.5 - 0.35))
    assert distinctiveness(3.0 * sims - 1.0, 3.0 * 0.9 - 1.0, elsewhere) == pytest.approx(ratio)   # scale-free
    assert distinctiveness(sims, 0.9, np.zeros(6, bool)) == math.inf        # nothing elsewhere
    assert distinctiveness(np.array([0.5, 0.1, 0.1, 0.1]), 0.5, np.array([False, True, True, True])) == math.inf
    flat = np.full(4, 0.3)
    assert distinctiveness(flat, 0.3, np.array([False, True, True, True])) == 1.0   # all alike: ambiguous
    assert distinctiveness(sims, 0.5, np.array([True, False, True, True, True, True])) < 1.0   # a better rival


def test_gps_hint_restricts_and_falls_back(localizer_and_queries):
    localizer, query = localizer_and_queries
    image = read_rgb(query.image_path(0))
    near = localizer.localize(image, gps_hint=(query.lat[0], query.lon[0], 5.0))
    assert near.gps_used and not near.gps_fallback and near.gps_note == "GPS hint used"
    truth = latlon_to_utm(query.lat[0], query.lon[0], localizer.bundle.table.zone)[:2]
    assert all(math.hypot(m.easting - float(truth[0]), m.northing - float(truth[1])) <= 50 + 15 + 1e-6
               for m in near.matches)                   # within 50 m + 3 sigma
    far = localizer.localize(image, gps_hint=(query.lat[0] + 0.05, query.lon[0], 5.0))
    assert far.gps_fallback and not far.gps_used and "searched the whole map" in far.gps_note
    invalid = localizer.localize(image, gps_hint=(float("nan"), 13.0, 5.0))
    assert not invalid.gps_used and "invalid GPS hint" in invalid.gps_note


def test_refusals(localizer_and_queries, synthetic_map):
    localizer, _ = localizer_and_queries
    with pytest.raises(ValueError, match="does not match the map"):
        Localizer(synthetic_map[1].bundle, small_model())
    with pytest.raises(ValueError, match="uint8 RGB"):
        localizer.localize(np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="pose_matches"):
        LocalizerSettings(top_k=3, pose_matches=5)
    with pytest.raises(ValueError, match="has no parameter 'Q'"):
        localizer.set_reranker("superglobal", Q=1)


@pytest.fixture(scope="module")
def decoy_map(tmp_path_factory):
    """A map built around one image's descriptor d: a lone decoy A far away is the nearest neighbour of d
    (cosine 0.80), while three near-identical views B, C, D of the true place follow (cosine 0.78). Re-ranking
    by neighbourhood (SuperGlobal) must put the cluster first; the retrieval order keeps the decoy."""
    model = small_model()
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    d = DescriptorExtractor(model, "cpu").describe_arrays([image])[0].astype(np.float64)
    basis = np.linalg.qr(np.c_[d, np.random.default_rng(1).normal(size=(96, 12))])[0][:, 1:]   # orthogonal to d

    def at(similarity, direction):
        return similarity * d + math.sqrt(1 - similarity ** 2) * direction

    cluster = basis[:, 1] + 0.05 * basis[:, 2:5].T                        # three almost equal directions
    cluster /= np.linalg.norm(cluster, axis=1, keepdims=True)
    rows = [at(0.80, basis[:, 0])] + [at(0.78, c) for c in cluster]
    rows += [at(0.2, basis[:, 5 + i % 7] * (-1) ** i) for i in range(8)]  # unrelated images
    rows = np.array(rows, np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    n = len(rows)
    easting = 386000.0 + np.r_[900.0, 0.0, 4.0, 8.0, 300 + 20 * np.arange(8)]
    table = MapTable(keys=[f"img{i}" for i in range(n)], easting=easting, northing=np.full(n, 6174000.0),
                     heading=np.full(n, 90.0), zone=UtmZone(33))
    bundle = MapBundle.build(tmp_path_factory.mktemp("decoy") / "map", table, rows,
                             {"kind": "netvlad", "name": model.config.name, "identity": model.identity})
    return Localizer(bundle, model, "none", LocalizerSettings(top_k=n, pose_matches=1, device="cpu")), image


def test_a_reranker_swap_changes_the_order(decoy_map):
    localizer, image = decoy_map
    plain = [m.key for m in localizer.localize(image).matches]
    assert plain[0] == "img0" and set(plain[1:4]) == {"img1", "img2", "img3"}
    localizer.set_reranker("superglobal", P=1, beta=0.6)
    swapped = localizer.localize(image)
    assert swapped.matches[0].key in ("img1", "img2", "img3") and swapped.matches[3].key == "img0"
    assert swapped.easting < 386000.0 + 10                                  # the pose follows the true place
    localizer.use_reranker(localizer.prepare_reranker("none"))
    assert localizer.localize(image).matches[0].key == "img0"


class HeadingProbe(Reranker):
    """Records the query heading it is given (a geometry-using re-ranker that keeps the retrieval order)."""

    name = "heading_probe"
    uses_geometry = True

    def score(self, inputs):
        self.seen = inputs.query_heading
        return -torch.arange(inputs.k, dtype=torch.float32).expand(inputs.batch, -1)


def test_the_heading_hint_reaches_the_reranker_as_a_grid_heading(decoy_map):
    localizer, image = decoy_map
    probe = HeadingProbe()
    localizer.set_reranker(probe)
    localizer.localize(image, heading_hint=45.0)
    table = localizer.bundle.table
    expected = compass_to_grid(45.0, float(np.mean(table.lat)), float(np.mean(table.lon)), table.zone)
    assert probe.seen.shape == (1,) and probe.seen.item() == pytest.approx(float(expected))
    localizer.localize(image)
    assert math.isnan(probe.seen.item())                                   # no hint: unknown, not 0 or 0.5
    localizer.set_reranker("none")


def test_hint_from_fix():
    from types import SimpleNamespace

    from vpr_rerank_ros.localizer import hint_from_fix

    def fix(status=0, lat=55.7, lon=13.2, cov=4.0, cov_type=2):
        return SimpleNamespace(status=SimpleNamespace(status=status), latitude=lat, longitude=lon,
                               position_covariance=[cov] + [0.0] * 8, position_covariance_type=cov_type)

    assert hint_from_fix(fix()) == (55.7, 13.2, 2.0)
    assert hint_from_fix(fix(cov_type=0)) == (55.7, 13.2, 10.0)      # unknown covariance: default sigma
    assert hint_from_fix(fix(cov=0.0)) == (55.7, 13.2, 10.0)         # zero variance is not believed
    assert hint_from_fix(fix(status=-1)) is None                      # NO_FIX
    assert hint_from_fix(fix(lat=float("nan"))) is None
    assert hint_from_fix(fix(lat=91.0)) is None and hint_from_fix(fix(lon=-180.5)) is None


def test_the_camera_pose_becomes_the_vehicle_pose():
    """Localization.of_vehicle: a camera 2 m forward of a north-facing vehicle puts it 2 m south of the camera;
    1 m left of an east-facing one, 1 m south; a camera looking left (yaw 90) that faces north means the vehicle
    faces east. lat/lon follow; the covariance is the camera's."""
    import math

    from vpr_rerank_ros.geo import UtmZone, latlon_to_utm
    from vpr_rerank_ros.localizer import Localization

    zone = UtmZone(33)

    def at(heading):
        return Localization([], 386000.0, 6174000.0, heading, 55.7, 13.2, np.eye(2) * 4.0, 25.0, 1.0, False, False,
                            "", 1.0)

    north = at(0.0).of_vehicle(2.0, 0.0, 0.0, zone)
    assert math.isclose(north.easting, 386000.0, abs_tol=1e-9) and math.isclose(north.northing, 6173998.0)
    east = at(90.0).of_vehicle(0.0, 1.0, 0.0, zone)
    assert math.isclose(east.easting, 386000.0, abs_tol=1e-9) and math.isclose(east.northing, 6173999.0)
    turned = at(0.0).of_vehicle(0.0, 0.0, 90.0, zone)
    assert turned.heading == 90.0 and (turned.easting, turned.northing) == (386000.0, 6174000.0)
    e, n, _ = latlon_to_utm(north.lat, north.lon, zone)
    assert math.isclose(float(e), north.easting, abs_tol=1e-6) and math.isclose(float(n), north.northing, abs_tol=1e-6)
    assert np.array_equal(north.position_covariance, np.eye(2) * 4.0)


def test_geometric_verification_reorders_only_when_its_trigger_fires(synthetic_map, synthetic_map_with_features):
    """With geometric verification the localizer extracts the query's features once, verifies the top N and keeps
    the re-ranked order unless the trigger fires; a top match with few inliers widens the covariance and lowers
    the confidence, one with at least min_inliers leaves them as they were. A map without local features is
    refused."""
    from vpr_rerank_ros.geometric import GeometricSettings
    from vpr_rerank_ros.mapdb import MapError

    root, report = synthetic_map
    bundle, model = synthetic_map_with_features, map_model(synthetic_map_with_features)
    query, _ = load_city(root / "msls", "synth0")
    settings = LocalizerSettings(top_k=20, device="cpu")
    plain = Localizer(bundle, model, "none", settings)
    # The test town's 320x240 views give the right place 10-100 inliers: a low trigger lets it fire on a few
    geometric = GeometricSettings(top_n=10, min_inliers=10, min_margin=3, weight=0.3)
    checked = Localizer(bundle, model, "none", settings, geometric=geometric)
    outcomes = []
    images = [read_rgb(query.image_path(i)) for i in range(0, len(query), 2)]
    images += [cv2.convertScaleAbs(image, alpha=0.15) for image in images]   # darkened: few inliers
    for image in images:
        before, after = plain.localize(image), checked.localize(image)
        v = after.verification
        assert before.verification is None and len(v.inliers) == 10 and len(after.matches) == 20
        assert {"local_features", "verification"} <= set(after.timings)
        keys_before, keys_after = [m.key for m in before.matches], [m.key for m in after.matches]
        assert keys_after[10:] == keys_before[10:] and sorted(keys_after) == sorted(keys_before)
        assert v.changed_top1 == (keys_after[0] != keys_before[0])
        support = min(1.0, v.top_inliers / geometric.min_inliers)
        if not v.fired:                                     # same matches: only the geometric support differs
            assert keys_after == keys_before
            assert after.confidence == pytest.approx(support * before.confidence)
            assert np.trace(after.position_covariance) >= np.trace(before.position_covariance) - 1e-6
            if support == 1.0:
                assert np.allclose(after.position_covariance, before.position_covariance)
        outcomes.append((v.fired, v.changed_top1, support))
    fired, changed, support = map(np.array, zip(*outcomes))
    assert changed.any() and (fired & ~changed).any() and (~fired).any(), outcomes
    assert (support < 1).any() and (support == 1).any(), outcomes
    with pytest.raises(MapError, match="has no local features for geometric verification"):
        Localizer(report.bundle, model, "none", settings, geometric=GeometricSettings())
    checked.set_geometric(None)
    assert checked.localize(read_rgb(query.image_path(0))).verification is None
