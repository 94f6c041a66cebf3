"""Mapillary Street-Level Sequences (MSLS) on disk: the official directory layout, read and written.

    <root>/train_val/<city>/{query,database}/images/<key>.jpg, raw.csv, postprocessed.csv, seq_info.csv,
        subtask_index.csv
    <root>/test/<city>/{query,database}/images/<key>.jpg, seq_info.csv, subtask_index.csv

The same reader loads real MSLS and the synthetic town. Challenge prediction files are plain text:
one line per query, the query key followed by its ranked map keys, separated by spaces.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..geo import UtmZone, utm_zone_for
from ..metrics import positives_within

DEFAULT_CITIES = {
    "train": ["trondheim", "london", "boston", "melbourne", "amsterdam", "helsinki", "tokyo", "toronto",
              "saopaulo", "moscow", "zurich", "paris", "bangkok", "budapest", "austin", "berlin", "ottawa",
              "phoenix", "goa", "amman", "nairobi", "manila"],
    "val": ["cph", "sf"],
    "test": ["miami", "athens", "buenosaires", "stockholm", "bengaluru", "kampala"],
}
SUBTASKS = ("all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d")
SIDES = ("query", "database")
RAW_COLUMNS = ("key", "lon", "lat", "ca", "captured_at", "pano")
POSTPROCESSED_COLUMNS = ("key", "easting", "northing", "night", "view_direction")
SEQ_COLUMNS = ("key", "sequence_key", "frame_number")


class MslsError(ValueError):
    """An MSLS directory is missing something or is inconsistent; the message names the file."""


@dataclass
class MslsSide:
    """The query or database images of one city, in file order (after any filtering)."""

    city: str
    side: str
    directory: Path
    keys: np.ndarray                 # (N,) str
    sequence_key: np.ndarray         # (N,) str
    frame_number: np.ndarray         # (N,) int
    subtasks: dict                   # name -> (N,) bool
    easting: np.ndarray              # (N,) metres; NaN on the test split
    northing: np.ndarray
    lat: np.ndarray                  # (N,) degrees; NaN on the test split
    lon: np.ndarray
    heading: np.ndarray              # (N,) compass angle `ca`, degrees clockwise from true north
    captured_at: np.ndarray          # (N,) as in the file (MSLS: milliseconds since the epoch)
    pano: np.ndarray                 # (N,) bool
    night: np.ndarray                # (N,) bool
    view_direction: np.ndarray       # (N,) str: Forward / Sideways / Backward ('' when unknown)
    zone: UtmZone | None = field(default=None)
    paths: np.ndarray | None = None  # (N,) str image files, when not MSLS's <directory>/images/<key>.jpg

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_positions(self) -> bool:
        return bool(len(self)) and bool(np.isfinite(self.easting).all())

    @property
    def xy(self) -> np.ndarray:
        """(N, 2) UTM easting, northing."""
        return np.stack([self.easting, self.northing], axis=1)

    def image_path(self, i: int) -> Path:
        return Path(self.paths[i]) if self.paths is not None else self.directory / "images" / f"{self.keys[i]}.jpg"

    def image_paths(self) -> list[Path]:
        return [self.image_path(i) for i in range(len(self))]

    def select(self, mask: np.ndarray) -> "MslsSide":
        """A copy with only the rows where `mask` is true (or the given indices)."""
        take = lambda a: a[mask]  # noqa: E731
        return replace(self, keys=take(self.keys), sequence_key=take(self.sequence_key),
                       frame_number=take(self.frame_number), subtasks={k: take(v) for k, v in self.subtasks.items()},
                       easting=take(self.easting), northing=take(self.northing), lat=take(self.lat),
                       lon=take(self.lon), heading=take(self.heading), captured_at=take(self.captured_at),
                       pano=take(self.pano), night=take(self.night), view_direction=take(self.view_direction),
                       paths=None if self.paths is None else take(self.paths))


def split_of(city: str) -> str:
    """'test' for the official test cities, else 'train_val' (which also holds synthetic cities)."""
    return "test" if city in DEFAULT_CITIES["test"] else "train_val"


def resolve_cities(root: str | Path, cities: str | Sequence[str] | None) -> list[str]:
    """City names from 'train' / 'val' / 'test', a comma-separated string, a list, or None (all on disk)."""
    root = Path(root)
    if cities is None or cities == "":
        found = sorted(p.name for split in ("train_val", "test") for p in (root / split).glob("*") if p.is_dir())
        if not found:
            raise MslsError(f"{root}: no cities under train_val/ or test/")
        return found
    if isinstance(cities, str):
        return list(DEFAULT_CITIES[cities]) if cities in DEFAULT_CITIES else [c for c in cities.split(",") if c]
    return list(cities)


def load_side(root: str | Path, city: str, side: str, subtask: str = "all", exclude_panos: bool = True) -> MslsSide:
    """One city's query or database side, filtered to a subtask and without panoramas (as the official code)."""
    if side not in SIDES:
        raise ValueError(f"side must be 'query' or 'database', got {side!r}")
    if subtask not in SUBTASKS:
        raise ValueError(f"subtask must be one of {SUBTASKS}, got {subtask!r}")
    directory = Path(root) / split_of(city) / city / side
    if not directory.is_dir():
        raise MslsError(f"{directory}: no such directory (city {city!r}, side {side!r})")
    seq = read_columns(directory / "seq_info.csv", SEQ_COLUMNS)
    sub = read_columns(directory / "subtask_index.csv", ("all",))
    keys = seq["key"]
    if len(keys) == 0:
        raise MslsError(f"{directory / 'seq_info.csv'}: city {city!r} has no {side} images")
    _same_keys(directory / "subtask_index.csv", sub, keys)
    n = len(keys)
    nan = np.full(n, np.nan)
    values = dict(easting=nan, northing=nan, lat=nan, lon=nan, heading=nan, captured_at=nan,
                  pano=np.zeros(n, bool), night=np.zeros(n, bool), view_direction=np.full(n, "", dtype=object))
    if split_of(city) == "train_val":
        raw = read_columns(directory / "raw.csv", RAW_COLUMNS)
        post = read_columns(directory / "postprocessed.csv", POSTPROCESSED_COLUMNS)
        _same_keys(directory / "raw.csv", raw, keys)
        _same_keys(directory / "postprocessed.csv", post, keys)
        values.update(
            easting=_floats(post, "easting", directory / "postprocessed.csv"),
            northing=_floats(post, "northing", directory / "postprocessed.csv"),
            lat=_floats(raw, "lat", directory / "raw.csv"), lon=_floats(raw, "lon", directory / "raw.csv"),
            heading=_floats(raw, "ca", directory / "raw.csv"),
            captured_at=_floats(raw, "captured_at", directory / "raw.csv"),
            pano=_bools(raw, "pano", directory / "raw.csv"), night=_bools(post, "night", directory / "postprocessed.csv"),
            view_direction=np.asarray(post["view_direction"], dtype=object),
        )
    subtasks = {name: _bools(sub, name, directory / "subtask_index.csv") for name in SUBTASKS if name in sub}
    result = MslsSide(city=city, side=side, directory=directory, keys=keys,
                      sequence_key=np.asarray(seq["sequence_key"], dtype=str),
                      frame_number=_ints(seq, "frame_number", directory / "seq_info.csv"), subtasks=subtasks, **values)
    if np.isfinite(result.lat).all() and np.isfinite(result.lon).all():
        result.zone = utm_zone_for(float(np.mean(result.lat)), float(np.mean(result.lon)))
    if subtask not in subtasks:
        raise MslsError(f"{directory / 'subtask_index.csv'}: no column {subtask!r}")
    keep = subtasks[subtask] & ~(result.pano if exclude_panos else np.zeros(n, bool))
    return result.select(keep)


