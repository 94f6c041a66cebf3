"""`vpr-demo`: the whole pipeline on a built-in default, in minutes on a laptop CPU.

Generates a seeded synthetic town, builds a map of its database drives with the offline default
descriptor, retrieves for its query drives (which come under other light, weather and season) and prints
Recall@k / mAP@k with and without a noisy GPS hint and Recall@1 per condition; trains the GNN re-ranker with
positional affinity on two other cities (maps described with the same model) and compares it with the
training-free re-rankers on the demo city's queries; then records a query drive as a ROS 2 bag, runs the
vpr_localizer node on it by live replay (/clock, paced by the node) once per re-ranker, and prints the
localisation error table of each and writes its HTML report (reports/index.html in --out links them).
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from .cli import report_user_errors, size_argument
from .datasets import geotagged
from .datasets.msls import load_city, load_side
from .datasets.synth_town import BagConfig, SynthConfig, generate, plan_bag_drive, plan_city, write_bag
from .datasets.town import TownConfig
from .evaluation import CONDITION_FIELDS, Comparison, compare_rerankers, evaluate_queries, format_table, \
    read_conditions, recall_by_condition
from .mapbuild import build_map, map_model
from .mapdb import MapBundle
from .rerank import COMPARED, reranker_label
from .training import TrainSettings, candidate_set, initial_fc, train, train_gnn

DEMO_RERANKERS = tuple((name, params) for name, params in COMPARED if name in ("none", "superglobal", "k_reciprocal",
                                                                                 "gnn_knn"))
LEARNED_LABEL = "gnn+pa (trained here)"
# The demo's GNN: sizes for a 2-core CPU in about a minute (docs/training.md; the study's are larger).
TRAINING = {"K": 50, "fc_epochs": 4, "gnn_epochs": 8, "lr": 3e-4,
            "model": {"L": 25, "width": 128, "heads": 4, "mlp": 256, "layers": 1, "positional": True}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vpr-demo", description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--out", default="demo_output", help="working folder (default ./demo_output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=size_argument, default=(4, 3), help="town size in blocks (default 4x3)")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    parser.add_argument("--bag-length", type=float, default=200.0, help="metres of the replayed drive (default 200)")
    parser.add_argument("--rate", type=float, default=2.0,
                        help="bag seconds per wall second of the live replay, at most (default 2)")
    args = parser.parse_args(argv)
    return report_user_errors("vpr-demo", lambda: _demo(args))


def _demo(args) -> int:
    out = Path(args.out)
    config = SynthConfig(town=TownConfig(blocks_x=args.blocks[0], blocks_y=args.blocks[1]), width=320, height=240,
                         query_sequences=10, query_frames=20)
    timings = {}

    start = time.perf_counter()
    msls = out / f"synth_seed{args.seed}"
    if not (msls / "synth_town.json").exists():
        generate(msls, cities=1, seed=args.seed, config=config, workers=args.workers, progress=True)
    timings["generate town"] = time.perf_counter() - start
    query, database = load_city(msls, "synth0")
    print(f"town: {len(database)} database and {len(query)} query images (320x240), UTM {query.zone}")

    start = time.perf_counter()
    report = build_map(out / "map", geotagged.from_msls(msls, ["synth0"]), overwrite=True, progress=True)
    timings["build map (fit + describe)"] = time.perf_counter() - start
    bundle = report.bundle
    print(f"map: {len(bundle)} images, {bundle.dim}-D {report.model.config.name}")

    start = time.perf_counter()
    model = map_model(bundle)
    plain = evaluate_queries(bundle, model, query, k=20)
    timings["describe + search queries"] = time.perf_counter() - start
    hinted = evaluate_queries(bundle, model, plain.query, k=20, hint_noise_m=10.0, hint_radius=60.0,
                              descriptors=plain.descriptors)

    print("\nretrieval (positives within 25 m)        R@1    R@5    R@10   mAP@10")
    for name, run in (("whole map", plain), ("GPS hint, 10 m noise, 60 m radius", hinted)):
        m = run.metrics
        print(f"{name:40s} {m['recall@1']:.3f}  {m['recall@5']:.3f}  {m['recall@10']:.3f}  {m['map@10']:.3f}")
    _per_condition(plain)

    start = time.perf_counter()
    weights = _train_gnn(out, bundle, model, args)
    timings["train gnn+pa (2 cities)"] = time.perf_counter() - start
    rows = compare_rerankers(bundle, evaluate_queries(bundle, model, plain.query, k=TRAINING["K"],
                                                      descriptors=plain.descriptors),
                             [*DEMO_RERANKERS, ("gnn", {"weights": str(weights)})], log=lambda _: None)
    rows[-1] = Comparison(LEARNED_LABEL, {}, rows[-1].ranked, rows[-1].metrics)
    print(f"\nre-ranking the top {TRAINING['K']} of the whole map (positives within 25 m; %):")
    print(format_table(rows))
    start = time.perf_counter()
    _live_replays(out, config, args, weights)
    timings["live replays"] = time.perf_counter() - start
    print("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print("The offline default is ImageNet EfficientNet-Lite0 + NetVLAD fitted on the map: not trained for "
          f"place recognition. The GNN's checkpoint: {weights} (vpr-train and vpr-study train larger ones).")
    return 0


def _train_gnn(out: Path, bundle: MapBundle, model, args) -> Path:
    """The thesis's two steps (FC1, then the GNN with positional affinity on that frozen FC1) on a training and
    a validation city of another seeded town, mapped with the demo map's descriptor model; returns the GNN's
    best checkpoint. Every stage is kept, so a second demo run reuses them."""
    config = SynthConfig(town=TownConfig(blocks_x=3, blocks_y=3), width=320, height=240, query_sequences=20,
                         query_frames=20)
    town = out / f"training_town_seed{args.seed}"
    if not (town / "synth_town.json").exists():
        generate(town, cities=2, seed=args.seed + 1, config=config, workers=args.workers, progress=True)
    sets = []
    for city in ("synth0", "synth1"):
        path = out / "training_maps" / city
        if (path / "map.json").exists():
            city_map = MapBundle.load(path)
            city_map.check_model(model)
        else:
            city_map = build_map(path, geotagged.from_msls(town, [city]), model, progress=True).bundle
        sets.append(candidate_set(city_map, load_side(town, city, "query"), TRAINING["K"], model=model))
    common = {"K": TRAINING["K"], "lr": TRAINING["lr"], "seed": args.seed}
    print(f"\ntraining gnn+pa on {len(sets[0].relevant)} queries of one city, epochs chosen on another's "
          f"{len(sets[1].relevant)}:")
    fc = train(initial_fc(sets[:1]), sets[:1], sets[1:], TrainSettings(epochs=TRAINING["fc_epochs"], **common),
               out / "training" / "fc", log=_indented, allow_worse=True)
    return train_gnn(fc, sets[:1], sets[1:], TrainSettings(epochs=TRAINING["gnn_epochs"], **common),
                     TRAINING["model"], out / "training" / "gnn+pa", log=_indented, allow_worse=True)


def _indented(line: str) -> None:
    print(f"  {line}")


def _live_replays(out: Path, config: SynthConfig, args, weights: Path) -> None:
    """A query drive through the town as a bag, replayed live to the node once per re-ranker, each with its HTML
    report in out/reports/<re-ranker>/ and a page linking them in out/reports/."""
    from .live_replay import LiveSettings, NodeSetup, format_live_report, replay_live   # ROS only here
    from .report import ReplaySetup, write_index, write_report

    plan, bag_config = plan_city(config, args.seed, 0), BagConfig(length_m=args.bag_length, fps=5.0)
    bag = out / f"drive_seed{args.seed}_{args.bag_length:g}m"
    if not bag.exists():
        write_bag(bag, plan, config, bag_config, args.seed)
    c = plan_bag_drive(plan, config, bag_config, args.seed)[0][0].condition
    print(f"\nlive replay: the vpr_localizer node on a {args.bag_length:g} m drive at {bag_config.fps:g} Hz "
          f"({c.time}, {c.weather}, {c.season}), /clock at up to {args.rate:g}x,\n"
          "each frame waiting for the node's pose; no GPS hint (whole-map retrieval, where re-ranking matters), "
          "top 100 candidates.\nErrors in metres (no estimate = failure); median latency per frame: node = decode "
          "to pose (its diagnostics),\ne2e = image published to pose received.")
    columns = ("answered", "median", "p90", "p95", "<5 m", "<10 m", "<25 m", "R@1", "node ms", "e2e ms")
    print(f"{'re-ranker':28s}" + "".join(f"{c:>9s}" for c in columns))
    settings, links = LiveSettings(rate=args.rate, wait_for_node=True, use_gps=False), []
    for name, params in (*DEMO_RERANKERS, ("gnn", {"weights": str(weights)})):
        node = NodeSetup(map_path=str(out / "map"), reranker=name, reranker_params=params)
        live = replay_live(bag, node, settings)
        e, latency = live.report.errors, live.report.latency_ms
        shares = (e["within_5m"], e["within_10m"], e["within_25m"], live.report.recall["recall@1"])
        cells = [f"{live.answered}/{live.sent}", *(f"{e[k]:.1f}" for k in ("median", "p90", "p95")),
                 *(f"{100 * v:.1f}%" for v in shares),
                 *(f"{latency.get(k, float('nan')):.0f}" for k in ("total", "end_to_end"))]
        label = LEARNED_LABEL if "weights" in params else reranker_label(name, params)
        print(f"{label:28s}" + "".join(f"{c:>9s}" for c in cells))
        folder = re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_")
        write_report(out / "reports" / folder, live.report, format_live_report(live),
                     ReplaySetup(str(bag), node.map_path, label, node.top_k, node.filter, settings.use_gps,
                                 settings.describe()))
        links.append((label, f"{folder}/index.html", f"median error {e['median']:.1f} m, within 25 m "
                                                     f"{100 * e['within_25m']:.1f} %, {live.answered}/{live.sent} "
                                                     "frames answered"))
    index = write_index(out / "reports", f"Live replays of {bag.name}, one per re-ranker", links)
    print(f"\nreports (trajectory, errors, 95 % ellipses, latency): {index}, one folder per re-ranker beside it")


def _per_condition(run) -> None:
    recall = recall_by_condition(run.result.ids, run.positives, read_conditions(run.query))
    print("\nRecall@1 per query condition (database drives are mostly day, clear/overcast, summer):")
    for field in CONDITION_FIELDS:
        cells = [f"{value} {r:.2f} (n={n})" for (name, value), (r, n) in recall.items() if name == field]
        print(f"  {field:8s} " + ", ".join(cells))
