"""Building a map bundle from geotagged images (describe, index, record the model's identity) and
querying it with the model it was built with."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets.geotagged import ImageSet, read_exif_gps
from .descriptors.extract import DescriptorExtractor, DescriptorStore, read_descriptors
from .descriptors.loaders import load_model
from .descriptors.model import GlobalDescriptor, load_native, save_model
from .descriptors.offline import fit_offline_model
from .geo import latlon_to_utm
from .mapdb import IndexConfig, MapBundle

log = logging.getLogger(__name__)
MODEL_FILE = "model.safetensors"
MODEL_CONFIG = "model.json"


@dataclass
class BuildReport:
    bundle: MapBundle
    model: GlobalDescriptor | None   # None for a map of precomputed descriptors
    skipped: dict            # key -> reason (no GPS, unreadable image)


def build_map(out: str | Path, images: ImageSet, model: GlobalDescriptor | None = None, device: str | None = None,
              fp16: bool = False, batch_size: int = 8, workers: int = 0, index: IndexConfig = IndexConfig(),
              dtype: str = "float32", overwrite: bool = False, progress: bool = False,
              descriptor_file: str | Path | None = None) -> BuildReport:
    """Describe the images and write the map. Without `model`, the offline default is fitted on these
    images and stored in the map (it is map-specific); with a model, only its identity is recorded, and the images
    are described into `<out>.describing.h5` first, so a build that is killed resumes with the images it had not
    described yet (and the map is written from that file in bounded memory). With `descriptor_file` (HDF5 keyed
    by image key, see `read_descriptors`), its rows are used as they are."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True, or --overwrite, to replace it)")
    if descriptor_file is not None:
        if model is not None:
            raise ValueError("give a descriptor model or a file of precomputed descriptors, not both")
        rows, identity = read_descriptors(descriptor_file, list(images.table.keys))
        descriptor = {"kind": "precomputed", "name": f"precomputed ({Path(descriptor_file).name})",
                      "identity": identity, "stored_model": False}
        bundle = MapBundle.build(out, images.table, rows, descriptor, index=index, dtype=dtype, overwrite=overwrite)
        return BuildReport(bundle=bundle, model=None, skipped=dict(images.skipped))
    if model is None:
        return _build_offline(out, images, device, batch_size, workers, index, dtype, overwrite, progress)
    store_path = out.with_name(out.name + ".describing.h5")
    out.parent.mkdir(parents=True, exist_ok=True)
    with DescriptorStore(store_path, model.identity, model.output_dim) as store:
        failed = DescriptorExtractor(model, device, batch_size, fp16=fp16, workers=workers).describe_files(
            images.items, progress=progress, store=store).failed
        keys = [k.decode() if isinstance(k, bytes) else k for k in store.file["keys"][:]]
        if not keys:
            raise ValueError("no map image could be described")
        row = {k: i for i, k in enumerate(images.table.keys)}
        bundle = MapBundle.build(out, images.table.take([row[k] for k in keys]), store.file["descriptors"],
                                 _descriptor_info(model, stored=False), index=index, dtype=dtype,
                                 overwrite=overwrite, progress=progress)
    store_path.unlink()
    return BuildReport(bundle=bundle, model=model, skipped={**images.skipped, **failed})


def _build_offline(out: Path, images: ImageSet, device, batch_size: int, workers: int, index: IndexConfig,
                   dtype: str, overwrite: bool, progress: bool) -> BuildReport:
    """The offline default fitted on the map images, which describes them too; stored in the map."""
    fit = fit_offline_model(images.items, device=device, batch_size=batch_size, workers=workers, progress=progress)
    model, extraction = fit.model, fit.descriptors_of_all(images.items)
    if not extraction.keys:
        raise ValueError("no map image could be described")
    row = {k: i for i, k in enumerate(images.table.keys)}
    order = np.argsort([row[k] for k in extraction.keys])
    rows = np.array([row[k] for k in extraction.keys])[order]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / MODEL_FILE)
        attachments = {MODEL_FILE: Path(tmp) / MODEL_FILE, MODEL_CONFIG: Path(tmp) / MODEL_CONFIG}
        bundle = MapBundle.build(out, images.table.take(rows), extraction.descriptors[order],
                                 _descriptor_info(model, stored=True), index=index, dtype=dtype, overwrite=overwrite,
                                 attachments=attachments)
    return BuildReport(bundle=bundle, model=model, skipped={**images.skipped, **extraction.failed})


def _descriptor_info(model: GlobalDescriptor, stored: bool) -> dict:
    config = model.config
    return {"kind": "netvlad", "name": config.name, "backbone": config.backbone, "identity": model.identity,
            "stored_model": stored}


def map_model(bundle: MapBundle, weights: str | Path | None = None) -> GlobalDescriptor:
    """The descriptor model to describe queries for `bundle`: `weights` when given, else the model stored in
    the map. Refuses a model whose identity differs from the one the map was built with."""
    if weights is not None:
        model = load_model(weights)
    else:
        stored = bundle.attachment(MODEL_FILE)
        if stored is None:
            raise ValueError(f"{bundle.root} stores no descriptor model (it was built with "
                             f"{bundle.meta.descriptor.name or 'external weights'}): give those weights")
        model = load_native(stored)
    bundle.check_model(model)
    return model


def query_images(bundle: MapBundle, model: GlobalDescriptor, items: list, top_k: int, device: str | None = None,
                 batch_size: int = 8, workers: int = 0, fp16: bool = False) -> list[dict]:
    """One row per query image and rank: query, rank, key, score, easting, northing, query_easting,
    query_northing (the last two None when the query has no EXIF GPS)."""
    extraction = DescriptorExtractor(model, device, batch_size, fp16=fp16, workers=workers).describe_files(items)
    paths = dict(items)
    result = bundle.search(extraction.descriptors, top_k) if extraction.keys else None
    rows = []
    for q, key in enumerate(extraction.keys):
        gps = read_exif_gps(paths[key])
        qe = qn = None
        if gps is not None:
            e, n, _ = latlon_to_utm(gps.lat, gps.lon, bundle.table.zone)
            qe, qn = float(e), float(n)
        for rank, (i, score) in enumerate(zip(result.ids[q], result.scores[q]), start=1):
            if i < 0:
                break
            rows.append({"query": key, "rank": rank, "key": str(bundle.table.keys[i]), "score": float(score),
                         "easting": float(bundle.table.easting[i]), "northing": float(bundle.table.northing[i]),
                         "query_easting": qe, "query_northing": qn})
    for key, reason in extraction.failed.items():
        log.warning("query %s skipped: %s", key, reason)
    return rows