def load_city(root: str | Path, city: str, subtask: str = "all",
              exclude_panos: bool = True) -> tuple[MslsSide, MslsSide]:
    """(query, database) of one city."""
    return (load_side(root, city, "query", subtask, exclude_panos),
            load_side(root, city, "database", subtask, exclude_panos))


def positives(query: MslsSide, database: MslsSide, radius: float = 25.0,
              max_heading_diff: float | None = None) -> list[np.ndarray]:
    """For each query, the indices of database images within `radius` metres (and heading, if asked)."""
    if not (query.has_positions and database.has_positions):
        raise MslsError(f"city {query.city!r} has no positions (the test split has none)")
    return positives_within(query.xy, database.xy, radius, query.heading, database.heading, max_heading_diff)


# --------------------------------------------------------------------------- writing


def write_side(directory: str | Path, keys: Sequence[str], lat, lon, heading, captured_at, easting, northing,
               sequence_key: Sequence[str], frame_number, night, subtasks: dict, pano=None,
               view_direction: Sequence[str] | None = None) -> None:
    """Write the four CSVs of one side (images/ is the caller's), in the official column layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = len(keys)
    pano = np.zeros(n, bool) if pano is None else np.asarray(pano, bool)
    view_direction = ["Forward"] * n if view_direction is None else list(view_direction)
    _write_table(directory / "raw.csv", RAW_COLUMNS,
                 zip(keys, _fmt(lon), _fmt(lat), _fmt(heading), (str(int(t)) for t in captured_at), _fmt_bool(pano)))
    _write_table(directory / "postprocessed.csv", POSTPROCESSED_COLUMNS,
                 zip(keys, _fmt(easting), _fmt(northing), _fmt_bool(night), view_direction))
    _write_table(directory / "seq_info.csv", SEQ_COLUMNS,
                 zip(keys, sequence_key, (str(int(f)) for f in frame_number)))
    _write_table(directory / "subtask_index.csv", ("key", *SUBTASKS),
                 zip(keys, *(_fmt_bool(subtasks[name]) for name in SUBTASKS)))


def write_predictions(path: str | Path, query_keys: Sequence[str], ranked_keys: Sequence[Sequence[str]]) -> None:
    """An MSLS challenge prediction file: `query_key map_key_1 map_key_2 ...` per line."""
    if len(query_keys) != len(ranked_keys):
        raise ValueError(f"{len(query_keys)} queries but {len(ranked_keys)} ranked lists")
    with open(path, "w") as f:
        for q, ranked in zip(query_keys, ranked_keys):
            f.write(" ".join([str(q), *map(str, ranked)]) + "\n")


def read_predictions(path: str | Path) -> dict[str, list[str]]:
    """Read a prediction file into {query_key: [ranked map keys]} (file order kept)."""
    predictions: dict[str, list[str]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.replace(",", " ").split()
            if not fields:
                continue
            if fields[0] in predictions:
                raise MslsError(f"{path}:{number}: query {fields[0]!r} appears twice")
            predictions[fields[0]] = fields[1:]
    return predictions


# --------------------------------------------------------------------------- CSV helpers


def read_columns(path: str | Path, required: Iterable[str]) -> dict[str, np.ndarray]:
    """A CSV as {column name: string array}; the unnamed index column is dropped. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MslsError(f"{path}: missing")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise MslsError(f"{path}: empty file (no header)")
    header = rows[0]
    missing = [c for c in required if c not in header]
    if missing:
        raise MslsError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(h for h in header if h)})")
    width = len(header)
    bad = next((i for i, r in enumerate(rows[1:], 2) if len(r) != width), None)
    if bad is not None:
        raise MslsError(f"{path}: line {bad} has {len(rows[bad - 1])} fields, the header has {width}")
    columns = list(zip(*rows[1:])) if len(rows) > 1 else [()] * width
    return {name: np.asarray(columns[i], dtype=str) for i, name in enumerate(header) if name}


