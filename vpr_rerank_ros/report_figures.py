"""The figures of a replay report (`report.write_report`), drawn from a `replay.ReplayReport`'s rows with
matplotlib's object API (no pyplot, no display): each function saves one PNG and returns its caption."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from .metrics import CHI2_2DOF_95, RADII_M, nees
from .replay import STAGES, ReplayReport, row_covariance

ERROR_COLOURS_M = (1.0, 50.0)   # the trajectory's log colour scale: errors outside are clipped to its ends
ERROR_FLOOR_M = 0.1             # errors below are drawn here on the log axes
ELLIPSE_SAMPLE = 20             # frames whose 95 % ellipse is drawn
LATENCY_FLOOR_MS = 0.01         # latencies below are counted here on the log axis
DPI = 100


@dataclass(frozen=True)
class Frames:
    """A report's rows as arrays: time (s from the first frame), estimate, truth (NaN without), error (NaN
    without truth or estimate), distance to GPS, confidence, covariance, latency per stage (ms, NaN where not
    measured)."""

    seconds: np.ndarray
    estimate: np.ndarray      # (N, 2)
    truth: np.ndarray         # (N, 2)
    error: np.ndarray
    gps_distance: np.ndarray  # to the frame's fresh GPS fix (NaN without)
    confidence: np.ndarray
    covariance: np.ndarray    # (N, 2, 2)
    latency: dict

    @classmethod
    def of(cls, report: ReplayReport) -> Frames:
        rows = report.rows

        def column(*keys: str) -> np.ndarray:
            values = np.array([[r[k] for k in keys] for r in rows], np.float64)
            return values[:, 0] if len(keys) == 1 else values

        stamps = np.array([r["stamp"] for r in rows], np.int64)
        return cls(seconds=(stamps - stamps[0]) * 1e-9, estimate=column("easting", "northing"),
                   truth=column("true_easting", "true_northing"), error=column("error_m"),
                   gps_distance=column("gps_distance_m"), confidence=column("confidence"),
                   covariance=np.array([row_covariance(r) for r in rows]),
                   latency={s: column(f"{s}_ms") for s in STAGES if f"{s}_ms" in rows[0]})

    @property
    def missing(self) -> np.ndarray:
        """Frames without an estimate."""
        return ~np.isfinite(self.estimate).all(axis=1)


def trajectory(report: ReplayReport, frames: Frames, has_truth: bool, path: Path) -> str | None:
    """Map images, truth, GPS fixes and estimates (coloured by error, else by time) in metres from the first
    truth point (else GPS fix, else estimate); None when there is no position to draw."""
    zone = report.map_table.zone if report.map_table is not None else None
    gps = report.gps.xy if report.gps is not None else np.zeros((0, 2))
    shown = [xy[np.isfinite(xy).all(axis=1)] for xy in (frames.truth, gps, frames.estimate)]
    points = np.concatenate(shown)
    if len(points) == 0:
        return None
    origin = points[0]
    first = next(name for name, xy in zip(("truth point", "GPS fix", "estimate"), shown) if len(xy))
    low, high = _view(points)
    height = min(7.0 * float(high[1] - low[1]) / float(high[0] - low[0]), 9.0)
    figure = Figure(layout="constrained", figsize=(9.0, height + 1.2))
    axis = figure.subplots()
    if report.map_table is not None:
        map_xy = np.stack([report.map_table.easting, report.map_table.northing], axis=1)
        map_xy = map_xy[((map_xy >= low) & (map_xy <= high)).all(axis=1)] - origin
        axis.scatter(*map_xy.T, s=4, color="0.82", label=f"map images ({len(map_xy)} in view)", rasterized=True)
    if len(shown[1]):
        axis.scatter(*(shown[1] - origin).T, s=14, marker="+", color="tab:orange", linewidths=0.8,
                     label=f"GPS fixes ({len(shown[1])})")
    if has_truth:
        axis.plot(*(frames.truth - origin).T, color="black", linewidth=0.9, zorder=4, label="ground truth")
        wrong = frames.error > RADII_M[-1]
        if wrong.any():
            axis.add_collection(LineCollection(np.stack([frames.truth[wrong], frames.estimate[wrong]], axis=1) - origin,
                                               colors="tab:red", linewidths=0.7, zorder=2,
                                               label=f"error over {RADII_M[-1]:g} m ({int(wrong.sum())})"))
        colour, norm = np.clip(frames.error, *ERROR_COLOURS_M), LogNorm(*ERROR_COLOURS_M)
        colour_label, extend = "error (m, log; clipped)", "both"
    else:
        axis.plot(*(frames.estimate - origin).T, color="0.5", linewidth=0.6)
        colour, norm, colour_label, extend = frames.seconds, None, "time (s from the first frame)", "neither"
    estimates = axis.scatter(*(frames.estimate - origin).T, c=colour, cmap="plasma", norm=norm, s=14, zorder=3,
                             label=f"estimates ({int((~frames.missing).sum())})")
    bar = figure.colorbar(estimates, ax=axis, label=colour_label, extend=extend, shrink=0.8)
    if has_truth:
        bar.set_ticks([t for t in (1, 2, 5, 10, 25, 50) if ERROR_COLOURS_M[0] <= t <= ERROR_COLOURS_M[1]])
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        bar.ax.yaxis.set_minor_formatter(NullFormatter())
    axis.set(xlim=(low[0] - origin[0], high[0] - origin[0]), ylim=(low[1] - origin[1], high[1] - origin[1]),
             aspect="equal")
    where = f"UTM zone {zone}, " if zone is not None else ""
    axis.set(xlabel="east (m)", ylabel="north (m)",
             title=f"metres from the first {first}: {where}E {origin[0]:.1f}, N {origin[1]:.1f}")
    figure.legend(loc="outside lower center", ncols=3, fontsize=8)
    axis.grid(alpha=0.3)
    _save(figure, path)
    return ("The drive over the map's images (grey). " +
            (f"Black: the ground truth at each frame; dots: the estimates, coloured by their error (log scale "
             f"from {ERROR_COLOURS_M[0]:g} to {ERROR_COLOURS_M[1]:g} m); red lines join the estimates more than "
             f"{RADII_M[-1]:g} m off to their truth. " if has_truth else
             "No ground truth: the estimates, coloured by time and joined in order. ") +
            ("Orange crosses: the bag's GPS fixes." if len(shown[1]) else "The bag has no GPS fixes."))


def _view(points: np.ndarray, margin_m: float = 20.0, most_elongated: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """The lower-left and upper-right corners of a view around `points` with a margin, widened where needed so
    that neither side is more than `most_elongated` times the other (a straight drive is not a thin strip)."""
    low, high = points.min(axis=0) - margin_m, points.max(axis=0) + margin_m
    span = high - low
    wanted = np.maximum(span, span[::-1] / most_elongated)
    return low - (wanted - span) / 2, high + (wanted - span) / 2


def over_time(frames: Frames, has_truth: bool, path: Path) -> str:
    """Error (or, without truth, the jump from the previous estimate and the distance to GPS) per frame."""
    figure = Figure(layout="constrained", figsize=(9.0, 3.8))
    axis = figure.subplots()
    if has_truth:
        axis.scatter(frames.seconds, np.maximum(frames.error, ERROR_FLOOR_M), s=10, color="tab:blue",
                     label="error")
        _radius_lines(axis)
        axis.set_ylabel("error (m, log)")
    else:
        jumps = np.hypot(*np.diff(frames.estimate, axis=0).T)
        axis.scatter(frames.seconds[1:], np.maximum(jumps, ERROR_FLOOR_M), s=10, color="tab:blue",
                     label="jump from the previous estimate")
        if np.isfinite(frames.gps_distance).any():
            axis.scatter(frames.seconds, np.maximum(frames.gps_distance, ERROR_FLOOR_M), s=12, marker="^",
                         color="tab:orange", label="distance to the frame's GPS fix")
        axis.set_ylabel("metres (log)")
    axis.set_yscale("log")
    if frames.missing.any():
        axis.scatter(frames.seconds[frames.missing], np.ones(int(frames.missing.sum())), marker="x", color="red",
                     transform=axis.get_xaxis_transform(), clip_on=False, zorder=4,
                     label=f"no estimate ({int(frames.missing.sum())})")
    axis.set_xlabel("time (s from the first frame)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(loc="upper left", fontsize=8)
    _save(figure, path)
    what = (f"Localisation error per frame, log scale (errors under {ERROR_FLOOR_M:g} m drawn at "
            f"{ERROR_FLOOR_M:g} m), dashed at 5/10/25 m." if has_truth else
            "No ground truth: the jump between consecutive estimates per frame and, when the bag has GPS, the "
            "distance to the frame's fresh fix, log scale.")
    return what + " Red crosses on the top edge: frames without an estimate."


def error_cdf(report: ReplayReport, frames: Frames, path: Path) -> str:
    """Share of frames within each error; frames without an estimate never arrive (the curve stays below 1)."""
    errors = np.sort(np.where(frames.missing, np.inf, np.maximum(frames.error, ERROR_FLOOR_M)))
    share = 100.0 * np.arange(1, len(errors) + 1) / len(errors)
    finite = np.isfinite(errors)
    figure = Figure(layout="constrained", figsize=(7.0, 4.2))
    axis = figure.subplots()
    axis.step(errors[finite], share[finite], where="post", color="tab:blue")
    for r, colour in zip(RADII_M, ("tab:green", "tab:orange", "tab:red")):
        within = 100.0 * report.errors[f"within_{r:g}m"]
        axis.axvline(r, color=colour, linewidth=0.9, linestyle="--", label=f"within {r:g} m: {within:.1f} %")
    axis.set(xscale="log", ylim=(0, 100), xlabel="error (m, log)", ylabel="frames within (%)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(loc="lower right", fontsize=8)
    _save(figure, path)
    return ("Share of frames localised within each error; frames without an estimate count as failures, so the "
            "curve ends below 100 % when there are any. Dashed: 5, 10 and 25 m, with the report's shares.")


def ellipses(frames: Frames, path: Path) -> str | None:
    """The 95 % ellipse of up to ELLIPSE_SAMPLE evenly spaced frames around their estimate, with the truth;
    None when no frame has both a covariance and a truth."""
    usable = np.flatnonzero(~frames.missing & np.isfinite(frames.covariance).all(axis=(1, 2))
                            & np.isfinite(frames.truth).all(axis=1))
    if len(usable) == 0:
        return None
    chosen = usable[np.unique(np.linspace(0, len(usable) - 1, min(ELLIPSE_SAMPLE, len(usable))).round().astype(int))]
    inside = nees(frames.estimate[chosen], frames.truth[chosen], frames.covariance[chosen]) <= CHI2_2DOF_95
    columns = 5
    rows = math.ceil(len(chosen) / columns)
    figure = Figure(layout="constrained", figsize=(11.0, 2.3 * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, i, ok in zip(axes, chosen, inside):
        values, vectors = np.linalg.eigh(frames.covariance[i])
        half_axes = np.sqrt(CHI2_2DOF_95 * np.maximum(values, 0.0))
        angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
        colour = "tab:green" if ok else "tab:red"
        axis.add_patch(Ellipse((0.0, 0.0), 2 * half_axes[1], 2 * half_axes[0], angle=angle, fill=False,
                               color=colour, linewidth=1.2))
        offset = frames.truth[i] - frames.estimate[i]
        axis.plot([0.0, offset[0]], [0.0, offset[1]], color="0.6", linewidth=0.7)
        axis.plot(*offset, "*", color="black", markersize=7)
        axis.plot(0.0, 0.0, "+", color="tab:blue", markersize=10, markeredgewidth=1.5)
        reach = 1.15 * max(half_axes[1], float(np.hypot(*offset)), 1.0)
        axis.set(xlim=(-reach, reach), ylim=(-reach, reach), aspect="equal")
        axis.set_title(f"{frames.seconds[i]:.1f} s: error {frames.error[i]:.1f} m, {'inside' if ok else 'OUTSIDE'}",
                       fontsize=8, color=colour)
        axis.tick_params(labelsize=6)
    for axis in axes[len(chosen):]:
        axis.set_visible(False)
    figure.suptitle(f"95 % ellipses of {len(chosen)} frames (blue cross: estimate, star: truth; metres from the "
                    f"estimate): truth inside {int(inside.sum())} of {len(chosen)}", fontsize=10)
    _save(figure, path)
    return (f"The 95 % ellipse (e^T S^-1 e <= {CHI2_2DOF_95:.2f}, the one the calibration line counts) of "
            f"{len(chosen)} frames evenly spaced over the drive, each in its own panel and scale, centred on the "
            "estimate (blue cross) with the truth (star): green when the truth lies inside, red when not.")


def latency(report: ReplayReport, frames: Frames, path: Path) -> str | None:
    """A histogram per stage with the report's median marked; None when no stage was measured."""
    stages = [s for s in report.latency_ms if s in frames.latency]
    if not stages:
        return None
    columns = min(3, len(stages))
    rows = math.ceil(len(stages) / columns)
    figure = Figure(layout="constrained", figsize=(11.0, 2.8 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, stage in zip(axes, stages):
        values = np.maximum(frames.latency[stage][np.isfinite(frames.latency[stage])], LATENCY_FLOOR_MS)
        bins = np.geomspace(values.min(), values.max() * 1.001 + LATENCY_FLOOR_MS, min(30, max(5, len(values) // 3)))
        axis.hist(values, bins=bins, color="tab:blue", alpha=0.8)
        median = report.latency_ms[stage]
        axis.axvline(median, color="black", linestyle="--", linewidth=1)
        axis.set_title(f"{stage}: median {median:.1f} ms (n={len(values)})", fontsize=9)
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("ms (log)", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in axes[len(stages):]:
        axis.set_visible(False)
    _save(figure, path)
    return ("Latency per frame and stage, log scale, with the median (dashed) the report prints. total: decode to "
            "pose; end_to_end (live): image published to pose received; n: frames measured (a live replay learns "
            "the node's stages from its diagnostics, about once a second).")


def confidence(frames: Frames, path: Path) -> str | None:
    """Confidence against error; None when the replay does not know the confidences (live)."""
    known = np.isfinite(frames.confidence) & np.isfinite(frames.error)
    if not known.any():
        return None
    figure = Figure(layout="constrained", figsize=(7.0, 4.2))
    axis = figure.subplots()
    axis.scatter(frames.confidence[known], np.maximum(frames.error[known], ERROR_FLOOR_M), s=12, color="tab:blue")
    _radius_lines(axis)
    axis.set(yscale="log", xlabel="confidence (share of the pose weight agreeing with the best match)",
             ylabel="error (m, log)")
    axis.grid(alpha=0.3, which="both")
    _save(figure, path)
    return "Each frame's confidence against its error (log scale, dashed at 5/10/25 m)."


def _radius_lines(axis) -> None:
    """Dashed horizontal lines at RADII_M, labelled on the right."""
    for r in RADII_M:
        axis.axhline(r, color="0.5", linewidth=0.8, linestyle="--")
        axis.annotate(f"{r:g} m", (1.0, r), xycoords=("axes fraction", "data"), xytext=(3, 0),
                      textcoords="offset points", va="center", fontsize=8, color="0.4")


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI)
