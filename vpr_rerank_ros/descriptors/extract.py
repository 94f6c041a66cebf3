"""Batched descriptor extraction: images from files (a DataLoader with workers) or arrays, on CUDA when
available (optionally fp16 autocast) else CPU; images of one size are batched together; unreadable images
are reported and skipped. `DescriptorStore` is a resumable HDF5 file of descriptors keyed by image key;
`read_descriptors` reads such a file, whoever wrote it (e.g. an external pipeline's precomputed descriptors)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..images import ImageError, read_rgb
from .model import GlobalDescriptor, check_unit_rows, prepare_image

log = logging.getLogger(__name__)


DEVICES = "auto, cpu, cuda or cuda:N"   # the device names every command and the node take


def pick_device(device: str | None = None) -> torch.device:
    """The torch device a `device` setting names: 'auto' (or none) is CUDA when available, else the CPU. A name
    that is not one of DEVICES, or CUDA where this machine has none, is a ValueError that says so, before any
    work, rather than a failure deep in the first batch."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: expected {DEVICES}") from None
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: expected {DEVICES}")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU found"
        raise ValueError(f"device {device!r} needs CUDA, which is not available here (torch {torch.__version__}: "
                         f"{build}); use cpu or auto")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return chosen


@dataclass
class Extraction:
    """Descriptors of a set of images (row i belongs to keys[i]); unreadable images are listed with the reason."""

    keys: list = field(default_factory=list)
    descriptors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    failed: dict = field(default_factory=dict)


class _ImageFiles(Dataset):
    def __init__(self, items: Sequence[tuple[str, str | Path]], max_side: int) -> None:
        self.items, self.max_side = list(items), max_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, path = self.items[i]
        try:
            return key, prepare_image(read_rgb(path), self.max_side), None
        except (ImageError, ValueError) as exc:
            return key, None, str(exc)


