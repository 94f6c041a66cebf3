"""The map bundle: geotagged map images, their global descriptors, a faiss index and the FoV-overlap
graph in one validated directory, and top-k retrieval over it (optionally near a GPS hint).

Layout of a map directory (every file listed with its size and SHA-256 in map.json):
    map.json         format, version, counts, UTM zone, descriptor kind/dimension/model, index, checksums
    images.csv       key, easting, northing, lat, lon, heading, captured_at, path (one row per image)
    descriptors.npy  (N, D) float32 or float16, L2-normalised rows, memory-mapped on load
    index.faiss      faiss index over the descriptors (inner product)
    overlap.npz      sparse FoV-overlap graph (see geo.OverlapGraph)
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from .descriptors.model import NORM_TOLERANCE, check_unit_rows
from .geo import FOV_ANGLE_DEG, FOV_RADIUS_M, OverlapGraph, UtmZone, latlon_to_utm, utm_to_latlon

FORMAT_NAME = "vpr_rerank_ros.map"
FORMAT_VERSION = 1
TABLE_COLUMNS = ("key", "easting", "northing", "lat", "lon", "heading", "captured_at", "path")
FILES = ("images.csv", "descriptors.npy", "index.faiss", "overlap.npz")
INDEX_KINDS = ("flat", "ivfpq")


class MapError(ValueError):
    """A map directory is missing, incomplete or inconsistent; the message names the file and the problem."""


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError("faiss is not installed: pip install faiss-cpu (or faiss-gpu-cu12 on CUDA machines)") from exc
    return faiss


@dataclass(frozen=True)
class IndexConfig:
    """Which faiss index to build: 'flat' (exact) or 'ivfpq' (approximate, for maps of millions)."""

    kind: str = "flat"
    nlist: int = 1024      # IVF cells
    pq_m: int = 64         # PQ sub-quantizers (must divide the dimension)
    pq_bits: int = 8
    nprobe: int = 32       # cells visited per search

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        for name in ("nlist", "pq_m", "pq_bits", "nprobe"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"index {name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class DescriptorInfo:
    """What made a map's descriptors: the model's kind, name and identity (a hash of its weights, checked
    against query models), and how they are stored."""

    kind: str                    # 'netvlad' or 'precomputed'
    dim: int
    dtype: str                   # 'float32' or 'float16'
    name: str = ""
    identity: str = ""           # empty: not known (a model cannot be checked against it)
    backbone: str = ""
    stored_model: bool = False   # the map holds its own descriptor model (model.safetensors)


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class MapMeta:
    """map.json, parsed once and validated: errors name the key. `to_json` writes it back unchanged."""

    count: int
    zone: UtmZone
    descriptor: DescriptorInfo
    index: IndexConfig
    fov_radius_m: float
    fov_angle_deg: float
    overlap_pairs: int
    files: dict                  # file name -> FileEntry (the map's own files and its attachments)

    @classmethod
    def from_json(cls, data, source: str | Path) -> "MapMeta":
        def fail(text: str) -> MapError:
            return MapError(f"{source}: {text}")

        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise fail(f"not a {FORMAT_NAME} file")
        if data.get("version") != FORMAT_VERSION:
            raise fail(f"format version {data.get('version')}, this software reads {FORMAT_VERSION}")
        for key in ("count", "utm_zone", "descriptor", "index", "fov", "overlap_pairs", "files"):
            if key not in data:
                raise fail(f"missing field {key!r}")
        count = data["count"]
        if not isinstance(count, int) or count < 1:
            raise fail(f"'count': a map needs at least one image, got {count!r}")
        try:
            zone = UtmZone.parse(data["utm_zone"])
        except ValueError as exc:
            raise fail(f"'utm_zone': {exc}") from exc
        desc = data["descriptor"]
        known = {f.name for f in fields(DescriptorInfo)}
        if not isinstance(desc, dict) or not {"kind", "dim", "dtype"} <= set(desc) or set(desc) - known:
            raise fail(f"'descriptor' needs kind, dim and dtype (and at most {sorted(known)}), got {desc}")
        if desc["dtype"] not in NORM_TOLERANCE or not isinstance(desc["dim"], int) or desc["dim"] < 1:
            raise fail(f"'descriptor': dim must be a positive integer and dtype float32/float16, got {desc}")
        index = data["index"]
        if not isinstance(index, dict) or index.get("kind") not in INDEX_KINDS:
            raise fail(f"'index': kind must be one of {INDEX_KINDS}, got {index}")
        fov = data["fov"]
        if not isinstance(fov, dict) or not {"radius_m", "angle_deg"} <= set(fov):
            raise fail(f"'fov' needs radius_m and angle_deg, got {fov}")
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v)
                                                  for v in files.values()):
            raise fail("'files' must map each file name to its bytes and sha256")
        try:
            return cls(count=count, zone=zone, descriptor=DescriptorInfo(**desc), index=IndexConfig(**index),
                       fov_radius_m=float(fov["radius_m"]), fov_angle_deg=float(fov["angle_deg"]),
                       overlap_pairs=int(data["overlap_pairs"]),
                       files={name: FileEntry(int(v["bytes"]), str(v["sha256"])) for name, v in files.items()})
        except (TypeError, ValueError) as exc:
            raise fail(str(exc)) from exc

    def to_json(self) -> dict:
        index = asdict(self.index) if self.index.kind != "flat" else {"kind": "flat"}
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "count": self.count, "utm_zone": str(self.zone),
                "descriptor": asdict(self.descriptor), "index": index,
                "fov": {"radius_m": self.fov_radius_m, "angle_deg": self.fov_angle_deg},
                "overlap_pairs": self.overlap_pairs, "files": {k: asdict(v) for k, v in self.files.items()}}


@dataclass
class MapTable:
    """Per-image metadata of a map, all positions in one UTM zone."""

    keys: np.ndarray            # (N,) str, unique
    easting: np.ndarray         # (N,) metres
    northing: np.ndarray        # (N,) metres
    heading: np.ndarray         # (N,) degrees clockwise from UTM grid north (compass - meridian convergence)
    zone: UtmZone
    lat: np.ndarray | None = None      # (N,) degrees; derived from UTM when not given
    lon: np.ndarray | None = None
    captured_at: np.ndarray | None = None  # (N,) seconds (e.g. Unix time); NaN when unknown
    path: np.ndarray | None = None         # (N,) str image path; '' when unknown

    def __post_init__(self) -> None:
        self.keys = np.asarray(self.keys, dtype=str)
        n = len(self.keys)
        for name in ("easting", "northing", "heading"):
            setattr(self, name, _column(getattr(self, name), n, name))
        if self.lat is None or self.lon is None:
            self.lat, self.lon = utm_to_latlon(self.easting, self.northing, self.zone) if n else (np.zeros(0),) * 2
        self.lat, self.lon = _column(self.lat, n, "lat"), _column(self.lon, n, "lon")
        self.heading = self.heading % 360.0
        self.captured_at = (np.full(n, np.nan) if self.captured_at is None
                            else np.asarray(self.captured_at, dtype=np.float64))
        self.path = np.full(n, "", dtype=object) if self.path is None else np.asarray(self.path, dtype=object)
        if self.captured_at.shape != (n,) or self.path.shape != (n,):
            raise ValueError("captured_at and path need one value per image")
        if len(np.unique(self.keys)) != n:
            raise ValueError("image keys are not unique")
        if any(("," in k or "\n" in k or k == "") for k in self.keys):
            raise ValueError("image keys must be non-empty and contain no commas or newlines")

    @classmethod
    def from_latlon(cls, keys, lat, lon, heading, zone: UtmZone | None = None, **extra) -> "MapTable":
        """Build from WGS84 positions; all images go to one UTM zone (the mean position's unless given)."""
        easting, northing, zone = latlon_to_utm(lat, lon, zone)
        return cls(keys=keys, easting=easting, northing=northing, heading=heading, zone=zone, lat=lat, lon=lon,
                   **extra)

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, indices) -> "MapTable":
        """The rows at `indices` (an index array or boolean mask), as a new table."""
        return MapTable(keys=self.keys[indices], easting=self.easting[indices], northing=self.northing[indices],
                        heading=self.heading[indices], zone=self.zone, lat=self.lat[indices], lon=self.lon[indices],
                        captured_at=self.captured_at[indices], path=self.path[indices])

    @property
    def poses(self) -> np.ndarray:
        """(N, 3) easting, northing, heading: the input of geo.fov_overlap."""
        return np.stack([self.easting, self.northing, self.heading], axis=1)


