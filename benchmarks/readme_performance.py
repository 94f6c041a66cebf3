"""Regenerate README.md's performance section from the benchmark outputs saved in benchmarks/results/.

benchmarks/run.sh (`make bench`) runs the CPU benchmarks and saves each output as
benchmarks/results/cpu-<script>.txt; `benchmarks/run.sh gpu` does the same on a CUDA machine (gpu-<script>.txt). Each saved file starts with a line
saying when and where it was measured. This script puts them, unedited, between the README's performance markers,
so every figure there is one a script printed.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- performance:begin (benchmarks/readme_performance.py) -->", "<!-- performance:end -->"
ORDER = ("million_map", "frame_latency", "rerank", "geometry", "descriptors", "train_step", "synth_town")
TITLES = {"million_map": "A million-image map", "frame_latency": "One frame end to end",
          "rerank": "Re-rankers, and the references they are checked against", "geometry": "Positional affinity",
          "descriptors": "Descriptor extraction", "train_step": "Training steps", "synth_town": "The synthetic town"}


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


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no performance markers ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + section() + tail)
    print(f"{readme}: performance section regenerated from {RESULTS}")


if __name__ == "__main__":
    main()
