"""Filtering a drive's position estimates over time: a Kalman filter on (x, y, vx, vy) with a constant-velocity
motion model (or velocities from odometry when given), Mahalanobis gating of each new estimate, and a restart at
the newest estimate after a run of rejections (the vehicle was moved, or the filter locked onto a wrong place).
Weak estimates (vaguer than `weak_sigma_m` and than `fuse_below` of the prediction) are not fused: a place that
is ambiguous stays ambiguous for many frames in a row, so their errors are not independent, and fusing them would
shrink the covariance without evidence. ROS-free: the node and the replay tool both use it. Positions are metres in one planar frame (UTM or ENU)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .geo import UtmZone, body_to_grid, utm_to_latlon
from .localizer import Localization
from .metrics import CHI2_2DOF_95


@dataclass(frozen=True)
class FilterSettings:
    """How much the vehicle may manoeuvre, which estimates are believed, and when to start over."""

    accel_sigma: float = 10.0          # m/s^2, random acceleration of the constant-velocity model (about 1 g)
    initial_speed_sigma: float = 15.0  # m/s, velocity uncertainty when the filter (re)starts
    gate: float = 4 * CHI2_2DOF_95     # squared Mahalanobis distance beyond which an estimate is rejected
    restart_after: int = 4             # consecutive rejections after which the filter restarts at the newest
    max_gap_s: float = 10.0            # a longer gap between estimates restarts the filter
    weak_sigma_m: float = 25.0         # an estimate vaguer than this (1-sigma, m) says its place is ambiguous ...
    fuse_below: float = 0.5            # ... and is not fused unless its variance is below this share of the prediction's

    def __post_init__(self) -> None:
        for name in ("accel_sigma", "initial_speed_sigma", "gate", "max_gap_s", "weak_sigma_m", "fuse_below"):
            if not getattr(self, name) > 0:
                raise ValueError(f"filter {name} must be positive, got {getattr(self, name)}")
        if self.restart_after < 1:
            raise ValueError(f"filter restart_after must be at least 1, got {self.restart_after}")


@dataclass
class Filtered:
    """The filter's state after one estimate: its position and covariance, and what it did with the estimate."""

    xy: np.ndarray                     # (2,) metres
    covariance: np.ndarray             # (2, 2) m^2
    accepted: bool                     # the estimate passed the gate and was fused
    restarted: bool                    # the filter started (again) at this estimate
    distance2: float                   # squared Mahalanobis distance of the estimate (NaN at a restart or weak)
    weak: bool = False                 # not fused: a weak estimate (FilterSettings.weak_sigma_m, fuse_below)