def _same_keys(path: Path, table: dict, expected: np.ndarray) -> None:
    """Rows of every CSV of a side describe the same images in the same order."""
    n = len(next(iter(table.values()))) if table else 0
    if n != len(expected):
        raise MslsError(f"{path}: {n} rows, seq_info.csv has {len(expected)}")
    if "key" in table and not np.array_equal(table["key"], expected):
        raise MslsError(f"{path}: its keys do not match seq_info.csv row for row")


def _floats(table: dict, column: str, path: Path) -> np.ndarray:
    try:
        return table[column].astype(np.float64)
    except ValueError as exc:
        raise MslsError(f"{path}: column {column!r} holds a non-number ({exc})") from exc


def _ints(table: dict, column: str, path: Path) -> np.ndarray:
    try:
        return table[column].astype(np.int64)
    except ValueError as exc:
        raise MslsError(f"{path}: column {column!r} holds a non-integer ({exc})") from exc


def _bools(table: dict, column: str, path: Path) -> np.ndarray:
    values = np.char.lower(table[column])
    ok = np.isin(values, ["true", "false", "1", "0"])
    if not ok.all():
        raise MslsError(f"{path}: column {column!r} holds {str(table[column][~ok][0])!r}, expected True/False")
    return np.isin(values, ["true", "1"])


def _fmt(values) -> list[str]:
    return [repr(float(v)) for v in values]


def _fmt_bool(values) -> list[str]:
    return ["True" if v else "False" for v in values]


def _write_table(path: Path, columns: Sequence[str], rows: Iterable) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["", *columns])
        for i, row in enumerate(rows):
            writer.writerow([i, *row])
