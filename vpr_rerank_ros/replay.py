"""Bag replay scored against the bag's ground truth, or checked for consistency when it has none. `replay_bag`
runs the Localizer offline (the node's code path, without a ROS graph); `live_replay.replay_live` plays a bag to
the running node. Both find their topics and truth with `open_drive` and score their frames here: localisation
error statistics, Recall@k at 25 m, per-stage latency, and the consistency of the estimates (distance to the
GPS fix, jumps between consecutive frames), formatted by `format_report`."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bag import TYPESTORE, ReplayTopics, iter_bag, select_topics, stamp_ns
from .frames import GPS_MAX_AGE_S, fresh_fix
from .geo import UtmZone, latlon_to_utm
from .images import ImageError, decode_image_message
from .localizer import Localizer, hint_from_fix
from .mapdb import MapTable
from .metrics import calibration, localization_errors
from .tracking import PoseFilter, track
from .truth import TruthFrame, TruthTrack, read_truth

OUTSIDE_TRUTH = "outside the ground truth's time span"
# Per-frame latency, ms: the Localizer's stages, "total" = decode to pose (as the node's diagnostics report it) and,
# in live replays, "end_to_end" = image published to pose received.
STAGES = ("descriptor", "retrieval", "reranking", "local_features", "verification", "pose", "total", "end_to_end")


@dataclass(frozen=True)
class ReplayInput:
    """What a replay reads from a bag: topic names (None: found by message type, `bag.select_topics`) and how
    pose-typed ground truth is framed."""

    image_topic: str | None = None
    gps_topic: str | None = None
    truth_topic: str | None = None
    truth_frame: TruthFrame = TruthFrame()


@dataclass(frozen=True)
class GpsTrack:
    """A bag's valid GPS fixes in the map's zone: what estimates are compared with when there is no truth."""

    stamps: np.ndarray    # (N,) int64 ns, increasing
    xy: np.ndarray        # (N, 2)

    @classmethod
    def read(cls, path: str | Path, topic: str, zone: UtmZone) -> GpsTrack | None:
        """The fixes on `topic` usable as hints (`localizer.hint_from_fix`); None when there are none."""
        fixes = []
        for _, msgtype, _, raw in iter_bag(path, {topic}):
            msg = TYPESTORE.deserialize_cdr(raw, msgtype)
            hint = hint_from_fix(msg)
            if hint is not None:
                fixes.append((stamp_ns(msg.header), hint[0], hint[1]))
        return cls.from_fixes(fixes, zone)

    @classmethod
    def from_fixes(cls, fixes: list[tuple[int, float, float]], zone: UtmZone) -> GpsTrack | None:
        """The track of (stamp ns, lat, lon) fixes in any order; None when there are none."""
        if not fixes:
            return None
        stamps, lat, lon = (np.array(v) for v in zip(*sorted(fixes)))
        east, north, _ = latlon_to_utm(lat, lon, zone)
        return cls(stamps.astype(np.int64), np.stack([east, north], axis=1))

    def near(self, stamp: int, max_age_s: float = GPS_MAX_AGE_S) -> tuple[float, float] | None:
        """The fix nearest in time to `stamp` when it is fresh (`frames.fresh_fix`), else None."""
        i = int(np.searchsorted(self.stamps, stamp))
        nearest = min((j for j in (i - 1, i) if 0 <= j < len(self.stamps)), key=lambda j: abs(self.stamps[j] - stamp))
        if not fresh_fix(self.stamps[nearest] * 1e-9, stamp * 1e-9, max_age_s):
            return None
        return float(self.xy[nearest, 0]), float(self.xy[nearest, 1])


def open_drive(path: str | Path, request: ReplayInput, zone: UtmZone) -> tuple[ReplayTopics, TruthTrack | None]:
    """The bag's topics and its ground truth in `zone` (None when the bag has none)."""
    topics = select_topics(path, request.image_topic, request.gps_topic, request.truth_topic)
    if topics.truth is None:
        return topics, None
    return topics, read_truth(path, topics.truth, topics.truth_type, zone, request.truth_frame)


