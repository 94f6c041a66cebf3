"""The map bundle: geotagged map images, their global descriptors, a faiss index and the FoV-overlap
graph in one validated directory, and top-k retrieval over it (optionally near a GPS hint).

Layout of a map directory (every file listed with its size and SHA-256 in map.json):
    map.json         format, version, counts, UTM zone, descriptor kind/dimension/model, index, checksums
    images.csv       key, easting, northing, lat, lon, heading, captured_at, path (one row per image)
    descriptors.npy  (N, D) float32 or float16, L2-normalised rows, memory-mapped on load
    index.faiss      faiss index: exact inner product ('flat'), or PCA + IVF-PQ whose short list is re-scored
                     exactly against descriptors.npy ('ivfpq', for maps of millions)
    overlap.npz      sparse FoV-overlap graph (see geo.OverlapGraph)
Optional attachments: the map's own descriptor model, and local_features.h5 (keypoints and descriptors of every
map image in hloc's layout, see feature_store), checked on load like the rest.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import uuid
import weakref
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.spatial import cKDTree
from tqdm import tqdm

from .descriptors.model import NORM_TOLERANCE, check_unit_rows
from .feature_store import FEATURES_FILE, FeatureFile
from .geo import FOV_ANGLE_DEG, FOV_RADIUS_M, OverlapGraph, UtmZone, latlon_to_utm, utm_to_latlon
from .geometric import Features
from .local_features import EXTRACTORS, OpenCVExtractor

FORMAT_NAME = "vpr_rerank_ros.map"
FORMAT_VERSION = 1
TABLE_COLUMNS = ("key", "easting", "northing", "lat", "lon", "heading", "captured_at", "path")
FILES = ("images.csv", "descriptors.npy", "index.faiss", "overlap.npz")
INDEX_KINDS = ("flat", "ivfpq")
BUILD_CHUNK = 65536         # descriptor rows read, checked and indexed at a time while building
PCA_SAMPLE = 32768          # rows the index's PCA is computed from (of the training sample)
FEATURE_CACHE = 128         # map images whose local features are kept prepared for matching (~1 MB each)


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
    """Which faiss index to build: 'flat' (exact) or 'ivfpq' (approximate, for maps of millions): the descriptors
    reduced by PCA, an IVF of `nlist` cells with PQ codes (L2 on the reduced vectors, which orders unit vectors
    like the inner product), and the best `rescore` of its answers re-scored exactly from descriptors.npy.
    Defaults chosen on the million-image benchmark (benchmarks/million_map.py)."""

    kind: str = "flat"
    nlist: int = 2048      # IVF cells (about 2 sqrt(N) for a million images)
    pq_m: int = 32         # PQ sub-quantizers (must divide the reduced dimension)
    pq_bits: int = 8
    nprobe: int = 32       # cells visited per search
    pca_dim: int = 256     # dimension the index works in; 0 (or >= D) keeps the descriptors' own
    rescore: int = 256     # approximate answers re-scored exactly per query (at least k)
    train_size: int = 81920    # images the quantizers are trained on (a random sample; 40 per cell)

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        for name in ("nlist", "pq_m", "pq_bits", "nprobe", "rescore", "train_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"index {name} must be positive, got {getattr(self, name)}")
        if int(self.pca_dim) < 0:
            raise ValueError(f"index pca_dim must be 0 (no reduction) or positive, got {self.pca_dim}")


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
    def build(cls, out: str | Path, table: MapTable, descriptors, descriptor: dict,
              index: IndexConfig = IndexConfig(), fov_radius: float = FOV_RADIUS_M,
              fov_deg: float = FOV_ANGLE_DEG, dtype: str = "float32", overwrite: bool = False,
              attachments: dict[str, Path] | None = None, progress: bool = False) -> "MapBundle":
        """Write a map directory atomically (a staging directory beside `out`, renamed once whole) and load it.

        `descriptors`: (N, D) rows in the table's order, any array-like read in chunks of BUILD_CHUNK rows (an
        array, a memory-mapped .npy, an HDF5 dataset), so a map larger than memory builds in bounded memory: rows
        are checked and streamed into descriptors.npy, the index is trained on a random sample of them and filled
        chunk by chunk. `descriptor` describes the model that made them: DescriptorInfo's fields but dim and dtype
        (at least `kind`; the model's identity lets `check_model` refuse a different query model).
        `attachments` ({name: source file}) are copied in and checksummed like the map's own files
        (e.g. the map-specific descriptor model). A build that is killed leaves only its staging directory,
        which the next build of `out` removes: `out` is the old map or the new one, never half of one.
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
        shape = tuple(getattr(descriptors, "shape", ()))
        if len(shape) != 2 or shape[0] != n:
            raise ValueError(f"descriptors must be ({n}, D) for {n} images, got {shape}")
        try:
            info = DescriptorInfo(**descriptor, dim=int(shape[1]), dtype=dtype)
        except TypeError as exc:
            raise ValueError(f"descriptor info: {exc} (fields: {[f.name for f in fields(DescriptorInfo)]})") from exc

        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)        # what a killed build left behind
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            stored = np.lib.format.open_memmap(tmp / "descriptors.npy", mode="w+", dtype=dtype, shape=shape)
            for start in tqdm(range(0, n, BUILD_CHUNK), desc="descriptors", unit="chunk", disable=not progress):
                chunk = np.asarray(descriptors[start:start + BUILD_CHUNK]).astype(dtype)
                check_unit_rows(chunk, dtype, "descriptors", labels=table.keys[start:start + len(chunk)])
                stored[start:start + len(chunk)] = chunk
            stored.flush()
            faiss_index, index_config = _build_index(stored, index, progress)
            _faiss().write_index(faiss_index, str(tmp / "index.faiss"))
            del faiss_index, stored
            graph = OverlapGraph.build(table.poses, fov_radius, fov_deg)
            graph.save(tmp / "overlap.npz")
            _write_table(tmp / "images.csv", table)
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

        `use_gpu`: None = on the GPU when faiss-gpu and a CUDA device are available; True = on the GPU, through
        faiss-gpu when installed, else as an exact search in torch over the descriptors copied to the GPU.
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
        if FEATURES_FILE in files:
            _check_features(root / FEATURES_FILE, table.keys.tolist(), every_entry=verify)
        gpu = _gpu_available() if use_gpu is None else bool(use_gpu)
        if gpu:
            if _gpu_available():
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            elif torch.cuda.is_available():
                index = TorchFlatIndex(descriptors, torch.device("cuda"))
            else:
                raise MapError("use_gpu=True but no CUDA device is visible")
        return cls(root=root, meta=meta, table=table, descriptors=descriptors, overlap=overlap, index=index,
                   use_gpu=gpu)

    # ------------------------------------------------------------------ retrieval

    def attachment(self, name: str) -> Path | None:
        """Path of an attached file (checked on load), or None when the map has none of that name."""
        return self.root / name if name in self.meta.files and name not in FILES else None

    @cached_property
    def local_features(self) -> FeatureFile | None:
        """The map images' local features (read per key), or None for a map built without them."""
        path = self.attachment(FEATURES_FILE)
        return FeatureFile(path) if path is not None else None

    def local_extractor(self) -> OpenCVExtractor:
        """The extractor, with the map's settings, that gives a query local features comparable with the map's; a
        MapError for a map without local features or with features imported from hloc (e.g. SuperPoint), which
        this package cannot extract from a query."""
        features = self.local_features
        if features is None:
            raise MapError(f"the map {self.root} has no local features for geometric verification: rebuild it with "
                           "vpr-map build --local-features rootsift (or sift, orb, akaze)")
        if features.extractor not in EXTRACTORS or set(features.settings) != {"max_keypoints", "max_side"}:
            raise MapError(f"the map {self.root} holds {features.extractor} local features imported from hloc: "
                           f"this package cannot extract them from a query for geometric verification (it extracts "
                           f"{', '.join(EXTRACTORS)}); rebuild the map with vpr-map build --local-features rootsift")
        return OpenCVExtractor(features.extractor, **features.settings)

    def matching_features(self, ids) -> list[Features]:
        """The local features of map indices `ids`, prepared for matching; the last FEATURE_CACHE images' are kept."""
        return [self._prepared_features(int(i)) for i in ids]

    @cached_property
    def _prepared_features(self) -> Callable[[int], Features]:
        """One map image's prepared features by index, through an LRU cache of FEATURE_CACHE images."""
        def prepare(index: int) -> Features:
            return Features.of(self.local_features.read(str(self.table.keys[index])))

        return lru_cache(maxsize=FEATURE_CACHE)(prepare)

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
    def xy_tree(self) -> cKDTree:
        """A KD-tree of the map images' (easting, northing): GPS-restricted search and the localizer's spacing."""
        return cKDTree(np.stack([self.table.easting, self.table.northing], axis=1))

    def hint_from_latlon(self, lat, lon) -> np.ndarray:
        """GPS fixes (degrees) -> (B, 2) easting/northing in the map's UTM zone, the form `search` takes."""
        easting, northing, _ = latlon_to_utm(lat, lon, self.table.zone)
        return np.stack([np.atleast_1d(easting), np.atleast_1d(northing)], axis=1)

    def rows(self, ids) -> np.ndarray:
        """float32 descriptor rows of map indices (any shape; the result adds a last dimension D). Read with
        positioned reads rather than through the memory map, so a server touching a few rows per frame keeps only
        what it uses resident, whatever the map's size."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"descriptor rows out of range for a map of {len(self)} images")
        unique, inverse = np.unique(flat, return_inverse=True)
        out = np.empty((unique.size, self.dim), dtype=self.descriptors.dtype)
        row_bytes = out.itemsize * self.dim
        runs = np.flatnonzero(np.diff(unique) != 1) + 1                # consecutive rows are read at once
        for start, stop in zip(np.r_[0, runs], np.r_[runs, unique.size]):
            view = out[start:stop].view(np.uint8).reshape(-1)
            offset = self.descriptors.offset + int(unique[start]) * row_bytes
            if os.preadv(self._descriptor_fd, [view], offset) != view.size:
                raise MapError(f"{self.root / 'descriptors.npy'}: short read (the file changed?)")
        return out[inverse].astype(np.float32).reshape(*ids.shape, self.dim)

    @cached_property
    def _descriptor_fd(self) -> int:
        fd = os.open(self.root / "descriptors.npy", os.O_RDONLY)
        weakref.finalize(self, os.close, fd)
        return fd

    def search(self, queries: np.ndarray, k: int, hint_xy: np.ndarray | None = None,
               radius: float | None = None) -> SearchResult:
        """Top-k map images by inner product for (B, D) L2-normalised query descriptors.

        With `hint_xy` ((B, 2) easting/northing in the map's zone, or one (2,) / (1, 2) hint for every query;
        NaN rows = no hint) and `radius`
        (metres), each hinted query is scored exactly against the map images within the radius only;
        when none lies there it falls back to the whole map and `fallback` says so. An approximate ('ivfpq')
        index (or the float16 GPU search) proposes `rescore` candidates per query, which are scored exactly:
        scores are always inner products.
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
            if len(hint_xy) == 1:
                hint_xy = np.repeat(hint_xy, b, axis=0)
            if len(hint_xy) != b:
                raise ValueError(f"{len(hint_xy)} hints for {b} queries")
            if radius is None or not (np.isfinite(radius) and radius > 0):
                raise ValueError(f"a GPS hint needs a positive radius in metres, got {radius}")
            hinted = np.flatnonzero(np.isfinite(hint_xy).all(axis=1))
            for q, near in zip(hinted, self.xy_tree.query_ball_point(hint_xy[hinted], r=radius)):
                if not near:
                    fallback[q] = True
                    continue
                restricted[q] = True
                near = np.sort(np.asarray(near, dtype=np.int64))
                top, s = _top_exact(self.rows(near), queries[q], k)
                ids[q, :top.size], scores[q, :top.size] = near[top], s
        whole = np.flatnonzero(~restricted)
        if whole.size:
            approximate = self.meta.index.kind == "ivfpq" or isinstance(self.index, TorchFlatIndex)
            depth = min(max(k, self.meta.index.rescore) if approximate else k, len(self))
            s, i = self.index.search(queries[whole], depth)
            if approximate:
                for row, q in enumerate(whole):
                    proposed = i[row][i[row] >= 0]
                    top, best = _top_exact(self.rows(proposed), queries[q], k)
                    ids[q, :top.size], scores[q, :top.size] = proposed[top], best
            else:
                ids[whole, :i.shape[1]], scores[whole, :s.shape[1]] = i, s
            scores[ids < 0] = -np.inf
        return SearchResult(ids=ids, scores=scores, restricted=restricted, fallback=fallback)


