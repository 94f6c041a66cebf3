"""Console scripts: each parses its arguments, calls the core and returns an exit code: 0 success, 1 a user
error reported in one line that names the problem, 2 bad usage (argparse's own), 130 interrupted (Ctrl-C, the
shell's 128 + SIGINT). `*_main(argv)` functions are importable."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable

from .descriptors.offline import OFFLINE_BLOCK
from .local_features import EXTRACTORS, MAX_KEYPOINTS
from .mapdb import FILES, IndexConfig, MapBundle
from .localizer import LocalizerSettings
from .rerank import COMPARED, reranker_label

TOP_K = LocalizerSettings.top_k   # candidates retrieved and re-ranked per query, as the node's default

# What a user's input can cause (a missing file, a bad value, a map that does not fit, a failed node or a
# training that diverged): one line on stderr and exit code 1, never a traceback.
USER_ERRORS = (OSError, ValueError, RuntimeError, ArithmeticError)
INTERRUPTED = 130   # the exit code of a command stopped by Ctrl-C: 128 + SIGINT, as the shell reports it


def report_user_errors(prog: str, action: Callable[[], int], interrupted: str = "") -> int:
    """`action()`'s exit code, or 1 after printing a user error as `prog: message`, or INTERRUPTED after printing
    `prog: interrupted` and what `interrupted` says was left behind, for Ctrl-C."""
    try:
        return action()
    except USER_ERRORS as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{f'; {interrupted}' if interrupted else ''}", file=sys.stderr)
        return INTERRUPTED


def _warn(prog: str) -> Callable[[str], None]:
    return lambda text: print(f"{prog}: {text}", file=sys.stderr)


def map_main(argv: list[str] | None = None) -> int:
    """`vpr-map build|describe|query|info|verify|export-hloc`: build maps from geotagged images, query them, inspect
    them, write their descriptors and local features for hloc."""
    parser = argparse.ArgumentParser(prog="vpr-map", description="Build, query and inspect map bundles.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("info", "print what a map holds"), ("verify", "check files, shapes and checksums")):
        p = sub.add_parser(name, help=text)
        p.add_argument("map", help="map directory")
    build = sub.add_parser("build", help="describe geotagged images and write a map")
    _image_source(build, "map directory to write", "folder of photos with EXIF GPS (sorted by name = order of "
                  "capture)", "MSLS root; the database side of --cities is used")
    build.add_argument("--headings", help="with --images: CSV of name, heading overriding EXIF/travel headings")
    build.add_argument("--overwrite", action="store_true", help="replace an existing map")
    _model_options(build, "descriptor weights (.mat, pytorch-NetVlad .pth.tar, .safetensors); "
                          "default: fit the offline EfficientNet-Lite0 NetVLAD on these images")
    build.add_argument("--index", choices=("flat", "ivfpq"), default="flat",
                       help="faiss index: flat (exact, default) or ivfpq (PCA + IVF-PQ, re-scored exactly; for maps of "
                            "hundreds of thousands of images and more, see docs/formats.md)")
    ivfpq = IndexConfig(kind="ivfpq")
    for name, text in (("nlist", "IVF cells"), ("nprobe", "cells visited per search"),
                       ("pca_dim", "dimension the index works in (0: the descriptors' own)"),
                       ("rescore", "approximate answers re-scored exactly per query")):
        build.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(ivfpq, name),
                           help=f"with --index ivfpq: {text} (default {getattr(ivfpq, name)})")
    build.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored descriptor type")
    build.add_argument("--descriptors", help="HDF5 of precomputed descriptors keyed by image key (datasets keys, "
                                             "descriptors) to use instead of describing the images")
    build.add_argument("--global-features", metavar="H5",
                       help="hloc's global descriptors (global-feats-*.h5) to use instead of describing the images; "
                            "entries are matched by image key or by the image path's tail (docs/formats.md)")
    build.add_argument("--local-features", choices=("none", *EXTRACTORS), default="none",
                       help="also extract local features of every map image (OpenCV; at most "
                            f"{MAX_KEYPOINTS} per image) into the map for geometric verification (default none)")
    build.add_argument("--local-features-file", metavar="H5",
                       help="instead of --local-features: hloc's local features (feats-*.h5, e.g. SuperPoint), "
                            "copied into the map for its images")
    describe = sub.add_parser("describe", help="describe many images into one HDF5 file (sharded over the "
                                               "processes of a torchrun job, resumable)")
    _image_source(describe, "HDF5 file to write (keys, descriptors)", "folder of images (key: file name without "
                  "suffix)", "MSLS root: the --sides of --cities")
    describe.add_argument("--sides", default="database,query", help="with --msls: database, query or both (default)")
    _model_options(describe, "descriptor weights (required: every process must use the same model)")
    export = sub.add_parser("export-hloc", help="write a map's descriptors and local features in hloc's layouts")
    export.add_argument("map", help="map directory")
    export.add_argument("--out", required=True, help="folder for global-feats-<descriptor>.h5 and feats-<extractor>.h5")
    export.add_argument("--image-root", help="name entries by the image path relative to this folder (hloc's "
                                             "image_dir); default: by image key")
    query = sub.add_parser("query", help="retrieve the top-k map images for a folder of query images")
    query.add_argument("map", help="map directory")
    query.add_argument("--images", required=True, help="folder of query images")
    query.add_argument("--top-k", type=int, default=10, help="matches per query (default 10)")
    query.add_argument("--out", required=True, help="CSV to write")
    _model_options(query, "descriptor weights; default: the model stored in the map")
    args = parser.parse_args(argv)
    commands = {"build": _map_build, "describe": _map_describe, "query": _map_query, "info": _map_info,
                "verify": _map_info, "export-hloc": _map_export_hloc}
    return report_user_errors("vpr-map", lambda: commands[args.command](args), _left_behind(args))


def _left_behind(args) -> str:
    """What an interrupted `vpr-map` command leaves, for its one line."""
    if args.command == "describe":
        return f"the same command resumes {args.out} with the images not described yet"
    if args.command != "build":
        return ""
    kept = []
    if args.model:
        kept.append(f"the images described so far are kept in {args.out}.describing.h5")
    if args.local_features != "none" or args.local_features_file:
        kept.append(f"the local features extracted so far are kept in {args.out}.features.h5")
    if not kept:
        return "no map written"
    return f"no map written; {' and '.join(kept)}, and the same command resumes from them"


def _image_source(parser: argparse.ArgumentParser, out_help: str, images_help: str, msls_help: str) -> None:
    """--out and the images to read, from exactly one of --images, --msls (with --cities) or --csv."""
    parser.add_argument("--out", required=True, help=out_help)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help=images_help)
    source.add_argument("--msls", help=msls_help)
    source.add_argument("--csv", help="CSV with path, lat, lon, heading (or path, easting, northing, zone, heading)")
    parser.add_argument("--cities", help="with --msls: comma-separated cities, or train/val (default: all)")


def _map_info(args) -> int:
    bundle = MapBundle.load(args.map, verify=args.command == "verify", use_gpu=False)
    if args.command == "verify":
        print(f"{args.map}: OK ({len(bundle)} images, all checksums match)")
        return 0
    meta, table = bundle.meta.to_json(), bundle.table
    summary = {
        "path": str(bundle.root),
        "images": len(bundle),
        "utm_zone": meta["utm_zone"],
        "extent_m": {"easting": [float(table.easting.min()), float(table.easting.max())],
                     "northing": [float(table.northing.min()), float(table.northing.max())]},
        **{key: meta[key] for key in ("descriptor", "index", "fov", "overlap_pairs")},
        "attachments": sorted(set(meta["files"]) - set(FILES)),
        **({"local_features": bundle.local_features.summary()} if bundle.local_features is not None else {}),
        "bytes": sum(f["bytes"] for f in meta["files"].values()),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _model_options(parser: argparse.ArgumentParser, weights_help: str) -> None:
    parser.add_argument("--model", help=weights_help)
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--fp16", action="store_true", help="float16 autocast on CUDA (ignored on the CPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--workers", type=int, default=0, help="image loading processes (default 0)")


def _map_build(args) -> int:
    from .datasets import geotagged
    from .datasets.msls import resolve_cities
    from .descriptors.extract import pick_device
    from .descriptors.loaders import load_model
    from .mapbuild import build_map, refuse_existing

    refuse_existing(args.out, args.overwrite)   # before any image is read or model loaded
    pick_device(args.device)
    if args.images:
        images = geotagged.from_folder(args.images, args.headings)
    elif args.csv:
        images = geotagged.from_csv(args.csv)
    else:
        images = geotagged.from_msls(args.msls, resolve_cities(args.msls, args.cities))
    model = load_model(args.model) if args.model else None
    if model is None and args.descriptors is None and args.global_features is None:
        print("vpr-map: fitting the offline EfficientNet-Lite0 NetVLAD on the map images "
              "(ImageNet features, not trained for place recognition)", file=sys.stderr)
    report = build_map(args.out, images, model, device=args.device, fp16=args.fp16, batch_size=args.batch_size,
                       workers=args.workers, dtype=args.dtype,
                       index=IndexConfig(kind=args.index, nlist=args.nlist, nprobe=args.nprobe, pca_dim=args.pca_dim,
                                         rescore=args.rescore),
                       overwrite=args.overwrite, progress=True, descriptor_file=args.descriptors,
                       global_features=args.global_features, local_features_file=args.local_features_file,
                       local_features=None if args.local_features == "none" else args.local_features)
    for key, reason in report.skipped.items():
        print(f"skipped {key}: {reason}", file=sys.stderr)
    for warning in report.warnings:
        print(f"vpr-map: WARNING: {warning}", file=sys.stderr)
    meta = report.bundle.meta
    print(f"{args.out}: {len(report.bundle)} images, {meta.descriptor.dim}-D {meta.descriptor.name} descriptors, "
          f"UTM {meta.zone}, {meta.overlap_pairs} overlapping pairs")
    return 0


def _map_export_hloc(args) -> int:
    from .hloc import export_hloc

    for path in export_hloc(MapBundle.load(args.map, use_gpu=False), args.out, args.image_root):
        print(path)
    return 0


def _map_describe(args) -> int:
    from .datasets import geotagged
    from .datasets.msls import load_side, resolve_cities
    from .descriptors.loaders import load_model
    from .descriptors.sharded import describe_sharded
    from .distributed import workers

    if not args.model:
        raise ValueError("describe needs --model: the offline default is fitted per map, and every process of "
                         "the job must describe with the same weights")
    if args.msls:
        sides = [side for side in args.sides.split(",") if side]
        if not sides or set(sides) - {"database", "query"}:
            raise ValueError(f"--sides takes database, query or both, got {args.sides!r}")
        loaded = [load_side(args.msls, city, side) for city in resolve_cities(args.msls, args.cities) for side in sides]
        items = [(key, str(path)) for side in loaded for key, path in zip(side.keys, side.image_paths())]
    elif args.csv:
        items = geotagged.from_csv(args.csv).items
    else:
        items = [(path.stem, str(path)) for path in geotagged.list_images(args.images)]
    here = workers(args.device)
    failed = describe_sharded(items, load_model(args.model), args.out, here, here.device(args.device),
                              args.batch_size, args.workers, progress=True, fp16=args.fp16)
    for key, reason in failed.items():
        print(f"skipped {key}: {reason}", file=sys.stderr)
    if here.main:
        print(f"{args.out}: descriptors of {len(items)} images by {here.world} process(es)"
              f"{f', {len(failed)} unreadable on rank 0' if failed else ''}")
    return 0


def _map_query(args) -> int:
    import csv

    from .datasets.geotagged import list_images
    from .mapbuild import map_model, query_images

    bundle = MapBundle.load(args.map)
    model = map_model(bundle, args.model)
    items = [(p.stem, str(p)) for p in list_images(args.images)]
    rows = query_images(bundle, model, items, args.top_k, args.device, args.batch_size, args.workers, args.fp16)
    columns = ("query", "rank", "key", "score", "easting", "northing", "query_easting", "query_northing")
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    print(f"{args.out}: {len(rows)} rows for {len({r['query'] for r in rows})} queries")
    for row in rows:
        if row["rank"] == 1:
            print(_top_match_line(row))
    return 0


def _top_match_line(row: dict) -> str:
    """A query's best match in one line: its key and score, and how far it lies from the query's own GPS position
    when the query has one."""
    line = f"{row['query']}: {row['key']} (score {row['score']:.3f})"
    if row["query_easting"] is None:
        return f"{line}, query without GPS"
    distance = math.hypot(row["easting"] - row["query_easting"], row["northing"] - row["query_northing"])
    return f"{line}, {distance:.1f} m from the query's GPS position"


def weights_main(argv: list[str] | None = None) -> int:
    """`vpr-weights convert IN OUT` turns .mat / pytorch-NetVlad weights into safetensors + JSON; `info` describes
    weights; `export-onnx` writes a descriptor model or a learned re-ranker as ONNX (docs/deployment.md)."""
    from .descriptors.loaders import convert, load_model

    parser = argparse.ArgumentParser(prog="vpr-weights", description="Convert, inspect and export weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="write weights in the project's safetensors + JSON format")
    conv.add_argument("source", help=".mat (hloc MatConvNet struct), .pth/.pth.tar (pytorch-NetVlad) or .safetensors")
    conv.add_argument("target", help="output .safetensors (a .json config is written beside it)")
    info = sub.add_parser("info", help="print a model's configuration and identity")
    info.add_argument("weights")
    export = sub.add_parser("export-onnx", help="write a descriptor model or a learned re-ranker as ONNX")
    export.add_argument("weights", help="descriptor weights (.mat, .pth.tar, .safetensors, a map's model.safetensors) "
                                        "or a learned re-ranker checkpoint (.safetensors): told apart by the JSON")
    export.add_argument("target", help="output .onnx")
    export.add_argument("--height", type=int, default=240, help="descriptor: example image height traced "
                                                                "(default 240; the graph takes any size)")
    export.add_argument("--width", type=int, default=320, help="descriptor: example image width (default 320)")
    args = parser.parse_args(argv)
    if args.command == "export-onnx":
        return report_user_errors("vpr-weights", lambda: _export_onnx(args))

    def run() -> int:
        model = convert(args.source, args.target) if args.command == "convert" else load_model(args.weights)
        print(json.dumps({**json.loads(model.config.to_json()), "output_dim": model.output_dim,
                          "identity": model.identity}, indent=2, sort_keys=True))
        return 0

    return report_user_errors("vpr-weights", run)


def _export_onnx(args) -> int:
    from .onnx_export import export_checkpoint, graph_signature

    if min(args.height, args.width) < 32:
        raise ValueError(f"--height and --width must be at least 32, got {args.height} x {args.width}")
    kind, path = export_checkpoint(args.weights, args.target, (args.height, args.width))
    print(json.dumps({"kind": kind, "onnx": str(path), "bytes": path.stat().st_size,
                      "signature": graph_signature(path)}, indent=2))
    return 0


def size_argument(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}") from None
    return w, h


def synth_main(argv: list[str] | None = None) -> int:
    """`vpr-synth`: generate synthetic towns in the MSLS layout, and optionally a query-drive bag."""
    from .datasets.street_render import SEASONS, TIMES, WEATHERS   # the whole datasets package: only here

    parser = argparse.ArgumentParser(prog="vpr-synth", description=synth_main.__doc__.split(":", 1)[1].strip())
    parser.add_argument("--out", help="MSLS root directory to write (train_val/<city>/...)")
    parser.add_argument("--cities", type=int, default=3, help="number of towns (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical output")
    parser.add_argument("--size", type=size_argument, default=(640, 480),
                        help="image size WIDTHxHEIGHT (default 640x480)")
    parser.add_argument("--blocks", type=size_argument, default=(5, 4), help="town size in blocks, XxY (default 5x4)")
    parser.add_argument("--spacing", type=float, default=4.0, help="metres between frames (default 4)")
    parser.add_argument("--query-sequences", type=int, default=12, help="query drives per city (default 12)")
    parser.add_argument("--query-frames", type=int, default=30, help="frames per query drive (default 30)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    parser.add_argument("--contact-sheet", help="write a PNG of query/database pairs of the first city")
    bag = parser.add_argument_group("query-drive bag")
    bag.add_argument("--bag", help="write a ROS 2 bag directory of a query drive through --bag-city")
    bag.add_argument("--bag-city", type=int, default=0, help="index of the city to drive (default 0)")
    bag.add_argument("--bag-length", type=float, default=600.0, help="metres driven (default 600)")
    bag.add_argument("--bag-fps", type=float, default=5.0, help="camera rate in Hz (default 5)")
    bag.add_argument("--bag-raw", action="store_true", help="sensor_msgs/Image rgb8 instead of CompressedImage jpeg")
    bag.add_argument("--bag-storage", choices=("mcap", "sqlite3"), default="mcap", help="bag storage (default mcap)")
    bag.add_argument("--gps-noise", type=float, default=3.0, help="GPS noise in metres (default 3)")
    bag.add_argument("--gps-rate", type=float, default=1.0, help="GPS rate in Hz (default 1)")
    bag.add_argument("--bag-time", choices=TIMES, help="the drive's light (default: drawn like a query drive's)")
    bag.add_argument("--bag-weather", choices=WEATHERS, help="the drive's weather (default: drawn)")
    bag.add_argument("--bag-season", choices=SEASONS, help="the drive's season (default: drawn)")
    args = parser.parse_args(argv)
    if not (args.out or args.bag or args.contact_sheet):
        parser.error("give at least one of --out, --bag and --contact-sheet")
    return report_user_errors("vpr-synth", lambda: _synth(args))


def _synth(args) -> int:
    from .datasets.synth_town import BagConfig, SynthConfig, contact_sheet, generate, plan_city, write_bag
    from .datasets.town import TownConfig

    config = SynthConfig(town=TownConfig(blocks_x=args.blocks[0], blocks_y=args.blocks[1]),
                         width=args.size[0], height=args.size[1], frame_spacing_m=args.spacing,
                         query_sequences=args.query_sequences, query_frames=args.query_frames)
    bag_config = BagConfig(length_m=args.bag_length, fps=args.bag_fps, gps_noise_m=args.gps_noise,
                           gps_rate_hz=args.gps_rate, compressed=not args.bag_raw, storage=args.bag_storage,
                           time=args.bag_time, weather=args.bag_weather, season=args.bag_season)
    if args.out:
        plans = generate(args.out, args.cities, args.seed, config, workers=args.workers, progress=True)
        for plan in plans:
            print(f"{plan.name}: UTM {plan.zone}, {len(plan.database)} database and {len(plan.query)} query images")
    if args.bag:
        plan = plan_city(config, args.seed, args.bag_city)
        path = write_bag(args.bag, plan, config, bag_config, args.seed)
        print(f"bag: {path} ({plan.name}, {bag_config.storage})")
    if args.contact_sheet:
        import cv2

        sheet = contact_sheet(plan_city(config, args.seed, 0), config)
        cv2.imwrite(args.contact_sheet, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        print(f"contact sheet: {args.contact_sheet}")
    return 0


def _reranker_spec(text: str) -> tuple[str, dict]:
    """'superglobal:P=1,beta=0.6' -> ('superglobal', {'P': 1, 'beta': 0.6}); values parsed as YAML scalars."""
    import yaml

    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"re-ranker parameter {item!r} is not key=value (in {text!r})")
        params[key.strip()] = yaml.safe_load(value)
    return name.strip(), params


def eval_main(argv: list[str] | None = None) -> int:
    """`vpr-eval`: re-rankers compared on an MSLS-layout dataset (thesis Table 4.1 layout)."""
    parser = argparse.ArgumentParser(prog="vpr-eval", description="Compare re-rankers on MSLS-layout queries, or on "
                                     "geotagged photos (a folder with EXIF GPS, or a CSV as vpr-map build reads).")
    parser.add_argument("--msls", help="MSLS root (real or synthetic); with --city")
    parser.add_argument("--city", help="city whose query side is evaluated")
    parser.add_argument("--queries", help="instead of --msls/--city: a folder of photos with EXIF GPS, or a CSV of "
                                          "path, lat, lon (or easting, northing, zone), heading")
    parser.add_argument("--map", required=True, help="map of the same place (vpr-map build, e.g. from the city's "
                                                     "database side)")
    parser.add_argument("--model", help="descriptor weights, if the map does not store its model")
    parser.add_argument("--descriptors", help="HDF5 of precomputed query descriptors keyed by image key (datasets "
                                              "keys, descriptors) instead of describing the query images")
    parser.add_argument("--subtask", default="all", help="MSLS subtask of the queries (default all)")
    parser.add_argument("-K", "--top-k", type=int, default=TOP_K,
                        help=f"candidates re-ranked per query (default {TOP_K})")
    parser.add_argument("--reranker", action="append", type=_reranker_spec, default=[],
                        help="NAME or NAME:key=value,... (repeatable), e.g. superglobal:P=1,beta=0.6; default: "
                             + ", ".join(reranker_label(n, p) for n, p in COMPARED))
    parser.add_argument("--config", help="YAML list of {name: ..., <params>} re-rankers")
    parser.add_argument("--grid", action="store_true", help="also search the thesis grids for AQE, aQE, SuperGlobal")
    parser.add_argument("--geometric", nargs="?", const={}, type=_geometric_params, metavar="KEY=VALUE,...",
                        help="after each re-ranker's row, its ranking geometrically verified (<name>+geometric, with "
                             "the shares of queries where the trigger fired and the top 1 changed); needs a map "
                             "with local features; parameters as GeometricSettings, e.g. top_n=20,min_inliers=30")
    parser.add_argument("--out", help="folder for results.csv, results.md and one prediction file per re-ranker")
    parser.add_argument("--device", default="cpu", help="device for re-ranking (default cpu)")
    args = parser.parse_args(argv)
    msls = (args.msls, args.city)
    if (args.queries is None and None in msls) or (args.queries is not None and msls != (None, None)):
        parser.error("give the queries as --msls ROOT --city CITY, or as --queries FOLDER|CSV")
    if args.queries is not None and args.subtask != "all":
        parser.error("--subtask applies to MSLS queries only")
    return report_user_errors("vpr-eval", lambda: _evaluate(args))


def _geometric_params(text: str) -> dict:
    """'top_n=20,min_inliers=30' -> {'top_n': 20, 'min_inliers': 30}, as re-ranker parameters are parsed."""
    return _reranker_spec(f"geometric:{text}")[1]


def _evaluate(args) -> int:
    from pathlib import Path

    import yaml

    from .datasets import geotagged
    from .datasets.msls import load_side
    from .descriptors.extract import read_descriptors
    from .evaluation import (compare_rerankers, evaluate_queries, format_conditions, format_table, query_features,
                             read_conditions, verify_row, write_results)
    from .geometric import geometric_settings
    from .mapbuild import map_model

    specs = list(args.reranker)
    if args.config:
        for entry in yaml.safe_load(Path(args.config).read_text()) or []:
            entry = dict(entry)
            specs.append((entry.pop("name"), entry))
    bundle = MapBundle.load(args.map)
    geometric = None
    if args.geometric is not None:           # refused before anything is described
        geometric = geometric_settings(args.geometric)
        bundle.local_extractor()
    if args.queries is None:
        query = load_side(args.msls, args.city, "query", args.subtask)
    else:
        photos = Path(args.queries)
        images = geotagged.from_folder(photos) if photos.is_dir() else geotagged.from_csv(photos)
        query = geotagged.as_query_side(images, photos)
    if args.descriptors:
        rows, identity = read_descriptors(args.descriptors, list(query.keys))
        bundle.check_descriptors(rows, identity, args.descriptors)
        run = evaluate_queries(bundle, None, query, k=args.top_k, descriptors=rows)
    else:
        run = evaluate_queries(bundle, map_model(bundle, args.model), query, k=args.top_k)
    rows = compare_rerankers(bundle, run, specs or list(COMPARED), grid=args.grid, device=args.device,
                             warn=_warn("vpr-eval"))
    print(f"{query.city}: {run.metrics['queries']} queries with positives, K = {args.top_k}")
    if geometric is not None:
        features = query_features(bundle, run)
        rows = [r for row in rows for r in (row, verify_row(bundle, run, row, features, geometric))]
        print(f"geometric verification ({bundle.local_features.extractor}): "
              + ", ".join(f"{k}={v}" for k, v in vars(geometric).items()))
    print(format_table(rows))
    conditions = read_conditions(run.query)
    if conditions is not None:
        print(format_conditions(rows, run, conditions))
    if args.out:
        print(f"results written to {write_results(args.out, rows, bundle, run)}")
    return 0


def replay_main(argv: list[str] | None = None) -> int:
    """`vpr-replay BAG --map MAP`: localise a drive bag and score it against its ground truth (or, without one,
    report its consistency), offline through the Localizer or, with --live, by playing it onto ROS topics with
    /clock to a running vpr_localizer node. `vpr-replay make-bag ...` turns geotagged photos into such a bag."""
    from .truth import FRAMES

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["make-bag"]:
        return _make_bag_main(argv[1:])
    parser = argparse.ArgumentParser(prog="vpr-replay", description=replay_main.__doc__.split(":", 1)[1].strip())
    parser.add_argument("bag", help="ROS 2 bag directory (MCAP or SQLite) with a camera topic, and optionally GPS "
                                    "and ground truth (docs/replay.md)")
    topics = parser.add_argument_group("topics (default: found by message type, see docs/replay.md)")
    topics.add_argument("--image-topic", help="camera topic (sensor_msgs/Image or CompressedImage)")
    topics.add_argument("--gps-topic", help="GPS topic (sensor_msgs/NavSatFix)")
    topics.add_argument("--truth-topic", help="ground-truth topic (NavSatFix, PoseStamped, PoseWithCovarianceStamped "
                                              "or Odometry)")
    topics.add_argument("--truth-frame", choices=FRAMES,
                        help="positions of a pose-typed truth: utm (the map's zone, unless frame_id is utm_<zone>) "
                             "or enu (metres from --datum); default: frame_id must be utm_<zone>")
    topics.add_argument("--datum", type=_datum, help="with --truth-frame enu: LAT,LON[,ALT] of the ENU origin")
    parser.add_argument("--map", required=True, help="map directory")
    parser.add_argument("--model", help="descriptor weights; default: the model stored in the map")
    parser.add_argument("--reranker", type=_reranker_spec, default=("none", {}), help="NAME or NAME:key=value,...")
    parser.add_argument("--top-k", type=int, default=TOP_K, help=f"candidates re-ranked per frame (default {TOP_K})")
    parser.add_argument("--no-gps", action="store_true", help="ignore the bag's GPS fixes")
    parser.add_argument("--filter", action="store_true",
                        help="fuse consecutive estimates with the temporal filter (tracking.PoseFilter; the node's "
                             "`filter: true`) and score its output")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--csv", help="write one row per frame (estimate, truth, error, covariance, latency)")
    parser.add_argument("--report", metavar="DIR",
                        help="write an HTML report with figures to DIR/index.html (DIR is created; a report already "
                             "there is replaced, other files are left)")
    live = parser.add_argument_group("live replay (--live)")
    live.add_argument("--live", action="store_true",
                      help="start the vpr_localizer node (use_sim_time) and play the bag to it with /clock")
    live.add_argument("--rate", type=float, help="bag seconds per wall second (default 1)")
    live.add_argument("--wait-for-node", action="store_true",
                      help="hold the bag clock before each frame until the node answered the previous one, so a "
                           "slow CPU still scores every frame (default: the node drops what it cannot keep up with)")
    live.add_argument("--frame-timeout", type=float, help="seconds to wait for the node's answer to a frame "
                                                           "(default 30)")
    live.add_argument("--node-params", help="YAML parameter file for the node's other parameters")
    args = parser.parse_args(argv)
    live_only = (args.rate, args.frame_timeout, args.node_params, args.wait_for_node or None)
    if not args.live and any(v is not None for v in live_only):
        parser.error("--rate, --wait-for-node, --frame-timeout and --node-params need --live")
    return report_user_errors("vpr-replay", lambda: _replay(args))


def _datum(text: str) -> tuple[float, float, float]:
    """LAT,LON or LAT,LON,ALT (degrees, metres)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected LAT,LON or LAT,LON,ALT, got {text!r}")
    return (*values, 0.0)[:3]