def skip_reason(truth: TruthTrack | None, stamp: int) -> str | None:
    """Why a camera frame is not replayed: outside the truth's time span (None: it is replayed)."""
    return OUTSIDE_TRUTH if truth is not None and not truth.covers(stamp) else None


@dataclass
class FrameEstimate:
    """What one camera frame produced: the position estimate (NaN when none came) and the ranked match
    positions, all in the map's UTM zone, and how long it took."""

    stamp: int                                    # header stamp, ns
    easting: float
    northing: float
    matches_xy: list = field(default_factory=list)
    confidence: float = float("nan")
    gps_used: bool | None = None                  # None: not known (the node does not publish it)
    covariance: np.ndarray | None = None          # (2, 2) m^2 of the estimate; None: not known
    latency_ms: dict = field(default_factory=dict)   # STAGES -> ms of this frame; a stage not measured is absent


@dataclass
class ReplayReport:
    frames: int                        # camera frames replayed (no estimate = failure)
    skipped: dict                      # stamp -> reason
    errors: dict | None                # metrics.localization_errors; None: the bag has no ground truth
    recall: dict | None                # recall@k: a match within `radius` of the truth among the top k
    latency_ms: dict                   # median per stage (STAGES) over the frames that measured it
    gps_used: int | None               # frames whose retrieval used the GPS hint; None: not known
    consistency: dict = field(default_factory=dict)   # `consistency`
    calibration: dict | None = None    # metrics.calibration of the estimates' covariances against the truth
    rows: list = field(default_factory=list)   # per frame (`score_frames`), NaN where not known
    gps: GpsTrack | None = None        # the bag's GPS fixes, whether or not they were used as hints
    map_table: MapTable | None = None  # the map's images (positions, UTM zone)


def consistency(estimates: np.ndarray, gps_xy: np.ndarray) -> dict:
    """How consistent (N, 2) estimates are without ground truth: their distance to the fresh GPS fix of each
    frame (`gps_xy` NaN where none; gps_* only when some frame had one) and the jumps between consecutive
    frames that both have an estimate (jump_* only when there are such pairs). Median, p95 (and max), metres."""
    stats = {}
    to_gps = np.hypot(*(estimates - gps_xy).T)
    stats.update(_spread("gps", to_gps[np.isfinite(to_gps)], ("median", "p95")))
    jumps = np.hypot(*np.diff(estimates, axis=0).T)
    stats.update(_spread("jump", jumps[np.isfinite(jumps)], ("median", "p95", "max")))
    return stats


def _spread(name: str, values: np.ndarray, which: tuple[str, ...]) -> dict:
    if len(values) == 0:
        return {}
    quantiles = {"median": 0.5, "p95": 0.95, "max": 1.0}
    return {f"{name}_frames": int(len(values)),
            **{f"{name}_{w}": float(np.quantile(values, quantiles[w], method="inverted_cdf")) for w in which}}


