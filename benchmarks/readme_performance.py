"""Regenerate README.md's generated sections: the performance section from the benchmark outputs saved in
benchmarks/results/ and, with --demo, the demo's tables from demo_output/demo.log.

benchmarks/run.sh (`make bench`) runs the CPU benchmarks and saves each output as
benchmarks/results/cpu-<script>.txt; `benchmarks/run.sh gpu` does the same on a CUDA machine (gpu-<script>.txt).
Each saved file starts with a line saying when and where it was measured. This script puts them, unedited, between
the README's performance markers, so every figure there is one a script printed. `make demo` saves the demo's
output in demo_output/demo.log after a line of the same kind; `--demo` puts its re-ranking and live-replay tables,
unedited, between the demo markers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- performance:begin (benchmarks/readme_performance.py) -->", "<!-- performance:end -->"
ORDER = ("million_map", "frame_latency", "rerank", "geometry", "descriptors", "offline_descriptor", "train_step",
         "synth_town", "calibration")
TITLES = {"million_map": "A million-image map", "frame_latency": "One frame end to end",
          "rerank": "Re-rankers, and the references they are checked against", "geometry": "Positional affinity",
          "descriptors": "Descriptor extraction",
          "offline_descriptor": "The offline default descriptor's backbone block, per condition and on real photos",
          "train_step": "Training steps", "synth_town": "The synthetic town",
          "calibration": "Covariance calibration and the temporal filter on the demo drive, by day and at night in fog"}
DEMO_LOG = ROOT / "demo_output" / "demo.log"
DEMO_BEGIN, DEMO_END = "<!-- demo:begin (benchmarks/readme_performance.py --demo) -->", "<!-- demo:end -->"
DEMO_TITLE = "**`make demo`'s tables**"
# How the demo's tables begin (spaces collapsed): the re-ranking table's title, the live-replay table's header.
DEMO_TABLE_STARTS = ("re-ranking the top ", "re-ranker answered ")


def section() -> str:
    """The markdown between the markers: one block per saved output, CPU first, then GPU."""
    parts = [BEGIN]
    for name in ORDER:
        for machine in ("cpu", "gpu"):
            path = RESULTS / f"{machine}-{name}.txt"
            if not path.exists():
                continue
            lines = path.read_text().rstrip("\n").splitlines()
            parts += [f"**{TITLES[name]}** (`benchmarks/{name}.py`; {lines[0]}):", "", "```", *lines[1:], "```", ""]
    return "\n".join(parts + [END])


def demo_tables(lines: list[str]) -> list[list[str]]:
    """The demo output's re-ranking and live-replay tables, each from its first line (DEMO_TABLE_STARTS) to the
    blank line after it; a ValueError names a table that is not there."""
    tables = []
    for start in DEMO_TABLE_STARTS:
        first = next((i for i, line in enumerate(lines) if " ".join(line.split()).startswith(start)), None)
        if first is None:
            raise ValueError(f"no table starting {start!r}")
        end = next((i for i in range(first, len(lines)) if not lines[i].strip()), len(lines))
        tables.append(lines[first:end])
    return tables


def demo_section(log: Path) -> str:
    """The markdown between the demo markers: when and where the demo ran and its timings, then its two tables."""
    if not log.exists():
        raise SystemExit(f"{log} not found: run `make demo` first (it saves the demo's output there)")
    lines = log.read_text().splitlines()
    timings = next((line for line in lines if line.startswith("timings: ")), None)
    if not lines or not lines[0].startswith("measured ") or timings is None:
        raise SystemExit(f"{log}: not the output of a whole `make demo` run (a first line 'measured ...' and a "
                         "'timings: ...' line)")
    try:
        reranking, live = demo_tables(lines)
    except ValueError as exc:
        raise SystemExit(f"{log}: {exc}") from None
    return "\n".join([DEMO_BEGIN, f"{DEMO_TITLE} ({lines[0]}; {timings}):", "", "```", *reranking, "", *live, "```",
                      DEMO_END])


def regenerate(readme: Path, begin: str, end: str, text: str) -> None:
    """Replace README.md's text from `begin` to `end` (both markers included) by `text`."""
    content = readme.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{readme}: no markers {begin} ... {end}")
    head, rest = content.split(begin, 1)
    readme.write_text(head + text + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help=f"the demo's tables from {DEMO_LOG.relative_to(ROOT)} "
                                                            "instead of the performance section")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    if args.demo:
        regenerate(readme, DEMO_BEGIN, DEMO_END, demo_section(DEMO_LOG))
        print(f"{readme}: the demo's tables regenerated from {DEMO_LOG}")
    else:
        regenerate(readme, BEGIN, END, section())
        print(f"{readme}: performance section regenerated from {RESULTS}")


if __name__ == "__main__":
    main()
