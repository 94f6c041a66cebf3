"""Local features on disk in hloc's layout (`feats-*.h5`): one HDF5 group per image, named by its key (a '/' in a
key makes nested groups, as hloc's relative image paths do), holding `keypoints` (N, 2), `descriptors` (D, N: one
column per keypoint, as hloc), `scores` (N,) and `image_size` (2,) = width, height. `FeatureStore` writes such a
file resumably; `FeatureFile` reads it back per key and checks it against a map's images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np
from tqdm import tqdm

from .images import ImageError, read_rgb
from .local_features import LocalExtractor, LocalFeatures

FEATURES_FILE = "local_features.h5"     # the attachment's name inside a map bundle
DATASETS = ("keypoints", "descriptors", "scores", "image_size")
DESCRIPTOR_DTYPES = ("float16", "float32", "uint8")


def entry_names(file: h5py.File) -> list[str]:
    """The names of the groups that hold datasets (hloc's image names, '/' for nesting), in file order."""
    names: list[str] = []

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Group) and any(isinstance(item, h5py.Dataset) for item in obj.values()):
            names.append(name)

    file.visititems(visit)
    return names


def read_entry(file: h5py.File, name: str, source: str | Path) -> LocalFeatures:
    """The features stored under `name`, their shapes checked; a ValueError names `source`, the entry and the
    problem."""
    def fail(text: str) -> ValueError:
        return ValueError(f"{source}: entry {name!r}: {text}")

    group = file.get(name)
    if not isinstance(group, h5py.Group):
        raise fail("missing")
    absent = [d for d in DATASETS if not isinstance(group.get(d), h5py.Dataset)]
    if absent:
        raise fail(f"no dataset {', '.join(absent)} (needs {', '.join(DATASETS)})")
    try:
        keypoints, descriptors = group["keypoints"][()], group["descriptors"][()]
        scores, size = group["scores"][()], group["image_size"][()]
    except (OSError, KeyError) as exc:
        raise fail(f"unreadable ({exc})") from exc
    n = len(keypoints) if keypoints.ndim == 2 else -1
    if keypoints.shape != (n, 2) or descriptors.ndim != 2 or descriptors.shape[1] != n or scores.shape != (n,):
        raise fail(f"keypoints {list(keypoints.shape)}, descriptors {list(descriptors.shape)}, scores "
                   f"{list(scores.shape)}: expected (N, 2), (D, N) and (N,)")
    if size.shape != (2,) or not (np.asarray(size) > 0).all():
        raise fail(f"image_size must be (width, height) > 0, got {size.tolist()}")
    if descriptors.dtype.name not in DESCRIPTOR_DTYPES:
        raise fail(f"descriptors are {descriptors.dtype}, expected one of {', '.join(DESCRIPTOR_DTYPES)}")
    if not (np.isfinite(keypoints).all() and np.isfinite(scores).all()):
        raise fail("keypoints or scores contain NaN or inf")
    return LocalFeatures(keypoints=keypoints.astype(np.float32), descriptors=np.ascontiguousarray(descriptors.T),
                         scores=scores.astype(np.float32), image_size=(int(size[0]), int(size[1])))


def check_name(key: str) -> str:
    """An image key as an HDF5 group name: refused when a '/' in it would make an empty or '.' level."""
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"image key {key!r} cannot name an HDF5 group (an empty, '.' or '..' level between '/')")
    return key


def open_h5(path: str | Path, mode: str) -> h5py.File:
    """The HDF5 file at `path`; a ValueError naming it when it is not one."""
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc


