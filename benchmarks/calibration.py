"""Calibration of the pose covariance and the temporal filter's effect, per drive and training-free re-ranker:
offline replays (`replay.replay_bag`, the node's code path) with and without the GPS hint, and with and without
the filter. Prints error median / p95 / max (m), the coverage of the 95 % ellipse and the mean NEES.

The drives are the demo's (`make demo` writes demo_output/map and demo_output/drive_seed0_200m) and, by default,
the same route at night in fog, written here when missing (the vpr-synth command it equals is printed).

    .venv/bin/python benchmarks/calibration.py [--map demo_output/map] [--bags BAG ...] [--filter off|on|both]
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from vpr_rerank_ros.localizer import Localizer, LocalizerSettings
from vpr_rerank_ros.mapbuild import map_model
from vpr_rerank_ros.mapdb import MapBundle
from vpr_rerank_ros.replay import replay_bag
from vpr_rerank_ros.rerank import COMPARED, reranker_label
from vpr_rerank_ros.tracking import PoseFilter

DEMO = Path("demo_output")
# The demo's town and drive (vpr_rerank_ros/demo.py), at night in fog.
NIGHT_FOG = ["--seed", "0", "--blocks", "4x3", "--size", "320x240", "--query-sequences", "10", "--query-frames", "20",
             "--bag-length", "200", "--bag-time", "night", "--bag-weather", "fog"]


class RememberedDescriptors:
    """The localizer's descriptor extractor, remembering each frame's descriptor: every replay of a drive
    describes the same frames, only re-ranking, pose and filter differ (so latency is not measured here)."""

    def __init__(self, extractor) -> None:
        self.extractor, self.seen = extractor, {}

    def describe_arrays(self, images):
        key = hashlib.sha1(b"".join(image.tobytes() for image in images)).hexdigest()
        if key not in self.seen:
            self.seen[key] = self.extractor.describe_arrays(images)
        return self.seen[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--map", default=str(DEMO / "map"))
    parser.add_argument("--bags", nargs="+", default=[str(DEMO / "drive_seed0_200m"), str(DEMO / "drive_night_fog")])
    parser.add_argument("--filter", choices=("off", "on", "both"), default="both", help="replays with the filter")
    args = parser.parse_args()
    for bag in args.bags:
        if Path(bag).name == "drive_night_fog" and not Path(bag).exists():
            command = [str(Path(sys.executable).parent / "vpr-synth"), *NIGHT_FOG, "--bag", bag]
            print("writing", bag, ":", " ".join(command[1:]), flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    bundle = MapBundle.load(args.map)
    localizer = Localizer(bundle, map_model(bundle), "none", LocalizerSettings())
    localizer.extractor = RememberedDescriptors(localizer.extractor)
    print(f"{'drive':18s} {'re-ranker':24s} {'GPS':4s} {'filter':6s} {'frames':>6s} {'median':>7s} {'p95':>7s} "
          f"{'max':>7s} {'cover95':>8s} {'NEES':>7s}")
    for bag in args.bags:
        for name, params in COMPARED:
            localizer.set_reranker(name, **params)
            for use_gps in (False, True):
                for filtered in {"off": (False,), "on": (True,), "both": (False, True)}[args.filter]:
                    report = replay_bag(bag, localizer, use_gps=use_gps, tracker=PoseFilter() if filtered else None)
                    e, c = report.errors, report.calibration
                    print(f"{Path(bag).name:18s} {reranker_label(name, params):24s} {'on' if use_gps else 'off':4s} "
                          f"{'on' if filtered else 'off':6s} {report.frames:6d} {e['median']:7.1f} {e['p95']:7.1f} "
                          f"{e['max']:7.1f} {100 * c['coverage95']:7.1f}% {c['mean_nees']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