def _replay_input(args):
    """What to read from the bag, from --image-topic, --gps-topic, --truth-topic, --truth-frame and --datum."""
    from .replay import ReplayInput
    from .truth import TruthFrame

    return ReplayInput(args.image_topic, args.gps_topic, args.truth_topic, TruthFrame(args.truth_frame, args.datum))


def _replay(args) -> int:
    import csv
    from pathlib import Path

    from .report import ReplaySetup, write_report

    if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
        raise ValueError(f"--report {args.report} is a file, not a folder")   # before a replay of minutes
    report, summary, mode = _replay_live(args) if args.live else _replay_offline(args)
    print(summary)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(report.rows[0]))
            writer.writeheader()
            writer.writerows(report.rows)
    if args.report:
        setup = ReplaySetup(args.bag, args.map, reranker_label(*args.reranker), args.top_k, args.filter,
                            not args.no_gps, mode)
        print(f"report: {write_report(args.report, report, summary, setup)}")
    return 0


def _warn_if_untrained(reranker) -> None:
    warning = reranker.untrained_warning()
    if warning:
        _warn("vpr-replay")(f"WARNING: {warning}")


def _replay_offline(args):
    """The report, its text and 'offline'."""
    from .localizer import Localizer, LocalizerSettings
    from .mapbuild import map_model
    from .replay import format_report, replay_bag
    from .tracking import PoseFilter

    bundle = MapBundle.load(args.map)
    name, params = args.reranker
    localizer = Localizer(bundle, map_model(bundle, args.model), name,
                          LocalizerSettings(top_k=min(args.top_k, len(bundle)), device=args.device), params)
    _warn_if_untrained(localizer.reranker)
    report = replay_bag(args.bag, localizer, _replay_input(args), use_gps=not args.no_gps,
                        tracker=PoseFilter() if args.filter else None)
    return report, format_report(report), "offline"