class PoseFilter:
    """Feed it each frame's estimate in time order with `update`; `velocity` (map-frame m/s with its 2x2
    covariance, e.g. from wheel odometry rotated into the map) replaces the constant-velocity guess."""

    def __init__(self, settings: FilterSettings = FilterSettings()) -> None:
        self.settings = settings
        self.state: np.ndarray | None = None      # (4,) x, y, vx, vy
        self.cov = np.zeros((4, 4))
        self.stamp = math.nan
        self.rejected = 0

    def update(self, stamp: float, xy, covariance, velocity: tuple | None = None) -> Filtered:
        xy, covariance = np.asarray(xy, dtype=np.float64), np.asarray(covariance, dtype=np.float64)
        if xy.shape != (2,) or covariance.shape != (2, 2) or not (np.isfinite(xy).all() and np.isfinite(stamp)):
            raise ValueError(f"need a finite stamp, a finite (2,) position and a (2, 2) covariance, got {xy}, "
                             f"{covariance.shape}")
        dt = stamp - self.stamp
        if self.state is None or not dt < self.settings.max_gap_s:
            return self._restart(stamp, xy, covariance)
        if dt < 0:
            raise ValueError(f"estimates must come in time order: {stamp} after {self.stamp}")
        self._predict(dt, velocity)
        self.stamp = stamp
        weak = max(2 * self.settings.weak_sigma_m ** 2, self.settings.fuse_below * np.trace(self.cov[:2, :2]))
        if np.trace(covariance) > weak:
            return Filtered(self.state[:2].copy(), self.cov[:2, :2].copy(), False, False, math.nan, weak=True)
        innovation = xy - self.state[:2]
        s = self.cov[:2, :2] + covariance
        distance2 = float(innovation @ np.linalg.solve(s, innovation))
        if distance2 > self.settings.gate:
            self.rejected += 1
            if self.rejected >= self.settings.restart_after:
                return self._restart(stamp, xy, covariance)
            return Filtered(self.state[:2].copy(), self.cov[:2, :2].copy(), False, False, distance2)
        gain = np.linalg.solve(s, self.cov[:2, :]).T                           # P H^T S^-1, (4, 2)
        self.state = self.state + gain @ innovation
        self.cov = self.cov - gain @ self.cov[:2, :]
        self.cov = (self.cov + self.cov.T) / 2
        self.rejected = 0
        return Filtered(self.state[:2].copy(), self.cov[:2, :2].copy(), True, False, distance2)

    def _predict(self, dt: float, velocity: tuple | None) -> None:
        if velocity is not None:
            v, v_cov = (np.asarray(x, dtype=np.float64) for x in velocity)
            self.state[2:], self.cov[2:, :], self.cov[:, 2:] = v, 0.0, 0.0
            self.cov[2:, 2:] = v_cov
        transition = np.eye(4)
        transition[0, 2] = transition[1, 3] = dt
        q = self.settings.accel_sigma ** 2
        block = q * np.array([[dt ** 3 / 3, dt ** 2 / 2], [dt ** 2 / 2, dt]])
        noise = np.kron(block, np.eye(2))                                      # x, y independent
        self.state = transition @ self.state
        self.cov = transition @ self.cov @ transition.T + noise

    def _restart(self, stamp: float, xy: np.ndarray, covariance: np.ndarray) -> Filtered:
        self.state = np.r_[xy, 0.0, 0.0]
        self.cov = np.zeros((4, 4))
        self.cov[:2, :2] = covariance
        self.cov[2:, 2:] = np.eye(2) * self.settings.initial_speed_sigma ** 2
        self.stamp, self.rejected = stamp, 0
        return Filtered(xy.copy(), covariance.copy(), True, True, math.nan)


def body_velocity_to_map(forward: float, left: float, covariance, heading_deg: float,
                         heading_variance: float) -> tuple[np.ndarray, np.ndarray]:
    """A velocity in the vehicle's body frame (REP-103: x forward, y left; m/s with its 2x2 covariance, as an
    Odometry twist) as the filter takes it, in the map's grid (x east, y north), for a vehicle whose grid heading
    is `heading_deg` (compass degrees) known to `heading_variance` deg^2: rotated by the heading, whose uncertainty
    adds variance across the direction of travel (first order)."""
    rotation = body_to_grid(heading_deg)
    body = np.array([forward, left], dtype=np.float64)
    across = np.array([[0.0, -1.0], [1.0, 0.0]]) @ rotation @ body          # d(rotation @ body) / d(yaw)
    covariance = rotation @ np.asarray(covariance, dtype=np.float64) @ rotation.T
    return rotation @ body, covariance + math.radians(math.sqrt(heading_variance)) ** 2 * np.outer(across, across)


def track(tracker: PoseFilter, result: Localization, zone: UtmZone,
          velocity: tuple | None = None) -> tuple[Localization, Filtered]:
    """A localizer's `result` as the filter sees it after fusing it: the filter's position (lat/lon follow, in the
    map's `zone`) and covariance; heading, matches and the rest stay the frame's own. `velocity`: the vehicle's
    map-grid velocity and its covariance since the previous estimate (`body_velocity_to_map`), None for the
    constant-velocity guess. The one place where the node and the replay apply the filter."""
    filtered = tracker.update(result.stamp, (result.easting, result.northing), result.position_covariance, velocity)
    lat, lon = utm_to_latlon(filtered.xy[0], filtered.xy[1], zone)
    return replace(result, easting=float(filtered.xy[0]), northing=float(filtered.xy[1]), lat=float(lat),
                   lon=float(lon), position_covariance=filtered.covariance), filtered