class FeatureStore:
    """A features file being written, tied to one extractor and its settings. Entries written before an
    interruption are kept (a half-written one is dropped), so the same build resumes with the rest."""

    def __init__(self, path: str | Path, extractor: str, settings: dict) -> None:
        self.path = Path(path)
        self.file = open_h5(self.path, "a")
        recorded = (self.file.attrs.get("extractor"), self.file.attrs.get("settings"))
        wanted = (extractor, json.dumps(settings, sort_keys=True))
        if recorded == (None, None):
            self.file.attrs["extractor"], self.file.attrs["settings"] = wanted
            self.file.attrs["count"] = 0
        elif recorded != wanted:
            self.file.close()
            raise ValueError(f"{self.path}: holds features of {recorded[0]} {recorded[1]}, not {wanted[0]} "
                             f"{wanted[1]}: delete it, or extract with the same settings")
        self.done: set[str] = set()
        for name in entry_names(self.file):
            if all(isinstance(self.file[name].get(d), h5py.Dataset) for d in DATASETS):
                self.done.add(name)
            else:
                del self.file[name]
        self.file.attrs["count"] = len(self.done)

    def write(self, key: str, features: LocalFeatures) -> None:
        """Store one image's features under `key` (hloc's layout), refusing another descriptor size or type than
        the file's."""
        descriptors = np.asarray(features.descriptors)
        dim, dtype = descriptors.shape[1], descriptors.dtype.name
        if dtype not in DESCRIPTOR_DTYPES:
            raise ValueError(f"{key}: descriptors are {dtype}, expected one of {', '.join(DESCRIPTOR_DTYPES)}")
        if "dim" not in self.file.attrs:
            self.file.attrs["dim"], self.file.attrs["dtype"] = dim, dtype
        if (dim, dtype) != (int(self.file.attrs["dim"]), str(self.file.attrs["dtype"])):
            raise ValueError(f"{key}: {dim}-D {dtype} descriptors, {self.path} holds "
                             f"{self.file.attrs['dim']}-D {self.file.attrs['dtype']}")
        if key in self.done:
            del self.file[key]
            self.done.discard(key)
        group = self.file.create_group(check_name(key))
        group["keypoints"] = np.asarray(features.keypoints, np.float32).reshape(-1, 2)
        group["descriptors"] = descriptors.T
        group["scores"] = np.asarray(features.scores, np.float32)
        group["image_size"] = np.asarray(features.image_size, np.int64)
        self.done.add(key)
        self.file.attrs["count"] = len(self.done)
        self.file.flush()

    def keep(self, keys: Iterable[str]) -> None:
        """Drop the entries of images not among `keys` (removed from the map since they were extracted)."""
        for key in self.done - set(keys):
            del self.file[key]
            self.done.discard(key)
        self.file.attrs["count"] = len(self.done)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def extract_into(store: FeatureStore, extractor: LocalExtractor, items: Sequence[tuple[str, str]],
                 progress: bool = False) -> None:
    """Features of the (key, image path) items the store does not hold yet, written as they come. Every map image
    needs its features: an unreadable one is a ValueError naming it."""
    todo = [(key, path) for key, path in items if key not in store.done]
    for key, path in tqdm(todo, desc=f"local features ({extractor.name})", unit="img", disable=not progress):
        try:
            rgb = read_rgb(path)
        except ImageError as exc:
            raise ValueError(f"local features of {key}: {exc}") from exc
        store.write(key, extractor(rgb))


class FeatureFile:
    """A features file read back: its extractor, descriptor size and type, and each image's features by key."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = open_h5(self.path, "r")
        attrs = self.file.attrs
        missing = [a for a in ("extractor", "settings", "count", "dim", "dtype") if a not in attrs]
        if missing:
            self.file.close()
            raise ValueError(f"{self.path}: no attribute {', '.join(missing)} (not written by FeatureStore)")
        self.extractor, self.settings = str(attrs["extractor"]), json.loads(attrs["settings"])
        self.count, self.dim, self.dtype = int(attrs["count"]), int(attrs["dim"]), str(attrs["dtype"])

    def read(self, key: str) -> LocalFeatures:
        """One image's features: keypoints (N, 2), descriptors (N, D), scores (N,)."""
        return read_entry(self.file, key, self.path)

    def check(self, keys: Sequence[str], every_entry: bool) -> None:
        """Refuse a file that does not hold exactly these images' features: the count always, and with
        `every_entry` each image's entry, shapes, descriptor size and type; the first bad key is named."""
        if self.count != len(keys):
            raise ValueError(f"{self.path}: features of {self.count} images, the map has {len(keys)}")
        for key in keys if every_entry else ():
            features = self.read(key)
            found = (features.descriptors.shape[1], features.descriptors.dtype.name)
            if found != (self.dim, self.dtype):
                raise ValueError(f"{self.path}: entry {key!r}: {found[0]}-D {found[1]} descriptors, the file "
                                 f"records {self.dim}-D {self.dtype}")

    def summary(self) -> dict:
        return {"extractor": self.extractor, **self.settings, "dim": self.dim, "dtype": self.dtype,
                "images": self.count}

    def close(self) -> None:
        self.file.close()
