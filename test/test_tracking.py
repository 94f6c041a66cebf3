"""The temporal filter on synthetic drives: it fuses honest estimates, gates outliers, restarts after a
kidnapping or a long gap, and takes odometry velocities when given."""
import numpy as np
import pytest

from vpr_rerank_ros.metrics import calibration, localization_errors
from vpr_rerank_ros.tracking import FilterSettings, PoseFilter


def drive(n=400, dt=0.5, speed=10.0, sigma=5.0, outliers=0.1, seed=0):
    """A drive along a gentle curve: truth, estimates with honest sigma-5 m noise and a share of wild outliers
    (a wrong place hundreds of metres away, reported with the same confident covariance)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) * dt
    heading = 0.002 * t ** 1.5
    truth = np.cumsum(np.c_[np.cos(heading), np.sin(heading)] * speed * dt, axis=0)
    estimates = truth + rng.normal(0, sigma, (n, 2))
    wild = rng.random(n) < outliers
    estimates[wild] += rng.uniform(150, 600, (wild.sum(), 1)) * np.c_[np.cos(rng.uniform(0, 6.3, wild.sum())),
                                                                        np.sin(rng.uniform(0, 6.3, wild.sum()))]
    return t, truth, estimates, np.tile(np.eye(2) * sigma ** 2, (n, 1, 1)), wild


def run(f, t, estimates, covariances, velocities=None):
    out = [f.update(t[i], estimates[i], covariances[i], None if velocities is None else velocities[i])
           for i in range(len(t))]
    return out, np.array([o.xy for o in out]), np.array([o.covariance for o in out])


def test_outliers_are_gated_and_errors_shrink():
    t, truth, estimates, cov, wild = drive()
    results, xy, filtered_cov = run(PoseFilter(), t, estimates, cov)
    raw, filtered = localization_errors(estimates, truth), localization_errors(xy, truth)
    assert filtered["p95"] <= raw["p95"] / 2 and filtered["max"] <= raw["max"] / 3
    assert filtered["median"] <= raw["median"]
    rejected = np.array([not r.accepted for r in results])
    assert rejected[wild].mean() > 0.9 and rejected[~wild].mean() < 0.05
    # The filter's own covariance stays honest on this drive.
    coverage = calibration(xy, truth, filtered_cov)["coverage95"]
    assert 0.85 <= coverage <= 0.995, coverage


def test_a_kidnapped_vehicle_is_found_again():
    t, truth, estimates, cov, _ = drive(outliers=0.0, seed=1)
    truth[200:] += [800.0, -300.0]                 # moved: every estimate from frame 200 on is far away
    estimates[200:] += [800.0, -300.0]
    results, xy, _ = run(PoseFilter(FilterSettings(restart_after=4)), t, estimates, cov)
    restarts = [i for i, r in enumerate(results) if r.restarted]
    assert restarts == [0, 203]                    # the first estimate, then the 4th rejection in a row
    assert np.hypot(*(xy[210:] - truth[210:]).T).max() < 25.0


def test_a_long_gap_restarts_and_time_must_not_go_back():
    f = PoseFilter(FilterSettings(max_gap_s=5.0))
    assert f.update(0.0, [0.0, 0.0], np.eye(2)).restarted
    assert not f.update(1.0, [1.0, 0.0], np.eye(2)).restarted
    assert f.update(10.0, [500.0, 0.0], np.eye(2)).restarted
    with pytest.raises(ValueError, match="time order"):
        f.update(9.0, [500.0, 0.0], np.eye(2))
    with pytest.raises(ValueError, match="finite"):
        f.update(11.0, [np.nan, 0.0], np.eye(2))
    with pytest.raises(ValueError, match="restart_after"):
        FilterSettings(restart_after=0)


def test_odometry_velocities_carry_the_estimate_through_a_turn():
    """A sharp turn the constant-velocity model cannot know of: given the true velocity, the filter follows."""
    dt, n = 0.5, 80
    t = np.arange(n) * dt
    heading = np.where(t < 20, 0.0, np.pi / 2)
    velocity = np.c_[np.cos(heading), np.sin(heading)] * 10.0
    truth = np.cumsum(velocity * dt, axis=0)
    estimates = truth + np.random.default_rng(2).normal(0, 5.0, (n, 2))
    cov = np.tile(np.eye(2) * 25.0, (n, 1, 1))
    _, plain, _ = run(PoseFilter(), t, estimates, cov)
    _, odometry, _ = run(PoseFilter(), t, estimates, cov, [(v, np.eye(2) * 0.25) for v in velocity])
    after_turn = slice(40, 50)
    assert np.hypot(*(odometry - truth)[after_turn].T).mean() < np.hypot(*(plain - truth)[after_turn].T).mean()
    assert np.hypot(*(odometry - truth)[10:].T).max() < 10.0


@pytest.mark.parametrize("heading_deg, expected", [(0.0, (0.0, 10.0)), (90.0, (10.0, 0.0)), (180.0, (0.0, -10.0)),
                                                   (225.0, (-10 / np.sqrt(2), -10 / np.sqrt(2)))])
def test_a_body_velocity_is_rotated_by_the_vehicle_heading_into_the_map(heading_deg, expected):
    """10 m/s forward: north for a vehicle heading north (compass 0), east for one heading east (compass 90)."""
    from vpr_rerank_ros.tracking import body_velocity_to_map

    velocity, covariance = body_velocity_to_map(10.0, 0.0, np.zeros((2, 2)), heading_deg, 0.0)
    np.testing.assert_allclose(velocity, expected, atol=1e-9)
    np.testing.assert_allclose(covariance, np.zeros((2, 2)), atol=1e-12)
    left, _ = body_velocity_to_map(0.0, 2.0, np.zeros((2, 2)), heading_deg, 0.0)   # y is left: 90 deg CCW
    np.testing.assert_allclose(left, np.array([-expected[1], expected[0]]) / 5, atol=1e-9)


def test_the_heading_uncertainty_widens_the_velocity_across_the_direction_of_travel():
    from vpr_rerank_ros.tracking import body_velocity_to_map

    body = np.diag([0.04, 0.01])                                      # forward sigma 0.2, left 0.1 m/s
    _, covariance = body_velocity_to_map(10.0, 0.0, body, 90.0, 100.0)  # heading east, sigma 10 deg
    across = (10.0 * np.radians(10.0)) ** 2
    np.testing.assert_allclose(covariance, np.diag([0.04, 0.01 + across]), atol=1e-9)
    rng = np.random.default_rng(0)                                    # the first-order spread, by sampling
    headings = 90.0 + rng.normal(0, 10.0, 20000)
    samples = np.array([body_velocity_to_map(10.0, 0.0, np.zeros((2, 2)), h, 0.0)[0] for h in headings])
    assert abs(samples[:, 1].var() - across) < 0.1 * across
