"""Sources of geotagged map images: a folder of photos with EXIF GPS, a CSV of paths and poses, or the
database side of MSLS cities. Each returns the images as (key, path) items and a `MapTable` of their poses.

Headings given by users and datasets (EXIF GPSImgDirection, MSLS `ca`, CSV `heading`) are compass headings
from true north; the map holds UTM grid headings, so they are converted (grid = compass - convergence).
Headings from the direction of travel are measured in the grid already."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from ..geo import UtmZone, latlon_to_utm, meridian_convergence_deg, utm_to_latlon
from ..mapdb import MapTable
from .msls import MslsSide, load_side, read_columns

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class ImageSet:
    """Map images with poses, and the files that were left out (with the reason)."""

    items: list                    # (key, path)
    table: MapTable
    skipped: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ExifGps:
    lat: float
    lon: float
    altitude: float | None
    direction: float | None        # GPSImgDirection, degrees
    captured_at: float | None      # Unix seconds from DateTimeOriginal (taken as UTC when no offset is given)


def read_exif_gps(path: str | Path) -> ExifGps | None:
    """GPS position (and direction, time) from a photo's EXIF, or None when it has no position."""
    from PIL import ExifTags, Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            exif = image.getexif()
    except (OSError, UnidentifiedImageError):
        return None
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    tags = {ExifTags.GPSTAGS.get(k, k): v for k, v in gps.items()}
    if "GPSLatitude" not in tags or "GPSLongitude" not in tags:
        return None
    try:
        lat = _dms(tags["GPSLatitude"]) * (-1 if str(tags.get("GPSLatitudeRef", "N")).upper().startswith("S") else 1)
        lon = _dms(tags["GPSLongitude"]) * (-1 if str(tags.get("GPSLongitudeRef", "E")).upper().startswith("W") else 1)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    altitude = float(tags["GPSAltitude"]) if "GPSAltitude" in tags else None
    direction = float(tags["GPSImgDirection"]) % 360.0 if "GPSImgDirection" in tags else None
    original = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime)
    captured = None
    if original:
        try:
            captured = datetime.strptime(str(original), "%Y:%m:%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            captured = None
    if not (np.isfinite(lat) and np.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
        return None
    return ExifGps(lat, lon, altitude, direction, captured)


def _dms(value) -> float:
    degrees, minutes, seconds = (float(v) for v in value)
    return degrees + minutes / 60.0 + seconds / 3600.0


def travel_headings(easting: np.ndarray, northing: np.ndarray) -> np.ndarray:
    """Grid headings (clockwise from the positions' grid north) from the direction of travel along an ordered sequence of positions (central
    differences; repeated positions take the nearest distinct neighbour's direction)."""
    n = len(easting)
    if n < 2:
        raise ValueError("a heading from the direction of travel needs at least two positions")
    xy = np.stack([easting, northing], axis=1)
    ahead = np.vstack([xy[1:], xy[-1:]])
    behind = np.vstack([xy[:1], xy[:-1]])
    d = ahead - behind
    moved = np.hypot(d[:, 0], d[:, 1]) > 1e-6
    if not moved.any():
        raise ValueError("all positions are identical: no direction of travel")
    index = np.arange(n)
    nearest = np.flatnonzero(moved)[np.abs(index[:, None] - np.flatnonzero(moved)[None, :]).argmin(axis=1)]
    d = d[nearest]
    return (90.0 - np.degrees(np.arctan2(d[:, 1], d[:, 0]))) % 360.0


def list_images(folder: str | Path) -> list[Path]:
    """The .jpg/.jpeg/.png files of a folder, sorted by name; a missing or image-less folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no .jpg/.jpeg/.png images")
    return files


def from_folder(folder: str | Path, heading_csv: str | Path | None = None) -> ImageSet:
    """Photos in a folder (sorted by name = order of capture) with EXIF GPS. Headings: `heading_csv`
    (name, compass heading) overrides, else EXIF GPSImgDirection, else the direction of travel."""
    files = list_images(folder)
    found, skipped = [], {}
    for path in files:
        gps = read_exif_gps(path)
        if gps is None:
            skipped[path.stem] = "no EXIF GPS position (or not a readable image)"
            log.warning("skipping %s: no EXIF GPS position", path)
        else:
            found.append((path, gps))
    if len(found) < 1:
        raise ValueError(f"{folder}: none of the {len(files)} images has an EXIF GPS position")
    lat = np.array([g.lat for _, g in found])
    lon = np.array([g.lon for _, g in found])
    easting, northing, zone = latlon_to_utm(lat, lon)
    convergence = meridian_convergence_deg(lat, lon, zone)
    compass = np.array([np.nan if g.direction is None else g.direction for _, g in found])
    if heading_csv is not None:
        overrides = _read_heading_overrides(heading_csv)
        compass = np.array([overrides.get(p.name, overrides.get(p.stem, h)) for (p, _), h in zip(found, compass)])
    direction = compass - convergence
    if np.isnan(direction).any():
        travel = travel_headings(easting, northing) if len(found) > 1 else np.zeros(1)
        direction = np.where(np.isnan(direction), travel, direction)
    keys = [p.stem for p, _ in found]
    captured = np.array([np.nan if g.captured_at is None else g.captured_at for _, g in found])
    table = MapTable(keys=keys, easting=easting, northing=northing, heading=direction, zone=zone, lat=lat, lon=lon,
                     captured_at=captured, path=[str(p.resolve()) for p, _ in found])
    return ImageSet(items=list(zip(keys, [str(p) for p, _ in found])), table=table, skipped=skipped)


def _read_heading_overrides(path: str | Path) -> dict[str, float]:
    table = read_columns(path, ("heading",))
    names = table.get("name", table.get("path"))
    if names is None:
        raise ValueError(f"{path}: a heading CSV needs a 'name' (or 'path') column and a 'heading' column")
    headings = table["heading"].astype(float)
    return {Path(n).name: h for n, h in zip(names, headings)} | {Path(n).stem: h for n, h in zip(names, headings)}


# The values a CSV source's numeric columns may hold (inclusive); other columns take any finite number. A compass
# heading is given in [0, 360] or signed in [-180, 180]: anything else (400, a value in radians times 100, the
# wrong column) is more likely a mistake than a heading to wrap, so it is refused with its line.
CSV_RANGES = {"lat": (-90.0, 90.0), "lon": (-180.0, 180.0), "heading": (-180.0, 360.0)}
OPTIONAL_CSV_COLUMNS = ("captured_at",)   # may be left empty (NaN: unknown)


def _csv_numbers(values: Sequence[str], column: str) -> np.ndarray:
    """A numeric CSV column as floats; a ValueError naming the line (the header is line 1), the column and the
    value of the first entry that is not a finite number within CSV_RANGES (empty is NaN where the column is
    optional)."""
    low, high = CSV_RANGES.get(column, (-math.inf, math.inf))
    numbers = np.full(len(values), np.nan)
    for row, text in enumerate(values):
        if text.strip() == "" and column in OPTIONAL_CSV_COLUMNS:
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            within = f" in [{low:g}, {high:g}]" if math.isfinite(low) else ""
            raise ValueError(f"line {row + 2}: {column} must be a number{within}, got {str(text)!r}")
        numbers[row] = value
    return numbers


def from_csv(path: str | Path) -> ImageSet:
    """A CSV with `path, lat, lon, heading` or `path, easting, northing, zone, heading` (zone like '33N'),
    optional `key` (default: file name without suffix) and `captured_at`; relative paths are relative to the CSV.
    A value that is not a number in its range (`CSV_RANGES`) is refused with its line number."""
    path = Path(path)
    table = read_columns(path, ("path", "heading"))
    if len(table["path"]) == 0:
        raise ValueError(f"{path}: no rows")
    paths = [str(p if Path(p).is_absolute() else path.parent / p) for p in table["path"]]
    keys = list(table["key"]) if "key" in table else [Path(p).stem for p in table["path"]]

    def numbers(column: str) -> np.ndarray:
        return _csv_numbers(table[column], column)

    try:
        heading = numbers("heading")
        captured = numbers("captured_at") if "captured_at" in table else None
        if {"lat", "lon"} <= set(table):
            lat, lon = numbers("lat"), numbers("lon")
            easting, northing, zone = latlon_to_utm(lat, lon)
        elif {"easting", "northing", "zone"} <= set(table):
            zones = set(np.char.upper(np.char.strip(table["zone"])))
            if len(zones) != 1:
                raise ValueError(f"all rows must share one UTM zone, found {sorted(zones)}")
            zone = UtmZone.parse(zones.pop())
            easting, northing = numbers("easting"), numbers("northing")
            lat, lon = utm_to_latlon(easting, northing, zone)
        else:
            raise ValueError("needs lat and lon columns, or easting, northing and zone columns")
        grid = heading - meridian_convergence_deg(lat, lon, zone)
        table = MapTable(keys=keys, easting=easting, northing=northing, heading=grid, zone=zone, lat=lat, lon=lon,
                         captured_at=captured, path=paths)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return ImageSet(items=list(zip(keys, paths)), table=table)


def from_msls(root: str | Path, cities: Sequence[str]) -> ImageSet:
    """The database side of one or more MSLS cities (panoramas excluded), in one UTM zone."""
    sides = [load_side(root, city, "database") for city in cities]
    lat = np.concatenate([s.lat for s in sides])
    lon = np.concatenate([s.lon for s in sides])
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        raise ValueError("MSLS test-split cities have no positions and cannot make a map")
    easting, northing, zone = latlon_to_utm(lat, lon)
    keys = [k for s in sides for k in s.keys]
    paths = [str(p) for s in sides for p in s.image_paths()]
    compass = np.concatenate([s.heading for s in sides])
    table = MapTable(keys=keys, easting=easting, northing=northing,
                     heading=compass - meridian_convergence_deg(lat, lon, zone), zone=zone, lat=lat, lon=lon, captured_at=np.concatenate([s.captured_at for s in sides]) / 1000.0,
                     path=paths)
    return ImageSet(items=list(zip(keys, paths)), table=table)


def as_query_side(images: ImageSet, source: str | Path) -> MslsSide:
    """Geotagged photos (`from_folder`, `from_csv`) as queries for evaluation, in the shape of an MSLS query side:
    their own files, compass headings (grid + convergence), one sequence, no subtasks but `all`."""
    table, n = images.table, len(images.table)
    compass = (table.heading + meridian_convergence_deg(table.lat, table.lon, table.zone)) % 360.0
    return MslsSide(city=Path(source).stem, side="query", directory=Path(source), keys=table.keys,
                    sequence_key=np.full(n, "photos"), frame_number=np.arange(n), subtasks={"all": np.ones(n, bool)},
                    easting=table.easting, northing=table.northing, lat=table.lat, lon=table.lon, heading=compass,
                    captured_at=table.captured_at, pano=np.zeros(n, bool), night=np.zeros(n, bool),
                    view_direction=np.full(n, "", dtype=object), zone=table.zone,
                    paths=np.array([path for _, path in images.items], dtype=object))
