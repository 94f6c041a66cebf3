"""Bag replay scored against the bag's ground truth. `replay_bag` runs the Localizer offline (the node's code
path, without a ROS graph); `live_replay.replay_live` plays a bag to the running node. Both score their frames
here: localisation error statistics, Recall@k at 25 m and per-stage latency, formatted by `format_report`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bag import TYPESTORE, DriveTopics, TruthPose, iter_bag, read_drive_bag, stamp_ns
from .frames import GPS_MAX_AGE_S, fresh_fix
from .geo import UtmZone, latlon_to_utm, utm_to_latlon
from .images import ImageError, decode_image_message
from .localizer import Localizer, hint_from_fix
from .metrics import localization_errors


@dataclass
class FrameEstimate:
    """What one camera frame produced: the position estimate (NaN when none came) and the ranked match
    positions, all in the map's UTM zone."""

    stamp: int                                    # header stamp, ns
    easting: float
    northing: float
    matches_xy: list = field(default_factory=list)
    confidence: float = float("nan")
    gps_used: bool | None = None                  # None: not known (the node does not publish it)


@dataclass
class ReplayReport:
    frames: int                        # camera frames with ground truth, scored (no estimate = failure)
    skipped: dict                      # stamp -> reason
    errors: dict                       # metrics.localization_errors
    recall: dict                       # recall@k: a match within `radius` of the truth among the top k
    latency_ms: dict                   # median per stage
    gps_used: int | None               # frames whose retrieval used the GPS hint; None: not known
    rows: list = field(default_factory=list)   # per frame: stamp, estimate, truth, error


def truth_positions(poses: list[TruthPose], zone: UtmZone) -> dict:
    """A bag's ground-truth poses by header stamp (ns) as (easting, northing) in `zone`, the map's zone."""
    truth = {}
    for t in poses:
        if t.zone != zone:   # the bag's truth in another zone: go through latitude/longitude
            lat, lon = utm_to_latlon(t.easting, t.northing, t.zone)
            east, north, _ = latlon_to_utm(lat, lon, zone)
            truth[t.stamp_ns] = (float(east), float(north))
        else:
            truth[t.stamp_ns] = (t.easting, t.northing)
    return truth


def score_frames(frames: list[FrameEstimate], truth: dict, skipped: dict, latency_ms: dict, radius: float = 25.0,
                 ks=(1, 5, 10)) -> ReplayReport:
    """Score frame estimates against ground-truth positions (`truth_positions`); every frame must have one."""
    if not frames:
        raise ValueError(f"no camera frame could be scored ({len(skipped)} skipped)")
    hits, rows = {k: 0 for k in ks}, []
    for f in frames:
        t_xy = truth[f.stamp]
        distances = [math.hypot(x - t_xy[0], y - t_xy[1]) for x, y in f.matches_xy]
        for k in ks:
            hits[k] += any(d <= radius for d in distances[:k])
        rows.append({"stamp": f.stamp, "easting": f.easting, "northing": f.northing, "true_easting": t_xy[0],
                     "true_northing": t_xy[1], "error_m": math.hypot(f.easting - t_xy[0], f.northing - t_xy[1]),
                     "confidence": f.confidence, "gps_used": f.gps_used})
    known = [f.gps_used for f in frames if f.gps_used is not None]
    n = len(frames)
    return ReplayReport(frames=n, skipped=skipped,
                        errors=localization_errors(np.array([(f.easting, f.northing) for f in frames]),
                                                   np.array([truth[f.stamp] for f in frames])),
                        recall={f"recall@{k}": hits[k] / n for k in ks}, latency_ms=latency_ms,
                        gps_used=sum(known) if known else None, rows=rows)


def replay_bag(path: str | Path, localizer: Localizer, topics: DriveTopics = DriveTopics(), use_gps: bool = True,
               gps_max_age_s: float = GPS_MAX_AGE_S, radius: float = 25.0, ks=(1, 5, 10)) -> ReplayReport:
    """Localise every camera frame of a drive bag, with the newest valid GPS fix as a hint when it is fresh
    (`frames.fresh_fix`, as in the node)."""
    truth = truth_positions(read_drive_bag(path, topics, decode_images=False).truth, localizer.bundle.table.zone)
    fix, frames, skipped, timings = None, [], {}, {}
    for topic, msgtype, _, raw in iter_bag(path, {topics.image, topics.compressed, topics.gps}):
        msg = TYPESTORE.deserialize_cdr(raw, msgtype)
        stamp = stamp_ns(msg.header)
        if topic == topics.gps:
            hint = hint_from_fix(msg)
            fix = (*hint, stamp) if hint is not None else fix
            continue
        if stamp not in truth:
            skipped[stamp] = "no ground-truth pose with this stamp"
            continue
        try:
            rgb = decode_image_message(msg)
        except ImageError as exc:
            skipped[stamp] = str(exc)
            continue
        fresh = use_gps and fix is not None and fresh_fix(fix[3] * 1e-9, stamp * 1e-9, gps_max_age_s)
        hint = fix[:3] if fresh else None
        result = localizer.localize(rgb, gps_hint=hint, stamp=stamp * 1e-9)
        for name, seconds in result.timings.items():
            timings.setdefault(name, []).append(seconds)
        frames.append(FrameEstimate(stamp, result.easting, result.northing,
                                    [(m.easting, m.northing) for m in result.matches], result.confidence,
                                    result.gps_used))
    latency_ms = {k: float(np.median(v)) * 1e3 for k, v in timings.items()}
    try:
        return score_frames(frames, truth, skipped, latency_ms, radius, ks)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def format_report(report: ReplayReport) -> str:
    """The error table: frames, error percentiles, share within 5/10/25 m, Recall@k and median latency."""
    e = report.errors
    gps = "" if report.gps_used is None else f", GPS hint used {report.gps_used}"
    lines = [f"frames localised: {report.frames - e['missing']} of {report.frames} "
             f"(skipped {len(report.skipped)}{gps}; frames without an estimate count as failures)",
             f"error (m): median {e['median']:.1f}  p90 {e['p90']:.1f}  p95 {e['p95']:.1f}  max {e['max']:.1f}",
             "within: " + "  ".join(f"{k.removeprefix('within_')} {100 * v:.1f} %" for k, v in e.items()
                                    if k.startswith("within_")),
             "recall (25 m): " + "  ".join(f"{k} {100 * v:.1f} %" for k, v in report.recall.items()),
             "latency (median ms): " + "  ".join(f"{k} {v:.1f}" for k, v in report.latency_ms.items())]
    return "\n".join(lines)