def _replay_live(args):
    """The report, its text and how the bag was played."""
    from .live_replay import LiveSettings, NodeSetup, format_live_report, replay_live
    from .rerank import build_reranker

    name, params = args.reranker
    _warn_if_untrained(build_reranker(name, **params))   # a bad name or parameter fails before the node starts
    node = NodeSetup(map_path=args.map, model_path=args.model or "", reranker=name, reranker_params=params,
                     top_k=args.top_k, device=args.device, params_file=args.node_params, filter=args.filter)
    settings = LiveSettings(rate=1.0 if args.rate is None else args.rate, wait_for_node=args.wait_for_node,
                            frame_timeout_s=30.0 if args.frame_timeout is None else args.frame_timeout,
                            use_gps=not args.no_gps)
    live = replay_live(args.bag, node, settings, _replay_input(args))
    return live.report, format_live_report(live), settings.describe()


def _make_bag_main(argv: list[str]) -> int:
    """`vpr-replay make-bag`: a drive bag from geotagged photos, with their positions as ground truth."""
    parser = argparse.ArgumentParser(prog="vpr-replay make-bag", description="Write a ROS 2 bag of geotagged photos "
                                     "(camera as CompressedImage, truth as NavSatFix) to replay with vpr-replay.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of photos with EXIF GPS (sorted by name = order of capture)")
    source.add_argument("--csv", help="CSV of path, lat, lon (or easting, northing, zone), heading, as vpr-map reads")
    parser.add_argument("--out", required=True, help="bag directory to write (must not exist)")
    parser.add_argument("--rate", type=float, default=5.0, help="photos per second of bag time (default 5)")
    parser.add_argument("--gps-noise", type=float,
                        help="also write /gps/fix: the positions plus this much Gaussian noise, metres per axis")
    parser.add_argument("--seed", type=int, default=0, help="seed of the GPS noise (default 0)")
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="bag storage (default mcap)")
    args = parser.parse_args(argv)

    def run() -> int:
        from .datasets.geotagged import from_csv, from_folder
        from .photo_bag import photos_to_bag

        images = from_folder(args.images) if args.images else from_csv(args.csv)
        path = photos_to_bag(images, args.out, args.rate, args.gps_noise, args.seed, args.storage)
        skipped = f" ({len(images.skipped)} photos without a position left out)" if images.skipped else ""
        print(f"{len(images.items)} photos written to {path}{skipped}")
        return 0

    return report_user_errors("vpr-replay make-bag", run)