def _top_exact(rows: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and inner products of the k rows most similar to `query`, best first (ties: lower position)."""
    s = dot_rows(rows, query)
    top = np.argsort(-s, kind="stable")[:k]
    return top, s[top]


class TorchFlatIndex:
    """Brute-force inner-product search in torch over float16 copies of the descriptors on a CUDA device: the GPU
    search where faiss has no GPU support (e.g. pip's faiss-cpu beside a CUDA build of torch). float16 can swap
    near ties, so `search` re-scores its short list exactly, as for 'ivfpq'. faiss's `search` interface."""

    def __init__(self, descriptors: np.ndarray, device: torch.device, chunk: int = 65536) -> None:
        n, self.d = descriptors.shape
        self.ntotal = n
        self.vectors = torch.empty((n, self.d), dtype=torch.float16, device=device)
        for start in range(0, n, chunk):
            self.vectors[start:start + chunk] = torch.from_numpy(np.asarray(descriptors[start:start + chunk],
                                                                            np.float16)).to(device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.asarray(queries, np.float32)).to(self.vectors.device, torch.float16)
        scores, ids = (q @ self.vectors.T).float().topk(min(int(k), self.ntotal), dim=1)
        return scores.cpu().numpy(), ids.cpu().numpy()


def _gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def dot_rows(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """rows @ vector without BLAS: a per-frame matrix-vector product is too small to gain from OpenBLAS's
    threads, and their busy-waiting afterwards slows the next frame's descriptor (README, performance)."""
    return np.einsum("ij,j->i", rows, vector)


def _pca(rows: np.ndarray, reduced: int) -> object:
    """faiss transform onto the `reduced` leading principal directions of `rows` (torch's eigh: faiss's own PCA
    training takes minutes at D = 4096). No bias: the index compares L2 distances, which a shift leaves alone."""
    faiss = _faiss()
    x = torch.from_numpy(rows)
    centred = x - x.mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)          # ascending eigenvalues
    basis = vectors[:, -reduced:].flip(1).T.contiguous().numpy()  # (reduced, D), leading direction first
    transform = faiss.LinearTransform(rows.shape[1], reduced, False)
    faiss.copy_array_to_vector(basis.ravel(), transform.A)
    transform.is_trained = True
    return transform


def _build_index(descriptors: np.ndarray, config: IndexConfig, progress: bool = False) -> tuple[object, IndexConfig]:
    """A faiss index over the (N, D) stored descriptors, filled BUILD_CHUNK rows at a time, and the settings it
    was built with. 'ivfpq' trains its PCA and quantizers on a random sample of `train_size` rows."""
    faiss = _faiss()
    n, dim = descriptors.shape
    if config.kind == "flat":
        index, config = faiss.IndexFlatIP(dim), IndexConfig(kind="flat")
    else:
        reduced = config.pca_dim if 0 < config.pca_dim < dim else dim
        config = IndexConfig(**{**asdict(config), "pca_dim": 0 if reduced == dim else reduced})
        if reduced % config.pq_m:
            raise ValueError(f"pq_m={config.pq_m} must divide the dimension the index works in ({reduced})")
        needed = max(config.nlist, 2 ** config.pq_bits, reduced if reduced < dim else 0)
        if n < needed:
            raise ValueError(f"an IVF{config.nlist},PQ{config.pq_m}x{config.pq_bits} index needs at least "
                             f"{needed} images to train, the map has {n}: use the flat index")
        sample = np.sort(np.random.default_rng(0).choice(n, min(n, config.train_size), replace=False))
        train = np.asarray(descriptors[sample], dtype=np.float32)
        # L2 on unit vectors orders like the inner product, and unlike it survives the projection.
        index = faiss.index_factory(reduced, f"IVF{config.nlist},PQ{config.pq_m}x{config.pq_bits}", faiss.METRIC_L2)
        if reduced < dim:
            index = faiss.IndexPreTransform(_pca(train[:PCA_SAMPLE], reduced), index)
        index.train(train)
        del train
        faiss.extract_index_ivf(index).nprobe = config.nprobe
    for start in tqdm(range(0, n, BUILD_CHUNK), desc="index", unit="chunk", disable=not progress):
        index.add(np.asarray(descriptors[start:start + BUILD_CHUNK], dtype=np.float32))
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


def _check_features(path: Path, keys: list[str], every_entry: bool) -> None:
    """A MapError naming the file and the first bad key unless `path` holds the features of exactly `keys`
    (with `every_entry`, each entry's shapes too; else the count)."""
    try:
        features = FeatureFile(path)
        try:
            features.check(keys, every_entry)
        finally:
            features.close()
    except ValueError as exc:
        raise MapError(str(exc)) from exc


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
