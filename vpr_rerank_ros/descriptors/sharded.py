"""Describing a whole dataset (e.g. the 1.6 M images of Mapillary SLS) with every process of a torchrun job:
each rank describes its shard into its own resumable HDF5 part, rank 0 merges the parts into one descriptor
file in the `DescriptorStore` layout, which `vpr-map build --descriptors` and `vpr-train --descriptors` read."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py

from ..distributed import Workers
from .extract import DescriptorExtractor, DescriptorStore
from .model import GlobalDescriptor

MERGE_ROWS = 65536          # rows copied per read when merging (bounded memory: ~1 GB at 4096-D float32)


def parts_folder(out: str | Path) -> Path:
    """Where the ranks' parts of `out` live until they are merged."""
    return Path(f"{out}.parts")


def describe_sharded(items: Sequence[tuple[str, str | Path]], model: GlobalDescriptor, out: str | Path,
                     workers: Workers = Workers(), device: str | None = None, batch_size: int = 8,
                     loader_workers: int = 0, progress: bool = False, fp16: bool = False) -> dict[str, str]:
    """Describe (key, path) `items` into the HDF5 file `out`. Rank r of `workers` takes items r, r + W, ...
    into `out.parts/rank-r-of-W.h5`, skipping the images its part already holds (a killed job started again
    with the same number of processes resumes); once every rank is done, rank 0 merges the parts into `out`
    (written beside it and renamed: `out` is complete or absent) and removes them. Returns this rank's
    unreadable images (key -> reason)."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists: it is a complete descriptor file (delete it to describe again)")
    if len({key for key, _ in items}) != len(items):
        raise ValueError("image keys must be unique: the descriptor file is keyed by them")
    folder = parts_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"rank-{workers.rank}-of-{workers.world}.h5"
    with DescriptorStore(part, model.identity, model.output_dim) as store:
        extractor = DescriptorExtractor(model, device, batch_size, fp16=fp16, workers=loader_workers)
        failed = extractor.describe_files(list(items)[workers.rank::workers.world], progress=progress, store=store,
                                          label=f"describe {workers.rank + 1}/{workers.world}").failed
    workers.barrier()
    if workers.main:
        _merge([folder / f"rank-{r}-of-{workers.world}.h5" for r in range(workers.world)], out, model)
    workers.barrier()
    return failed


def _merge(parts: list[Path], out: Path, model: GlobalDescriptor) -> None:
    """Concatenate the parts into `out` in MERGE_ROWS chunks, then remove them and their folder."""
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)                   # a merge that was killed starts again
    with DescriptorStore(partial, model.identity, model.output_dim) as merged:
        for path in parts:
            with h5py.File(path, "r") as part:
                for start in range(0, part["keys"].shape[0], MERGE_ROWS):
                    merged.append(part["keys"].asstr()[start:start + MERGE_ROWS],
                                  part["descriptors"][start:start + MERGE_ROWS])
    partial.replace(out)
    for path in parts:
        path.unlink()
    parts[0].parent.rmdir()