def _city_map(text: str) -> tuple[str, str]:
    city, sep, path = text.partition("=")
    if not sep or not city or not path:
        raise argparse.ArgumentTypeError(f"expected CITY=MAP_DIR, got {text!r}")
    return city, path


def train_main(argv: list[str] | None = None) -> int:
    """`vpr-train`: the thesis's two training steps on MSLS-layout cities (FC1, then the GNN with FC1 frozen)."""
    parser = argparse.ArgumentParser(prog="vpr-train", description="Train the GNN re-ranker (thesis 3.3) on "
                                     "MSLS-layout cities, each with a map of its database side (vpr-map build).")
    parser.add_argument("--msls", required=True, help="MSLS root (real or synthetic)")
    parser.add_argument("--train", action="append", type=_city_map, required=True, metavar="CITY=MAP",
                        help="a training city and its map (repeatable)")
    parser.add_argument("--val", action="append", type=_city_map, required=True, metavar="CITY=MAP",
                        help="a validation city and its map (repeatable); epochs are chosen by its mAP@10")
    parser.add_argument("--out", required=True, help="folder for fc/ and gnn/ checkpoints and logs")
    parser.add_argument("--config", help="YAML overriding the thesis schedule (keys as training.Schedule)")
    parser.add_argument("--steps", default="fc,gnn", help="fc, gnn or fc,gnn (default)")
    parser.add_argument("--fc-weights", help="for --steps gnn: the step-1 checkpoint whose FC1 is frozen in the GNN")
    parser.add_argument("--model", help="descriptor weights for the queries, for maps that do not store their model")
    parser.add_argument("--descriptors", help="HDF5 of precomputed query descriptors of all cities (keys, "
                                              "descriptors) instead of describing the query images")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--allow-worse", action="store_true",
                        help="keep a best epoch even when it scores below the retrieval order on validation")
    args = parser.parse_args(argv)
    steps = tuple(args.steps.split(","))
    if steps not in (("fc",), ("gnn",), ("fc", "gnn")):
        parser.error(f"--steps must be fc, gnn or fc,gnn, got {args.steps!r}")
    if steps == ("gnn",) and not args.fc_weights:
        parser.error("--steps gnn needs --fc-weights (the FC1 trained in step 1)")
    return report_user_errors("vpr-train", lambda: _train(args, steps))


