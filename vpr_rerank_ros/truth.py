"""Ground truth of a replayed drive, as a track of positions in the map's UTM zone interpolated to camera stamps.

A bag's truth may be sensor_msgs/NavSatFix (an RTK receiver: latitude/longitude), or geometry_msgs/PoseStamped,
PoseWithCovarianceStamped or nav_msgs/Odometry whose positions are in UTM (frame_id 'utm_<zone>', or any frame
taken as the map's zone with `TruthFrame('utm')`) or in a local ENU frame at a datum (`TruthFrame('enu', datum)`).
It may run at any rate: positions are interpolated linearly in time to each camera stamp (the replay scores
positions only, so headings are not read); a frame outside the truth's time span has no truth.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bag import FIX_TYPE, TRUTH_TYPES, TYPESTORE, iter_bag, stamp_ns
from .geo import EnuFrame, UtmZone, latlon_to_utm, utm_to_latlon
from .localizer import hint_from_fix

FRAMES = ("utm", "enu")


@dataclass(frozen=True)
class TruthFrame:
    """How pose-typed truth positions are read. kind None: each message's frame_id must be 'utm_<zone>';
    'utm': a frame_id 'utm_<zone>' gives the zone, any other frame_id means the map's zone; 'enu': x east,
    y north, z up in metres from `datum` (lat, lon, alt)."""

    kind: str | None = None
    datum: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in (None, *FRAMES):
            raise ValueError(f"truth frame must be one of {FRAMES}, got {self.kind!r}")
        if (self.kind == "enu") != (self.datum is not None):
            raise ValueError("an ENU ground truth needs a datum (--truth-frame enu --datum LAT,LON), "
                             "and a datum is only used with --truth-frame enu")


@dataclass(frozen=True)
class TruthTrack:
    """Truth positions (easting, northing in the map's zone) at increasing stamps (ns)."""

    stamps: np.ndarray    # (N,) int64, strictly increasing
    xy: np.ndarray        # (N, 2)

    def covers(self, stamp: int) -> bool:
        """Whether `stamp` lies within the truth's time span (else the frame has no truth)."""
        return int(self.stamps[0]) <= stamp <= int(self.stamps[-1])

    def at(self, stamp: int) -> tuple[float, float]:
        """The position at a covered stamp, linear between the two neighbouring truth samples (found by bisection,
        so a long drive costs no more per frame than a short one)."""
        if len(self.stamps) == 1:
            return float(self.xy[0, 0]), float(self.xy[0, 1])
        i = int(np.clip(np.searchsorted(self.stamps, stamp), 1, len(self.stamps) - 1))
        before, after = int(self.stamps[i - 1]), int(self.stamps[i])
        f = min(max((stamp - before) / (after - before), 0.0), 1.0)   # integer ns first: exact over hours
        x, y = self.xy[i - 1] + f * (self.xy[i] - self.xy[i - 1])
        return float(x), float(y)

    def span(self) -> str:
        return f"{self.stamps[0] * 1e-9:.3f} s to {self.stamps[-1] * 1e-9:.3f} s"


def read_truth(path: str | Path, topic: str, msgtype: str, zone: UtmZone,
               frame: TruthFrame = TruthFrame()) -> TruthTrack:
    """The ground-truth topic of a bag as a track in `zone` (the map's). NavSatFix messages without a fix are
    left out; messages sharing a stamp keep the first. A ValueError when nothing usable is left."""
    if msgtype not in TRUTH_TYPES:
        raise ValueError(f"{path}: ground truth {topic} is a {msgtype}; usable types: {', '.join(TRUTH_TYPES)}")
    stamps, frame_ids, points = [], [], []
    for _, _, _, raw in iter_bag(path, {topic}):
        msg = TYPESTORE.deserialize_cdr(raw, msgtype)
        if msgtype == FIX_TYPE:
            hint = hint_from_fix(msg)
            if hint is None:
                continue
            point = hint[:2]
        else:
            position = _pose(msg, msgtype).position
            point = (position.x, position.y, position.z)
        stamps.append(stamp_ns(msg.header))
        frame_ids.append(msg.header.frame_id)
        points.append(point)
    if not stamps:
        raise ValueError(f"{path}: the ground truth {topic} has no usable message")
    if msgtype == FIX_TYPE:
        lat, lon = np.array(points).T
        east, north, _ = latlon_to_utm(lat, lon, zone)
        xy = np.stack([east, north], axis=1)
    else:
        xy = _pose_positions(np.array(points, np.float64), frame_ids, zone, frame, f"{path}: ground truth {topic}")
    stamps, first = np.unique(np.array(stamps, np.int64), return_index=True)
    return TruthTrack(stamps, xy[first])


def _pose(msg, msgtype: str):
    """The geometry_msgs/Pose of a PoseStamped, PoseWithCovarianceStamped or Odometry message."""
    return msg.pose if msgtype == "geometry_msgs/msg/PoseStamped" else msg.pose.pose


def _pose_positions(points: np.ndarray, frame_ids: list[str], zone: UtmZone, frame: TruthFrame,
                    what: str) -> np.ndarray:
    """(N, 2) easting, northing in `zone` of pose positions (x, y, z) read as `frame` says."""
    if frame.kind == "enu":
        lat, lon, _ = EnuFrame(*frame.datum).to_latlon(points[:, 0], points[:, 1], points[:, 2])
        east, north, _ = latlon_to_utm(lat, lon, zone)
        return np.stack([east, north], axis=1)
    xy = points[:, :2].copy()
    for frame_id in set(frame_ids):
        rows = np.array([f == frame_id for f in frame_ids])
        try:
            source = UtmZone.parse(frame_id.removeprefix("utm_")) if frame_id.startswith("utm_") else None
        except ValueError:
            source = None
        if source is None and frame.kind is None:
            raise ValueError(f"{what} is in frame {frame_id!r}, not 'utm_<zone>': give --truth-frame utm (the map's "
                             "zone) or --truth-frame enu --datum LAT,LON")
        if source is not None and source != zone:   # another zone: through latitude/longitude
            lat, lon = utm_to_latlon(xy[rows, 0], xy[rows, 1], source)
            east, north, _ = latlon_to_utm(lat, lon, zone)
            xy[rows] = np.stack([east, north], axis=1)
    return xy