class DescriptorExtractor:
    """Runs a `GlobalDescriptor` over many images."""

    def __init__(self, model: GlobalDescriptor, device: str | None = None, batch_size: int = 8,
                 fp16: bool = False, workers: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.batch_size, self.workers = batch_size, workers
        self.fp16 = fp16 and self.device.type == "cuda"

    @torch.no_grad()
    def run(self, batch: torch.Tensor, head: Callable | None = None) -> np.ndarray:
        """(B, 3, H, W) in [0, 1] -> (B, D) float32 (the model, or `head(model, batch)`)."""
        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            out = head(self.model, batch) if head else self.model(batch)
        return out.float().cpu().numpy()

    def describe_arrays(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) descriptors of RGB uint8 arrays (batched by size, input order kept)."""
        tensors = [prepare_image(im, self.model.config.max_side) for im in images]
        out = np.zeros((len(tensors), self.model.output_dim), np.float32)
        for idx, batch in _same_size_batches(list(enumerate(tensors)), self.batch_size):
            out[idx] = self.run(batch)
        return out

    def describe_files(self, items: Sequence[tuple[str, str | Path]], progress: bool = False,
                       store: "DescriptorStore | None" = None, head: Callable | None = None,
                       label: str = "describe") -> Extraction:
        """Descriptors of (key, path) items. With a `store`, keys it already holds are skipped and new
        descriptors go to it as they come (so an interrupted run resumes), not into the result, whose
        `descriptors` stay empty: memory does not grow with the number of images. `label` names the progress bar."""
        from tqdm import tqdm

        done = store.keys() if store is not None else set()
        todo = [(k, p) for k, p in items if k not in done]
        loader = DataLoader(_ImageFiles(todo, self.model.config.max_side), batch_size=None, shuffle=False,
                            num_workers=self.workers)
        result = Extraction()
        chunks: list[np.ndarray] = []
        pending: list[tuple[str, torch.Tensor]] = []

        def flush(group: list) -> None:
            for keys, batch in _same_size_batches(group, self.batch_size):
                desc = self.run(batch, head)
                result.keys.extend(keys)
                if store is not None:
                    store.append(keys, desc)
                else:
                    chunks.append(desc)

        for key, tensor, error in tqdm(loader, total=len(todo), disable=not progress, unit="img", desc=label):
            if error is not None:
                result.failed[key] = error
                log.warning("skipping %s: %s", key, error)
                continue
            pending.append((key, tensor))
            if len(pending) >= self.batch_size * 4:
                flush(pending)
                pending = []
        flush(pending)
        dim = chunks[0].shape[1] if chunks else (self.model.output_dim if head is None or store else 0)
        result.descriptors = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
        return result


def _same_size_batches(items: list, batch_size: int) -> Iterable[tuple[list, torch.Tensor]]:
    """Group (id, (3, H, W) tensor) pairs by size into stacked batches; yields (ids, batch)."""
    groups: dict[tuple, list] = {}
    for ident, tensor in items:
        groups.setdefault(tuple(tensor.shape), []).append((ident, tensor))
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            part = group[start:start + batch_size]
            yield [ident for ident, _ in part], torch.stack([t for _, t in part])


class DescriptorStore:
    """An HDF5 file of descriptors keyed by image key, tied to one model identity, appendable (resumable)."""

    def __init__(self, path: str | Path, identity: str, dim: int, dtype: str = "float32") -> None:
        self.path = Path(path)
        self.file = h5py.File(self.path, "a")
        if "descriptors" in self.file:
            stored, stored_dim = str(self.file.attrs.get("model_identity", "?")), self.file["descriptors"].shape[1]
            if stored != identity or stored_dim != dim:
                self.file.close()
                raise ValueError(f"{self.path}: holds {stored_dim}-D descriptors of another model ({stored[:12]}...), "
                                 f"not {dim}-D of {identity[:12]}...")
        else:
            self.file.attrs["model_identity"] = identity
            self.file.create_dataset("descriptors", (0, dim), maxshape=(None, dim), dtype=dtype, chunks=(64, dim))
            self.file.create_dataset("keys", (0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(1024,))

    def ordered_keys(self) -> list[str]:
        """The keys in the order their rows were appended."""
        return [k.decode() if isinstance(k, bytes) else k for k in self.file["keys"][:]]

    def keys(self) -> set[str]:
        return set(self.ordered_keys())

    def append(self, keys: Sequence[str], descriptors: np.ndarray) -> None:
        n = self.file["keys"].shape[0]
        self.file["keys"].resize((n + len(keys),))
        self.file["descriptors"].resize((n + len(keys), self.file["descriptors"].shape[1]))
        self.file["keys"][n:] = list(keys)
        self.file["descriptors"][n:] = descriptors
        self.file.flush()

    def read(self) -> tuple[list[str], np.ndarray]:
        return self.ordered_keys(), self.file["descriptors"][:].astype(np.float32)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "DescriptorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_descriptors(path: str | Path, keys: Sequence[str]) -> tuple[np.ndarray, str | None]:
    """(len(keys), D) float32 rows of an HDF5 descriptor file for `keys`, in that order, and the model identity
    the file records (None if none). The file holds a string dataset `keys` and an (N, D) float dataset
    `descriptors` of L2-normalised rows (the `DescriptorStore` layout); anything else is refused by name."""
    path = Path(path)
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with file:
        if "keys" not in file or "descriptors" not in file:
            raise ValueError(f"{path}: needs datasets 'keys' and 'descriptors', has {sorted(file)}")
        stored = [k.decode() if isinstance(k, bytes) else str(k) for k in file["keys"][:]]
        data = file["descriptors"]
        if data.ndim != 2 or data.shape[0] != len(stored):
            raise ValueError(f"{path}: 'descriptors' is {list(data.shape)} for {len(stored)} keys")
        row = {k: i for i, k in enumerate(stored)}
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{path}: no descriptor for {len(missing)} of {len(keys)} images, e.g. {missing[:3]}")
        unique, inverse = np.unique(np.array([row[k] for k in keys], np.int64), return_inverse=True)
        rows = np.asarray(data[unique] if len(unique) else np.zeros((0, data.shape[1])), np.float32)[inverse]
        identity = file.attrs.get("model_identity")
    check_unit_rows(rows, "float32", f"{path}: descriptors", keys)
    return rows, (str(identity) if identity is not None else None)
