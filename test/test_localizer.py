"""The ROS-free Localizer on a synthetic town: poses close to the truth, honest covariances, GPS hints and
their fallbacks, re-ranker swaps, and refusals."""
import math

import numpy as np
import pytest

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.geo import latlon_to_utm
from vpr_rerank_ros.images import read_rgb
from vpr_rerank_ros.localizer import Localizer, LocalizerSettings
from vpr_rerank_ros.mapbuild import map_model

from test_descriptors import small_model


@pytest.fixture(scope="module")
def localizer_and_queries(synthetic_map):
    root, report = synthetic_map
    query, _ = load_city(root / "msls", "synth0")
    localizer = Localizer(report.bundle, map_model(report.bundle), "none", LocalizerSettings(top_k=20))
    return localizer, query


def test_poses_are_close_and_covariances_honest(localizer_and_queries):
    localizer, query = localizer_and_queries
    errors, covariances = [], []
    for i in range(0, len(query), 2):
        result = localizer.localize(read_rgb(query.image_path(i)), stamp=float(i))
        truth = latlon_to_utm(query.lat[i], query.lon[i], localizer.bundle.table.zone)[:2]
        errors.append(math.hypot(result.easting - float(truth[0]), result.northing - float(truth[1])))
        cov = result.position_covariance
        assert np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() >= 25.0 - 1e-9   # floor 5 m
        assert result.heading_variance >= 100.0 and 0.0 <= result.confidence <= 1.0
        assert len(result.matches) == 20 and result.stamp == float(i)
        assert set(result.timings) == {"descriptor", "retrieval", "reranking", "pose"}
        east, north, _ = latlon_to_utm(result.lat, result.lon, localizer.bundle.table.zone)
        assert abs(float(east) - result.easting) < 0.01 and abs(float(north) - result.northing) < 0.01
        covariances.append(np.trace(cov))
    assert np.mean(np.array(errors) <= 25.0) >= 0.6
    assert np.std(covariances) > 1.0                    # the uncertainty follows the matches, it is not a constant


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


def test_reranker_swap_and_refusals(localizer_and_queries, synthetic_map):
    localizer, query = localizer_and_queries
    localizer.set_reranker("superglobal", P=1, beta=0.6)
    result = localizer.localize(read_rgb(query.image_path(1)))
    assert len(result.matches) == 20
    localizer.set_reranker("none")
    with pytest.raises(ValueError, match="does not match the map"):
        Localizer(synthetic_map[1].bundle, small_model())
    with pytest.raises(ValueError, match="uint8 RGB"):
        localizer.localize(np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="pose_matches"):
        LocalizerSettings(top_k=3, pose_matches=5)


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