def score_frames(frames: list[FrameEstimate], truth: TruthTrack | None, skipped: dict, gps: GpsTrack | None = None,
                 gps_max_age_s: float = GPS_MAX_AGE_S, radius: float = 25.0, ks=(1, 5, 10),
                 map_table: MapTable | None = None) -> ReplayReport:
    """Score frame estimates against the truth interpolated to their stamps (every frame within its span,
    `skip_reason`), or only for consistency when `truth` is None; median latency per stage. One row per frame:
    stamp, estimate, truth, error, distance to the fresh GPS fix, confidence, GPS hint used, covariance
    (`row_covariance`) and `<stage>_ms` for each stage some frame measured. A ValueError when no frame is left,
    naming the two time spans when the truth and the camera do not overlap."""
    if not frames:
        camera = sorted(skipped)
        if truth is not None and camera and all(r == OUTSIDE_TRUTH for r in skipped.values()):
            raise ValueError(f"no overlap in time between the ground truth ({truth.span()}) and the camera "
                             f"({camera[0] * 1e-9:.3f} s to {camera[-1] * 1e-9:.3f} s)")
        raise ValueError(f"no camera frame could be replayed ({len(skipped)} skipped)")
    nan = (math.nan, math.nan)
    estimates = np.array([(f.easting, f.northing) for f in frames], np.float64)
    true_xy = np.array([truth.at(f.stamp) if truth is not None else nan for f in frames], np.float64)
    gps_xy = np.array([(gps.near(f.stamp, gps_max_age_s) if gps is not None else None) or nan for f in frames],
                      np.float64)
    hits, rows = {k: 0 for k in ks}, []
    stages = [s for s in STAGES if any(s in f.latency_ms for f in frames)]
    for f, t_xy, g_xy in zip(frames, true_xy, gps_xy):
        distances = [math.hypot(x - t_xy[0], y - t_xy[1]) for x, y in f.matches_xy]
        for k in ks:
            hits[k] += any(d <= radius for d in distances[:k])
        rows.append({"stamp": f.stamp, "easting": f.easting, "northing": f.northing, "true_easting": t_xy[0],
                     "true_northing": t_xy[1], "error_m": math.hypot(f.easting - t_xy[0], f.northing - t_xy[1]),
                     "gps_distance_m": math.hypot(f.easting - g_xy[0], f.northing - g_xy[1]),
                     "confidence": f.confidence, "gps_used": f.gps_used, **_covariance_columns(f.covariance),
                     **{f"{s}_ms": f.latency_ms.get(s, math.nan) for s in stages}})
    known = [f.gps_used for f in frames if f.gps_used is not None]
    n = len(frames)
    with_cov = [i for i, f in enumerate(frames) if f.covariance is not None and np.isfinite(estimates[i]).all()]
    return ReplayReport(frames=n, skipped=skipped,
                        errors=localization_errors(estimates, true_xy) if truth is not None else None,
                        recall={f"recall@{k}": hits[k] / n for k in ks} if truth is not None else None,
                        latency_ms={s: float(np.nanmedian([r[f"{s}_ms"] for r in rows])) for s in stages},
                        gps_used=sum(known) if known else None, consistency=consistency(estimates, gps_xy),
                        rows=rows, gps=gps, map_table=map_table,
                        calibration=calibration(estimates[with_cov], true_xy[with_cov],
                                                [frames[i].covariance for i in with_cov])
                        if truth is not None and with_cov else None)


def _covariance_columns(covariance: np.ndarray | None) -> dict:
    """A frame's (2, 2) position covariance as the row's cov_ee, cov_en, cov_nn (m^2; NaN when not known)."""
    c = np.full((2, 2), math.nan) if covariance is None else covariance
    return {"cov_ee": float(c[0, 0]), "cov_en": float(c[0, 1]), "cov_nn": float(c[1, 1])}


def row_covariance(row: dict) -> np.ndarray:
    """The (2, 2) position covariance of a report row (NaN when not known)."""
    return np.array([[row["cov_ee"], row["cov_en"]], [row["cov_en"], row["cov_nn"]]], np.float64)


