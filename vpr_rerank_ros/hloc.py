"""hloc's feature files, both ways: a map built from hloc's global descriptors (`global-feats-*.h5`) and local
features (`feats-*.h5`), and a map's own written in those layouts (`export_hloc`), so hloc's models and this
package's re-rankers and node can be mixed.

hloc names each entry by the image's path relative to its image folder (e.g. `db/0001.jpg`, nested groups for
the '/'). A map image matches the entry named exactly its key, or the entry whose name is the tail of the image's
path (`db/0001.jpg` names `/data/db/0001.jpg`, never `/data/query/0001.jpg`); none or two matches is an error."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .descriptors.model import check_unit_rows
from .feature_store import FeatureStore, check_name, entry_names, open_h5, read_entry

GLOBAL_DATASET = "global_descriptor"


def match_names(names: Sequence[str], items: Sequence[tuple[str, str]], source: str | Path) -> list[str]:
    """The entry name of each (key, image path) item among hloc's `names`, by the rule in this module's docstring;
    a ValueError naming `source` and the first image with no entry or with two."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    known = set(names)
    matched = []
    for key, path in items:
        key, parts = str(key), Path(os.path.abspath(path)).parts
        found = {name for name in by_file.get(parts[-1], ())
                 if tuple(name.split("/")) == parts[len(parts) - len(name.split("/")):]}
        found |= {key} & known
        if len(found) != 1:
            problem = "no entry" if not found else f"several entries ({', '.join(sorted(found))})"
            raise ValueError(f"{source}: {problem} for map image {key!r} ({path}); entries are named by the key or "
                             f"by the image path relative to hloc's image folder")
        matched.append(found.pop())
    return matched


def read_global_features(path: str | Path, items: Sequence[tuple[str, str]]) -> np.ndarray:
    """(N, D) float32 unit rows from hloc's `global-feats-*.h5` for the (key, path) items, in their order. Rows
    must be L2-normalised within their stored type's tolerance (hloc stores float16) and are renormalised."""
    with open_h5(path, "r") as file:
        names = match_names(entry_names(file), items, path)
        rows, dim, half = [], None, False
        for name in names:
            data = file[name].get(GLOBAL_DATASET)
            if not isinstance(data, h5py.Dataset) or data.ndim != 1:
                raise ValueError(f"{path}: entry {name!r} has no 1-D {GLOBAL_DATASET!r} dataset (is this hloc's "
                                 f"global-feats file?)")
            dim = dim or data.shape[0]
            if data.shape[0] != dim:
                raise ValueError(f"{path}: entry {name!r} is {data.shape[0]}-D, {names[0]!r} is {dim}-D")
            rows.append(np.asarray(data[()], np.float32))
            half |= data.dtype == np.float16
    rows = np.stack(rows)
    check_unit_rows(rows, "float16" if half else "float32", f"{path}: global descriptors", labels=names)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def import_local_features(path: str | Path, items: Sequence[tuple[str, str]], out: Path) -> Path:
    """hloc's `feats-*.h5` entries of the (key, path) items, written to `out` under their keys (keypoints as
    float32, descriptors as stored) as the map's features file; one descriptor size and type throughout."""
    path = Path(path)
    with open_h5(path, "r") as file:
        names = match_names(entry_names(file), items, path)
        extractor = path.stem.removeprefix("feats-")
        with FeatureStore(out, extractor, {"source": path.name}) as store:
            first = None
            for (key, _), name in zip(items, names):
                if key in store.done:
                    continue
                features = read_entry(file, name, path)
                kind = (features.descriptors.shape[1], features.descriptors.dtype.name)
                first = first or (name, kind)
                if kind != first[1]:
                    raise ValueError(f"{path}: entry {name!r}: {kind[0]}-D {kind[1]} descriptors, entry {first[0]!r} "
                                     f"has {first[1][0]}-D {first[1][1]}")
                store.write(key, features)
            store.keep(key for key, _ in items)
    return out


def export_hloc(bundle, out: str | Path, image_root: str | Path | None = None) -> list[Path]:
    """Write a map's global descriptors (`global-feats-<descriptor>.h5`) and, when it has them, its local features
    (`feats-<extractor>.h5`) in hloc's layouts into folder `out`. Entries are named by the image path relative to
    `image_root` (hloc's image folder), or by the image key without one. Returns the files written."""
    out = Path(out)
    names = [_name(key, path, image_root) for key, path in zip(bundle.table.keys, bundle.table.path)]
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"global-feats-{_slug(bundle.meta.descriptor.name or bundle.meta.descriptor.kind)}.h5"]
    with h5py.File(written[0], "w") as file:
        for i, name in enumerate(names):
            file.create_group(name)[GLOBAL_DATASET] = np.asarray(bundle.descriptors[i])
    features = bundle.local_features
    if features is not None:
        written.append(out / f"feats-{_slug(features.extractor)}.h5")
        with h5py.File(written[1], "w") as file:
            for key, name in zip(bundle.table.keys, names):
                features.file.copy(features.file[key], file, name)
    return written


def _name(key: str, path: str, image_root: str | Path | None) -> str:
    if image_root is None:
        return check_name(key)
    if not path:
        raise ValueError(f"map image {key!r} has no recorded path: export without --image-root (names = keys)")
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(image_root))
    if relative.startswith(".."):
        raise ValueError(f"map image {key!r} ({path}) is not under the image root {image_root}")
    return check_name(Path(relative).as_posix())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "map"