def _train(args, steps: tuple[str, ...]) -> int:
    from pathlib import Path

    import yaml

    from .distributed import workers
    from .training import Schedule, load_candidate_sets, required_k, train_schedule

    schedule = Schedule.from_overrides(yaml.safe_load(Path(args.config).read_text()) if args.config else None)
    here = workers(args.device)                       # this process's rank under torchrun (or the only one)
    device = here.device(args.device)
    log = here.quiet(print)
    k = required_k(schedule, steps)
    common = {"min_overlap": schedule.min_overlap, "model_weights": args.model, "descriptor_file": args.descriptors,
              "device": device, "log": log}
    train_sets = load_candidate_sets(args.msls, args.train, k, **common)
    val_sets = load_candidate_sets(args.msls, args.val, k, **common)
    train_schedule(train_sets, val_sets, schedule, args.out, steps, args.fc_weights, device, log,
                   allow_worse=args.allow_worse)
    return 0


def study_main(argv: list[str] | None = None) -> int:
    """`vpr-study --seed S --out DIR`: the training study on a seeded synthetic town, from nothing."""
    parser = argparse.ArgumentParser(prog="vpr-study", description="Train the learned re-rankers on synthetic "
                                     "cities and compare every re-ranker on held-out cities (docs/training.md).")
    parser.add_argument("--seed", type=int, required=True, help="seed of the town, the descriptor and training")
    parser.add_argument("--out", required=True, help="study folder (an interrupted study resumes in it)")
    parser.add_argument("--descriptor-block", type=int, default=OFFLINE_BLOCK,
                        help=f"EfficientNet-Lite0 block of the offline descriptor (default {OFFLINE_BLOCK}; the "
                             "README's first study tables used 15, the default before 2026-11-30)")
    args = parser.parse_args(argv)

    def run() -> int:
        from .study import StudyConfig, run_study

        run_study(args.seed, args.out, StudyConfig(descriptor_block=args.descriptor_block))
        return 0

    return report_user_errors("vpr-study", run)