def replay_bag(path: str | Path, localizer: Localizer, request: ReplayInput = ReplayInput(), use_gps: bool = True,
               gps_max_age_s: float = GPS_MAX_AGE_S, radius: float = 25.0, ks=(1, 5, 10),
               tracker: PoseFilter | None = None) -> ReplayReport:
    """Localise every camera frame of a drive bag within its truth's time span, with the newest valid GPS fix as
    a hint when it is fresh (`frames.fresh_fix`, as in the node). With a `tracker`, each frame's estimate and
    covariance are the temporal filter's after that frame (as the node publishes them with `filter: true`)."""
    zone = localizer.bundle.table.zone
    topics, truth = open_drive(path, request, zone)
    fix, fixes, frames, skipped = None, [], [], {}
    for topic, msgtype, _, raw in iter_bag(path, {topics.image, topics.gps} - {None}):   # one pass for both
        msg = TYPESTORE.deserialize_cdr(raw, msgtype)
        stamp = stamp_ns(msg.header)
        if topic == topics.gps:
            hint = hint_from_fix(msg)
            if hint is not None:
                fix = (*hint, stamp)
                fixes.append((stamp, hint[0], hint[1]))
            continue
        reason = skip_reason(truth, stamp)
        if reason is not None:
            skipped[stamp] = reason
            continue
        start = time.perf_counter()
        try:
            rgb = decode_image_message(msg)
        except ImageError as exc:
            skipped[stamp] = str(exc)
            continue
        fresh = use_gps and fix is not None and fresh_fix(fix[3] * 1e-9, stamp * 1e-9, gps_max_age_s)
        hint = fix[:3] if fresh else None
        result = localizer.localize(rgb, gps_hint=hint, stamp=stamp * 1e-9)
        if tracker is not None:
            result = track(tracker, result, zone)[0]
        latency_ms = {**{k: v * 1e3 for k, v in result.timings.items()}, "total": (time.perf_counter() - start) * 1e3}
        frames.append(FrameEstimate(stamp, result.easting, result.northing,
                                    [(m.easting, m.northing) for m in result.matches], result.confidence,
                                    result.gps_used, result.position_covariance, latency_ms))
    gps = GpsTrack.from_fixes(fixes, zone)
    try:
        return score_frames(frames, truth, skipped, gps, gps_max_age_s, radius, ks, localizer.bundle.table)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def format_report(report: ReplayReport) -> str:
    """The error table (frames, error percentiles, share within 5/10/25 m, Recall@k) when the bag has ground
    truth, the consistency lines (distance to GPS, jumps), and median latency."""
    gps = "" if report.gps_used is None else f", GPS hint used {report.gps_used}"
    missing = sum(not math.isfinite(r["easting"]) for r in report.rows)
    lines = [f"frames localised: {report.frames - missing} of {report.frames} "
             f"(skipped {len(report.skipped)}{gps}; frames without an estimate count as failures)"]
    e = report.errors
    if e is None:
        lines.append("no ground truth: consistency only")
    else:
        lines += [f"error (m): median {e['median']:.1f}  p90 {e['p90']:.1f}  p95 {e['p95']:.1f}  max {e['max']:.1f}",
                  "within: " + "  ".join(f"{k.removeprefix('within_')} {100 * v:.1f} %" for k, v in e.items()
                                         if k.startswith("within_")),
                  "recall (25 m): " + "  ".join(f"{k} {100 * v:.1f} %" for k, v in report.recall.items())]
    if report.calibration is not None:
        k = report.calibration
        lines.append(f"calibration: {100 * k['coverage95']:.1f} % of {k['frames_scored']} estimates have the truth "
                     f"inside their 95 % ellipse (honest: 95 %), mean NEES {k['mean_nees']:.2f} (honest: 2)")
    c = report.consistency
    if "gps_frames" in c:
        lines.append(f"estimate to GPS fix (m): median {c['gps_median']:.1f}  p95 {c['gps_p95']:.1f}  "
                     f"({c['gps_frames']} frames with a fresh fix)")
    if "jump_frames" in c:
        lines.append(f"jump between frames (m): median {c['jump_median']:.1f}  p95 {c['jump_p95']:.1f}  "
                     f"max {c['jump_max']:.1f}  ({c['jump_frames']} pairs)")
    lines.append("latency (median ms): " + "  ".join(f"{k} {v:.1f}" for k, v in report.latency_ms.items()))
    return "\n".join(lines)
