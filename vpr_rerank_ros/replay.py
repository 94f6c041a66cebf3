"""Offline replay of a drive bag through the Localizer (the node's code path, without a ROS graph), scored
against the bag's ground truth: localisation error statistics, Recall@k at 25 m and per-stage latency."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bag import TYPESTORE, DriveTopics, iter_bag, read_drive_bag
from .geo import latlon_to_utm, utm_to_latlon
from .images import ImageError, decode_image_message
from .localizer import Localizer, hint_from_fix
from .metrics import localization_errors


@dataclass
class ReplayReport:
    frames: int
    skipped: dict                      # stamp -> reason
    errors: dict                       # metrics.localization_errors
    recall: dict                       # recall@k: a match within `radius` of the truth among the top k
    latency_ms: dict                   # median per stage
    gps_used: int
    rows: list = field(default_factory=list)   # per frame: stamp, estimate, truth, error


def replay_bag(path: str | Path, localizer: Localizer, topics: DriveTopics = DriveTopics(), use_gps: bool = True,
               gps_max_age_s: float = 2.0, radius: float = 25.0, ks=(1, 5, 10)) -> ReplayReport:
    """Localise every camera frame of a drive bag, with the newest valid GPS fix as a hint."""
    truth = {t.stamp_ns: t for t in read_drive_bag(path, topics, decode_images=False).truth}
    zone = localizer.bundle.table.zone
    fix, rows, skipped, timings, hits, gps_used = None, [], {}, {}, {k: 0 for k in ks}, 0
    estimates, true_xy = [], []
    for topic, msgtype, _, raw in iter_bag(path, {topics.image, topics.compressed, topics.gps}):
        msg = TYPESTORE.deserialize_cdr(raw, msgtype)
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
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
        hint = fix[:3] if use_gps and fix is not None and abs(stamp - fix[3]) <= gps_max_age_s * 1e9 else None
        result = localizer.localize(rgb, gps_hint=hint, stamp=stamp * 1e-9)
        gps_used += result.gps_used
        for name, seconds in result.timings.items():
            timings.setdefault(name, []).append(seconds)
        t = truth[stamp]
        if t.zone != zone:   # the bag's truth in another zone: go through latitude/longitude
            lat, lon = utm_to_latlon(t.easting, t.northing, t.zone)
            east, north, _ = latlon_to_utm(lat, lon, zone)
            t_xy = (float(east), float(north))
        else:
            t_xy = (t.easting, t.northing)
        distances = [math.hypot(m.easting - t_xy[0], m.northing - t_xy[1]) for m in result.matches]
        for k in ks:
            hits[k] += any(d <= radius for d in distances[:k])
        estimates.append((result.easting, result.northing))
        true_xy.append(t_xy)
        rows.append({"stamp": stamp, "easting": result.easting, "northing": result.northing, "true_easting": t_xy[0],
                     "true_northing": t_xy[1], "error_m": math.hypot(result.easting - t_xy[0],
                                                                     result.northing - t_xy[1]),
                     "confidence": result.confidence, "gps_used": result.gps_used})
    if not rows:
        raise ValueError(f"{path}: no camera frame could be localised ({len(skipped)} skipped)")
    n = len(rows)
    return ReplayReport(frames=n, skipped=skipped, errors=localization_errors(np.array(estimates), np.array(true_xy)),
                        recall={f"recall@{k}": hits[k] / n for k in ks},
                        latency_ms={k: float(np.median(v)) * 1e3 for k, v in timings.items()}, gps_used=gps_used,
                        rows=rows)


def format_report(report: ReplayReport) -> str:
    e = report.errors
    lines = [f"frames localised: {report.frames} (skipped {len(report.skipped)}, GPS hint used {report.gps_used})",
             f"error (m): median {e['median']:.1f}  p90 {e['p90']:.1f}  p95 {e['p95']:.1f}  max {e['max']:.1f}",
             "within: " + "  ".join(f"{k.removeprefix('within_')} {100 * v:.1f} %" for k, v in e.items()
                                    if k.startswith("within_")),
             "recall (25 m): " + "  ".join(f"{k} {100 * v:.1f} %" for k, v in report.recall.items()),
             "latency (median ms): " + "  ".join(f"{k} {v:.1f}" for k, v in report.latency_ms.items())]
    return "\n".join(lines)