def _column(values, n: int, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n,):
        raise ValueError(f"{name} needs one value per image ({n}), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or inf")
    return values


@dataclass
class SearchResult:
    """Top-k retrieval for a batch of B queries; rows are padded with id -1 and score -inf."""

    ids: np.ndarray         # (B, k) int64 map indices
    scores: np.ndarray      # (B, k) float32 inner products
    restricted: np.ndarray  # (B,) bool: searched only near the GPS hint
    fallback: np.ndarray    # (B,) bool: a hint was given but no map image lay within the radius

    @property
    def valid(self) -> np.ndarray:
        return self.ids >= 0


@dataclass
class MapBundle:
    """A loaded (or freshly built) map: table, memory-mapped descriptors, faiss index, overlap graph."""

    root: Path
    meta: MapMeta
    table: MapTable
    descriptors: np.ndarray
    overlap: OverlapGraph
    index: object = field(repr=False)
    use_gpu: bool = False

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, out: str | Path, table: MapTable, descriptors: np.ndarray, descriptor: dict,
              index: IndexConfig = IndexConfig(), fov_radius: float = FOV_RADIUS_M,
              fov_deg: float = FOV_ANGLE_DEG, dtype: str = "float32", overwrite: bool = False,
              attachments: dict[str, Path] | None = None) -> "MapBundle":
        """Write a map directory atomically (temporary directory, then rename) and load it.

        `descriptor` describes the model that made the descriptors: DescriptorInfo's fields but dim and dtype
        (at least `kind`; the model's identity lets `check_model` refuse a different query model).
        `attachments` ({name: source file}) are copied in and checksummed like the map's own files
        (e.g. the map-specific descriptor model).
        """
        attachments = dict(attachments or {})
        clash = set(attachments) & set(FILES + ("map.json",))
        if clash or any("/" in name or name.startswith(".") for name in attachments):
            raise ValueError(f"attachment names must be plain file names other than the map's own: {sorted(attachments)}")
        out = Path(out)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
        if dtype not in NORM_TOLERANCE:
            raise ValueError(f"descriptor dtype must be float32 or float16, got {dtype!r}")
        n = len(table)
        if n == 0:
            raise ValueError("cannot build a map with no images")
        descriptors = np.asarray(descriptors)
        if descriptors.ndim != 2 or descriptors.shape[0] != n:
            raise ValueError(f"descriptors must be ({n}, D) for {n} images, got {descriptors.shape}")
        stored = descriptors.astype(dtype)
        check_unit_rows(stored, dtype, "descriptors")
        try:
            info = DescriptorInfo(**descriptor, dim=int(descriptors.shape[1]), dtype=dtype)
        except TypeError as exc:
            raise ValueError(f"descriptor info: {exc} (fields: {[f.name for f in fields(DescriptorInfo)]})") from exc
        faiss_index, index_config = _train_index(stored.astype(np.float32), index)
        graph = OverlapGraph.build(table.poses, fov_radius, fov_deg)

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_table(tmp / "images.csv", table)
            np.save(tmp / "descriptors.npy", stored)
            _faiss().write_index(faiss_index, str(tmp / "index.faiss"))
            graph.save(tmp / "overlap.npz")
            for name, source in attachments.items():
                shutil.copyfile(source, tmp / name)
            meta = MapMeta(count=n, zone=table.zone, descriptor=info, index=index_config,
                           fov_radius_m=float(fov_radius), fov_angle_deg=float(fov_deg),
                           overlap_pairs=int((graph.matrix.nnz - n) // 2),
                           files={name: FileEntry((tmp / name).stat().st_size, _sha256(tmp / name))
                                  for name in (*FILES, *attachments)})
            (tmp / "map.json").write_text(json.dumps(meta.to_json(), indent=2) + "\n")
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.load(out, verify=False)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, root: str | Path, verify: bool = True, use_gpu: bool | None = None) -> "MapBundle":
        """Open and validate a map directory. `verify` also checks every file's SHA-256 (reads all data).

        `use_gpu`: None = on the GPU when faiss-gpu and a CUDA device are available.
        """
        root = Path(root)
        meta = _read_meta(root)
        files = meta.files
        for name in (*FILES, *(f for f in files if f not in FILES)):
            path = root / name
            if name not in files:
                raise MapError(f"{root / 'map.json'}: no entry for {name}")
            if not path.is_file():
                raise MapError(f"{path}: missing")
            if path.stat().st_size != files[name].bytes:
                raise MapError(f"{path}: size {path.stat().st_size} bytes, map.json says {files[name].bytes}")
            if verify and _sha256(path) != files[name].sha256:
                raise MapError(f"{path}: checksum mismatch (the file changed or is corrupt)")
        n, desc = meta.count, meta.descriptor
        table = _read_table(root / "images.csv", meta.zone)
        if len(table) != n:
            raise MapError(f"{root / 'images.csv'}: {len(table)} rows, map.json says {n} images")
        try:
            descriptors = np.load(root / "descriptors.npy", mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise MapError(f"{root / 'descriptors.npy'}: not a readable .npy array ({exc})") from exc
        if descriptors.shape != (n, desc.dim) or descriptors.dtype != np.dtype(desc.dtype):
            raise MapError(f"{root / 'descriptors.npy'}: {descriptors.dtype}{list(descriptors.shape)}, "
                           f"map.json says {desc.dtype}[{n}, {desc.dim}]")
        faiss = _faiss()
        try:
            index = faiss.read_index(str(root / "index.faiss"))
        except RuntimeError as exc:
            raise MapError(f"{root / 'index.faiss'}: not a readable faiss index ({exc})") from exc
        if index.ntotal != n or index.d != desc.dim:
            raise MapError(f"{root / 'index.faiss'}: {index.ntotal} vectors of dimension {index.d}, "
                           f"expected {n} of dimension {desc.dim}")
        if meta.index.kind == "ivfpq":
            faiss.extract_index_ivf(index).nprobe = meta.index.nprobe
        try:
            overlap = OverlapGraph.load(root / "overlap.npz")
        except (ValueError, KeyError, OSError) as exc:
            raise MapError(f"{root / 'overlap.npz'}: not a readable overlap graph ({exc})") from exc
        if overlap.size != n:
            raise MapError(f"{root / 'overlap.npz'}: graph over {overlap.size} images, expected {n}")
        if (overlap.radius, overlap.fov_deg) != (meta.fov_radius_m, meta.fov_angle_deg):
            raise MapError(f"{root / 'overlap.npz'}: FoV {overlap.radius} m / {overlap.fov_deg}°, map.json says "
                           f"{meta.fov_radius_m} m / {meta.fov_angle_deg}°")
        gpu = _gpu_available() if use_gpu is None else bool(use_gpu)
        if gpu:
            if not _gpu_available():
                raise MapError("use_gpu=True but faiss has no GPU support or no CUDA device is visible")
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return cls(root=root, meta=meta, table=table, descriptors=descriptors, overlap=overlap, index=index,
                   use_gpu=gpu)

    # ------------------------------------------------------------------ retrieval

    def attachment(self, name: str) -> Path | None:
        """Path of an attached file (checked on load), or None when the map has none of that name."""
        return self.root / name if name in self.meta.files and name not in FILES else None

    @property
    def dim(self) -> int:
        return self.meta.descriptor.dim

    def check_model(self, model) -> None:
        """Refuse a descriptor model (GlobalDescriptor) whose vectors cannot be compared with the map's: another
        dimension, or another identity than the map's model. The one check before describing queries."""
        expected = self.meta.descriptor
        if expected.identity and model.identity != expected.identity:
            raise MapError(f"descriptor model {model.config.name} ({model.identity[:12]}) does not match the map "
                           f"{self.root}, built with {expected.name} ({expected.identity[:12]})")
        if model.output_dim != expected.dim:
            raise MapError(f"descriptor model {model.config.name} gives {model.output_dim}-D vectors, the map "
                           f"{self.root} holds {expected.dim}-D")

    def check_descriptors(self, descriptors: np.ndarray, identity: str | None, source: str) -> None:
        """The same check for precomputed query descriptors from `source` and the identity they were made with."""
        expected = self.meta.descriptor
        if descriptors.ndim != 2 or descriptors.shape[1] != expected.dim:
            raise MapError(f"{source}: {descriptors.shape[-1]}-D descriptors, the map {self.root} holds "
                           f"{expected.dim}-D")
        if identity and expected.identity and identity != expected.identity:
            raise MapError(f"{source}: descriptors of model {identity[:12]}, the map {self.root} was built with "
                           f"{expected.name} ({expected.identity[:12]})")

    def check_reranker(self, reranker) -> None:
        """Refuse a re-ranker that cannot run on this map: a learned model for other descriptors, or one whose
        positional affinities assume another field of view than the map's overlap graph."""
        config = getattr(reranker, "config", None)
        if config is None:
            return
        if config.dim != self.dim:
            raise MapError(f"the {config.variant} model expects {config.dim}-D descriptors (its `dim`), the map "
                           f"{self.root} holds {self.dim}-D")
        if reranker.uses_geometry and (config.fov_radius, config.fov_deg) != (self.overlap.radius, self.overlap.fov_deg):
            raise MapError(f"the {config.variant} model was trained with a {config.fov_radius:g} m / {config.fov_deg:g}° "
                           f"field of view, the map {self.root} has {self.overlap.radius:g} m / "
                           f"{self.overlap.fov_deg:g}°: rebuild the map with the model's FoV")

    def __len__(self) -> int:
        return len(self.table)

    @cached_property
    def _xy_tree(self) -> cKDTree:
        return cKDTree(np.stack([self.table.easting, self.table.northing], axis=1))

    def hint_from_latlon(self, lat, lon) -> np.ndarray:
        """GPS fixes (degrees) -> (B, 2) easting/northing in the map's UTM zone, the form `search` takes."""
        easting, northing, _ = latlon_to_utm(lat, lon, self.table.zone)
        return np.stack([np.atleast_1d(easting), np.atleast_1d(northing)], axis=1)

    def search(self, queries: np.ndarray, k: int, hint_xy: np.ndarray | None = None,
               radius: float | None = None) -> SearchResult:
        """Top-k map images by inner product for (B, D) L2-normalised query descriptors.

        With `hint_xy` ((B, 2) easting/northing in the map's zone; NaN rows = no hint) and `radius`
        (metres), each hinted query is scored exactly against the map images within the radius only;
        when none lies there it falls back to the whole map and `fallback` says so.
        """
        queries = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query descriptors must be (B, {self.dim}), got {queries.shape}")
        if not np.isfinite(queries).all():
            raise ValueError("query descriptors contain NaN or inf")
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k, b = int(k), len(queries)
        ids = np.full((b, k), -1, dtype=np.int64)
        scores = np.full((b, k), -np.inf, dtype=np.float32)
        restricted = np.zeros(b, dtype=bool)
        fallback = np.zeros(b, dtype=bool)
        if hint_xy is not None:
            hint_xy = np.asarray(hint_xy, dtype=np.float64).reshape(-1, 2)
            if len(hint_xy) != b:
                raise ValueError(f"{len(hint_xy)} hints for {b} queries")
            if radius is None or not (np.isfinite(radius) and radius > 0):
                raise ValueError(f"a GPS hint needs a positive radius in metres, got {radius}")
            hinted = np.flatnonzero(np.isfinite(hint_xy).all(axis=1))
            for q, near in zip(hinted, self._xy_tree.query_ball_point(hint_xy[hinted], r=radius)):
                if not near:
                    fallback[q] = True
                    continue
                restricted[q] = True
                near = np.sort(np.asarray(near, dtype=np.int64))
                s = dot_rows(np.asarray(self.descriptors[near], dtype=np.float32), queries[q])
                top = np.argsort(-s, kind="stable")[:k]
                ids[q, :top.size], scores[q, :top.size] = near[top], s[top]
        whole = np.flatnonzero(~restricted)
        if whole.size:
            s, i = self.index.search(queries[whole], min(k, len(self)))
            ids[whole, :i.shape[1]], scores[whole, :s.shape[1]] = i, s
            scores[ids < 0] = -np.inf
        return SearchResult(ids=ids, scores=scores, restricted=restricted, fallback=fallback)


def _gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def dot_rows(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """rows @ vector without BLAS: a per-frame matrix-vector product is too small to gain from OpenBLAS's
    threads, and their busy-waiting afterwards slows the next frame's descriptor (README, performance)."""
    return np.einsum("ij,j->i", rows, vector)


def _train_index(vectors: np.ndarray, config: IndexConfig) -> tuple[object, IndexConfig]:
    """A faiss inner-product index over the vectors, and the settings it was built with."""
    faiss = _faiss()
    n, dim = vectors.shape
    if config.kind == "flat":
        index = faiss.IndexFlatIP(dim)
        config = IndexConfig(kind="flat")
    else:
        if dim % config.pq_m:
            raise ValueError(f"pq_m={config.pq_m} must divide the descriptor dimension {dim}")
        needed = max(config.nlist, 2 ** config.pq_bits)
        if n < needed:
            raise ValueError(f"an IVF{config.nlist},PQ{config.pq_m}x{config.pq_bits} index needs at least "
                             f"{needed} images to train, the map has {n}: use the flat index")
        index = faiss.index_factory(dim, f"IVF{config.nlist},PQ{config.pq_m}x{config.pq_bits}",
                                    faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        faiss.extract_index_ivf(index).nprobe = config.nprobe
    index.add(vectors)
    return index, config


def _write_table(path: Path, table: MapTable) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_COLUMNS)
        for row in zip(table.keys, table.easting, table.northing, table.lat, table.lon, table.heading,
                       table.captured_at, table.path):
            writer.writerow([row[0], *(repr(float(v)) for v in row[1:7]), row[7]])


def _read_table(path: Path, zone: UtmZone) -> MapTable:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != TABLE_COLUMNS:
            raise MapError(f"{path}: header must be {','.join(TABLE_COLUMNS)}, got {header}")
        rows = list(reader)
    if any(len(r) != len(TABLE_COLUMNS) for r in rows):
        bad = next(i for i, r in enumerate(rows) if len(r) != len(TABLE_COLUMNS))
        raise MapError(f"{path}: row {bad + 2} has {len(rows[bad])} fields, expected {len(TABLE_COLUMNS)}")
    cols = list(zip(*rows)) if rows else [()] * len(TABLE_COLUMNS)
    try:
        numbers = [np.asarray(c, dtype=np.float64) for c in cols[1:7]]
        return MapTable(keys=np.asarray(cols[0], dtype=str), easting=numbers[0], northing=numbers[1],
                        lat=numbers[2], lon=numbers[3], heading=numbers[4], captured_at=numbers[5],
                        path=np.asarray(cols[7], dtype=object), zone=zone)
    except ValueError as exc:
        raise MapError(f"{path}: {exc}") from exc


def _read_meta(root: Path) -> MapMeta:
    if not root.is_dir():
        raise MapError(f"{root}: no such map directory")
    path = root / "map.json"
    if not path.is_file():
        raise MapError(f"{path}: missing (not a map directory, or an interrupted build)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MapError(f"{path}: not valid JSON ({exc})") from exc
    return MapMeta.from_json(data, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory to `out`, replacing an old map only after the new one is whole."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
