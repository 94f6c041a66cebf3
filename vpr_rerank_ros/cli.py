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
