"""`vpr-replay --report DIR`: a replay's result as one HTML page, DIR/index.html, with its figures
(`report_figures`) as PNG files beside it, referenced relatively: no server, script or external resource is needed
to read it. The page's table is the text report itself (`replay.format_report`), so both show the same numbers."""
from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from . import report_figures as figures
from .replay import ReplayReport

PAGE = "index.html"
FIGURES = ("trajectory.png", "over_time.png", "error_cdf.png", "ellipses.png", "latency.png", "confidence.png")
STYLE = """body { font-family: sans-serif; max-width: 1150px; margin: 1em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td { white-space: pre-wrap; }
th { background: #f3f3f3; white-space: nowrap; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1.5em 0; }
figcaption, .note { color: #555; max-width: 60em; }"""


@dataclass(frozen=True)
class ReplaySetup:
    """What was replayed, for the page's header."""

    bag: str
    map: str
    reranker: str        # rerank.reranker_label
    top_k: int
    filter: bool         # the temporal filter's output scored
    gps: bool            # the bag's GPS fixes used as hints
    mode: str            # "offline", or how the live replay was paced

    def rows(self, report: ReplayReport) -> list[tuple[str, str]]:
        """Label, value pairs; the map's size and zone from `report`, and the date of writing."""
        table = report.map_table
        map_text = self.map if table is None else f"{self.map} ({len(table.easting)} images, UTM {table.zone})"
        return [("bag", self.bag), ("map", map_text), ("re-ranker", self.reranker), ("top-k", str(self.top_k)),
                ("temporal filter", "on" if self.filter else "off"), ("GPS hint", "on" if self.gps else "off"),
                ("replay", self.mode), ("written", datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))]


def write_report(folder: str | Path, report: ReplayReport, summary: str, setup: ReplaySetup) -> Path:
    """Write `folder`/index.html and its figures; returns the page's path. The folder is created; a report
    already there (its page and figures) is replaced, other files are left. `summary` is the text report as
    printed (`format_report`, or `format_live_report`), shown as the page's table."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (PAGE, *FIGURES):
        (folder / name).unlink(missing_ok=True)
    frames = figures.Frames.of(report)
    has_truth = report.errors is not None
    no_truth = "No ground truth in this bag: no error plots."
    sections = [
        ("Trajectory", "trajectory.png", figures.trajectory(report, frames, has_truth, folder / "trajectory.png"),
         "No position to draw: no frame has an estimate and the bag has no GPS fix."),
        ("Error over time" if has_truth else "Jumps over time", "over_time.png",
         figures.over_time(frames, has_truth, folder / "over_time.png"), ""),
        ("Error distribution", "error_cdf.png",
         figures.error_cdf(report, frames, folder / "error_cdf.png") if has_truth else None, no_truth),
        ("Uncertainty: 95 % ellipses", "ellipses.png",
         figures.ellipses(frames, folder / "ellipses.png") if has_truth else None,
         no_truth if not has_truth else "No frame has both an estimate with a covariance and a truth."),
        ("Latency", "latency.png", figures.latency(report, frames, folder / "latency.png"),
         "No latency was measured."),
        ("Confidence against error", "confidence.png",
         figures.confidence(frames, folder / "confidence.png") if has_truth else None,
         no_truth if not has_truth else "The confidences are not known (the node does not publish them)."),
    ]
    title = f"Replay of {Path(setup.bag).name}"
    body = [f"<h1>{html.escape(title)}</h1>", _table(setup.rows(report)), "<h2>Result</h2>",
            _table([_split(line) for line in summary.splitlines()])]
    for heading, name, caption, note in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if caption is None:
            body.append(f'<p class="note">{html.escape(note)}</p>')
        else:
            body.append(f'<figure><img src="{name}" alt="{html.escape(heading)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    page = folder / PAGE
    page.write_text(_page(title, body))
    return page


def write_index(folder: str | Path, title: str, links: list[tuple[str, str, str]]) -> Path:
    """A page `folder`/index.html listing (label, relative link, note) rows, e.g. one report per re-ranker."""
    rows = "\n".join(f'<tr><th><a href="{html.escape(href)}">{html.escape(label)}</a></th>'
                     f"<td>{html.escape(note)}</td></tr>" for label, href, note in links)
    page = Path(folder) / PAGE
    page.write_text(_page(title, [f"<h1>{html.escape(title)}</h1>", f"<table>\n{rows}\n</table>"]))
    return page


def _split(line: str) -> tuple[str, str]:
    """'label: values' -> (label, values); a line without a label -> ('', line)."""
    label, colon, values = line.partition(": ")
    return (label, values) if colon else ("", line)


def _table(rows: list[tuple[str, str]]) -> str:
    cells = (f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" if k else
             f'<tr><td colspan="2">{html.escape(v)}</td></tr>' for k, v in rows)
    return "<table>\n" + "\n".join(cells) + "\n</table>"


def _page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>\n{STYLE}\n</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
