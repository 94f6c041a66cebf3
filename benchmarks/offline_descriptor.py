"""The offline default descriptor's variants on the demo town: for each EfficientNet-Lite0 block and longer image
side given, fit the descriptor on the town's database images (as `vpr-map build` does), describe its query
images and print Recall@1 (a database image within 25 m first), overall and per query condition (light, weather,
season), with the descriptor's milliseconds per 320x240 frame at batch 1.

    .venv/bin/python benchmarks/offline_descriptor.py [--town demo_output/synth_seed0] [--variants 15:320 11:320]

The town is `make demo`'s (demo_output/synth_seed0: 1223 database and 200 query images at 320x240).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from vpr_rerank_ros.datasets import geotagged
from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.descriptors.extract import DescriptorExtractor
from vpr_rerank_ros.descriptors.offline import fit_offline_model, offline_config
from vpr_rerank_ros.evaluation import CONDITION_FIELDS, read_conditions, recall_by_condition
from vpr_rerank_ros.images import read_rgb
from vpr_rerank_ros.metrics import positives_within


def variant(text: str) -> tuple[int, int]:
    block, side = text.split(":")
    return int(block), int(side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--town", default="demo_output/synth_seed0", help="MSLS root of a synthetic town")
    parser.add_argument("--city", default="synth0")
    parser.add_argument("--variants", nargs="+", type=variant, default=[(15, 320), (11, 320)],
                        help="BLOCK:MAX_SIDE pairs (default 15:320, the current default, and 11:320)")
    args = parser.parse_args()
    images = geotagged.from_msls(args.town, [args.city])
    query, _ = load_city(args.town, args.city)
    conditions = read_conditions(query)
    if conditions is None:
        raise SystemExit(f"{args.town} {args.city}: no query conditions (a synthetic town's synth_conditions.csv)")
    positives = positives_within(np.stack([query.easting, query.northing], axis=1),
                                 np.stack([images.table.easting, images.table.northing], axis=1), 25.0)
    frame = read_rgb(query.image_path(0))
    for block, side in args.variants:
        start = time.perf_counter()
        fit = fit_offline_model(images.items, offline_config(backbone_block=block, max_side=side))
        database = fit.descriptors_of_all(images.items)
        fit_s = time.perf_counter() - start
        if database is None or database.keys != list(images.table.keys):
            raise SystemExit("the fit did not describe every database image in order")
        extractor = DescriptorExtractor(fit.model, "cpu", 8)
        queries = extractor.describe_files([(k, str(query.image_path(i))) for i, k in enumerate(query.keys)])
        ranked = np.argmax(queries.descriptors @ database.descriptors.T, axis=1)[:, None]
        hit = np.array([int(r[0]) in set(p) for r, p in zip(ranked, positives)])
        recall = recall_by_condition(ranked, positives, conditions)
        single = DescriptorExtractor(fit.model, "cpu", 1)
        single.describe_arrays([frame])
        start = time.perf_counter()
        for _ in range(10):
            single.describe_arrays([frame])
        ms = (time.perf_counter() - start) * 100
        print(f"block {block}, max side {side}: Recall@1 {hit.mean():.3f}, {fit.model.output_dim}-D, "
              f"{ms:.0f} ms per frame, fit and describe {fit_s:.0f} s", flush=True)
        for field in CONDITION_FIELDS:
            print(f"  {field:8s}" + ", ".join(f"{value} {r:.2f} (n={n})" for (name, value), (r, n) in recall.items()
                                             if name == field), flush=True)


if __name__ == "__main__":
    main()
