"""Console scripts. Each is a thin argparse front over the core; `main(argv)` functions are importable."""
from __future__ import annotations

import argparse
import json
import sys

from .mapdb import MapBundle, MapError


def map_main(argv: list[str] | None = None) -> int:
    """`vpr-map info MAP` prints what a map holds; `vpr-map verify MAP` checks every file and checksum."""
    parser = argparse.ArgumentParser(prog="vpr-map", description="Inspect map bundles.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("info", "print what a map holds"), ("verify", "check files, shapes and checksums")):
        p = sub.add_parser(name, help=text)
        p.add_argument("map", help="map directory")
    args = parser.parse_args(argv)
    try:
        bundle = MapBundle.load(args.map, verify=args.command == "verify", use_gpu=False)
    except (MapError, OSError) as exc:
        print(f"vpr-map: {exc}", file=sys.stderr)
        return 1
    if args.command == "verify":
        print(f"{args.map}: OK ({len(bundle)} images, all checksums match)")
        return 0
    meta, table = bundle.meta, bundle.table
    summary = {
        "path": str(bundle.root),
        "images": len(bundle),
        "utm_zone": meta["utm_zone"],
        "extent_m": {"easting": [float(table.easting.min()), float(table.easting.max())],
                     "northing": [float(table.northing.min()), float(table.northing.max())]},
        "descriptor": meta["descriptor"],
        "index": meta["index"],
        "fov": meta["fov"],
        "overlap_pairs": meta["overlap_pairs"],
        "bytes": sum(f["bytes"] for f in meta["files"].values()),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}") from None
    return w, h


def synth_main(argv: list[str] | None = None) -> int:
    """`vpr-synth`: generate synthetic towns in the MSLS layout, and optionally a query-drive bag."""
    from .datasets.synth_town import BagConfig, SynthConfig, contact_sheet, generate, plan_city, write_bag
    from .datasets.town import TownConfig

    parser = argparse.ArgumentParser(prog="vpr-synth", description=synth_main.__doc__.split(":", 1)[1].strip())
    parser.add_argument("--out", help="MSLS root directory to write (train_val/<city>/...)")
    parser.add_argument("--cities", type=int, default=3, help="number of towns (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical output")
    parser.add_argument("--size", type=_size, default=(640, 480), help="image size WIDTHxHEIGHT (default 640x480)")
    parser.add_argument("--blocks", type=_size, default=(5, 4), help="town size in blocks, XxY (default 5x4)")
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
    args = parser.parse_args(argv)
    if not (args.out or args.bag or args.contact_sheet):
        parser.error("give at least one of --out, --bag and --contact-sheet")
    try:
        config = SynthConfig(town=TownConfig(blocks_x=args.blocks[0], blocks_y=args.blocks[1]),
                             width=args.size[0], height=args.size[1], frame_spacing_m=args.spacing,
                             query_sequences=args.query_sequences, query_frames=args.query_frames)
        bag_config = BagConfig(length_m=args.bag_length, fps=args.bag_fps, gps_noise_m=args.gps_noise,
                               gps_rate_hz=args.gps_rate, compressed=not args.bag_raw, storage=args.bag_storage)
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
    except (ValueError, FileExistsError) as exc:
        print(f"vpr-synth: {exc}", file=sys.stderr)
        return 2
    return 0
