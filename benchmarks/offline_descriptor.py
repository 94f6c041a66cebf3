"""The offline default descriptor's variants, on every evaluation set given: for each EfficientNet-Lite0 block and
longer image side, fit the descriptor on the set's map images (as `vpr-map build` does), describe its queries and
print Recall@1 (a map image within 25 m first; also within 10 m), overall and per query condition (time of day, weather,
season) where the set has them, with the descriptor's milliseconds per query frame at batch 1.

    .venv/bin/python benchmarks/offline_descriptor.py [--town ROOT:CITY ...] [--lund DIR] [--variants 15:320 11:320]

Sets: synthetic towns in the MSLS layout (database side = map, query side = queries; default `make demo`'s
demo_output/synth_seed0 and both cities of its training town demo_output/training_town_seed0, another seed), and the
Lund photos (../shared/data/lund: the even-numbered photos as the map, the odd-numbered ones as queries; skipped
when absent).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from timing import run_times

from vpr_rerank_ros.datasets import geotagged
from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.descriptors.extract import DescriptorExtractor
from vpr_rerank_ros.descriptors.offline import fit_offline_model, offline_config
from vpr_rerank_ros.evaluation import CONDITION_FIELDS, read_conditions, recall_by_condition
from vpr_rerank_ros.images import read_rgb
from vpr_rerank_ros.metrics import positives_within

LUND = Path(__file__).resolve().parents[2] / "shared" / "data" / "lund"


@dataclass
class EvaluationSet:
    """Map images to fit and describe, queries with positions, and the queries' conditions when known."""

    name: str
    map_images: geotagged.ImageSet
    queries: list                       # (key, path)
    positives: list                     # per query, the map rows within 25 m
    close_positives: list               # within 10 m
    conditions: dict | None


def _positives(query_xy: np.ndarray, table) -> tuple[list, list]:
    """The map rows within 25 m of each query, and within 10 m."""
    map_xy = np.stack([table.easting, table.northing], axis=1)
    return positives_within(query_xy, map_xy, 25.0), positives_within(query_xy, map_xy, 10.0)


def town(spec: str) -> EvaluationSet:
    root, city = spec.rsplit(":", 1) if ":" in spec else (spec, "synth0")
    images = geotagged.from_msls(root, [city])
    query, _ = load_city(root, city)
    return EvaluationSet(f"{Path(root).name}/{city}", images, [(k, str(query.image_path(i)))
                                                               for i, k in enumerate(query.keys)],
                         *_positives(np.stack([query.easting, query.northing], axis=1), images.table),
                         read_conditions(query))


def lund(folder: Path) -> EvaluationSet:
    photos = geotagged.from_folder(folder)
    even = np.array([int(key) % 2 == 0 for key, _ in photos.items])      # 02.jpg, 04.jpg, ...
    map_images = geotagged.ImageSet([item for item, m in zip(photos.items, even) if m], photos.table.take(even))
    query_xy = np.stack([photos.table.easting, photos.table.northing], axis=1)[~even]
    return EvaluationSet("lund", map_images, [item for item, m in zip(photos.items, even) if not m],
                         *_positives(query_xy, map_images.table), None)


def variant(text: str) -> tuple[int, int]:
    block, side = text.split(":")
    return int(block), int(side)


def evaluate(evaluation: EvaluationSet, block: int, side: int) -> None:
    start = time.perf_counter()
    fit = fit_offline_model(evaluation.map_images.items, offline_config(backbone_block=block, max_side=side))
    database = fit.descriptors_of_all(evaluation.map_images.items)
    fit_s = time.perf_counter() - start
    if database is None or database.keys != [k for k, _ in evaluation.map_images.items]:
        raise SystemExit("the fit did not describe every map image in order")
    queries = DescriptorExtractor(fit.model, "cpu", 8).describe_files(evaluation.queries)
    ranked = np.argmax(queries.descriptors @ database.descriptors.T, axis=1)[:, None]
    hit = np.array([int(r[0]) in set(p) for r, p in zip(ranked, evaluation.positives)])
    near = np.array([int(r[0]) in set(p) for r, p in zip(ranked, evaluation.close_positives)])
    single = DescriptorExtractor(fit.model, "cpu", 1)
    frame = read_rgb(evaluation.queries[0][1])
    ms = 1e3 * np.mean(run_times(lambda: single.describe_arrays([frame]), 10))
    print(f"{evaluation.name}: block {block}, max side {side}: Recall@1 {100 * hit.mean():.1f} % (n={len(hit)}; "
          f"within 10 m {100 * near.mean():.1f} %), {fit.model.output_dim}-D, "
          f"{ms:.0f} ms per {frame.shape[1]}x{frame.shape[0]} frame, "
          f"fit and describe {fit_s:.0f} s", flush=True)
    if evaluation.conditions is not None:
        recall = recall_by_condition(ranked, evaluation.positives, evaluation.conditions)
        for field in CONDITION_FIELDS:
            print(f"  {field:8s}" + ", ".join(f"{value} {100 * r:.1f} (n={n})"
                                             for (name, value), (r, n) in recall.items() if name == field), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--town", action="append", help="ROOT[:CITY] of a synthetic town (repeatable; default "
                        "demo_output/synth_seed0:synth0 and demo_output/training_town_seed0's synth0 and synth1)")
    parser.add_argument("--lund", type=Path, default=LUND, help="folder of the Lund photos (skipped when absent)")
    parser.add_argument("--variants", nargs="+", type=variant, default=[(15, 320), (11, 320)],
                        help="BLOCK:MAX_SIDE pairs (default 15:320, the last block, and 11:320, the default)")
    args = parser.parse_args()
    sets = [town(spec) for spec in args.town or ["demo_output/synth_seed0:synth0",
                                                 "demo_output/training_town_seed0:synth0",
                                                 "demo_output/training_town_seed0:synth1"]]
    if args.lund.is_dir():
        sets.append(lund(args.lund))
    else:
        print(f"{args.lund}: no such folder, the Lund photos are left out")
    for evaluation in sets:
        for block, side in args.variants:
            evaluate(evaluation, block, side)


if __name__ == "__main__":
    main()
