"""Synthetic-town generator speed on one core: frames per second rendered, and rendered + JPEG-encoded,
at 320x240 and 640x480 over a mix of conditions (the issue's target: >= 50 frames/s at 320x240)."""
from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402

from vpr_rerank_ros.datasets.street_render import StreetRenderer  # noqa: E402
from vpr_rerank_ros.datasets.synth_town import SynthConfig, plan_city, render_shot  # noqa: E402
from vpr_rerank_ros.images import encode_jpeg  # noqa: E402


def main() -> None:
    cv2.setNumThreads(1)
    plan = plan_city(SynthConfig(), seed=0, index=0)
    shots = plan.query[:120] + plan.database[:120]     # query conditions vary: night, fog, rain, winter ...
    for width, height in ((320, 240), (640, 480)):
        renderer = StreetRenderer(plan.town, width, height)
        render_shot(renderer, shots[0])
        start = time.perf_counter()
        frames = [render_shot(renderer, s) for s in shots]
        render_s = time.perf_counter() - start
        start = time.perf_counter()
        for f in frames:
            encode_jpeg(f, 90)
        encode_s = time.perf_counter() - start
        print(f"{width}x{height}: {len(shots) / render_s:.1f} frames/s rendered, "
              f"{len(shots) / (render_s + encode_s):.1f} frames/s rendered + JPEG (one core, {len(shots)} frames)")


if __name__ == "__main__":
    main()
