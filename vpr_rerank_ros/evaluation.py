"""Retrieval evaluation of a map against MSLS-layout queries (real or synthetic): describe the queries
with the map's model, search (optionally near a noisy GPS hint), score against positives taken from the
map's own positions."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .datasets.msls import MslsSide
from .descriptors.extract import DescriptorExtractor
from .descriptors.model import GlobalDescriptor
from .geo import latlon_to_utm
from .mapdb import MapBundle, SearchResult
from .metrics import positives_within, retrieval_metrics


@dataclass
class RetrievalRun:
    query: MslsSide            # the queries that could be described, in result order
    descriptors: np.ndarray    # their descriptors, same order
    result: SearchResult
    positives: list            # per query: map row indices within the radius
    metrics: dict


def evaluate_queries(bundle: MapBundle, model: GlobalDescriptor | None, query: MslsSide, k: int = 20,
                     radius: float = 25.0, hint_noise_m: float | None = None, hint_radius: float | None = None,
                     device: str | None = None, batch_size: int = 8, seed: int = 0,
                     descriptors: np.ndarray | None = None) -> RetrievalRun:
    """Recall@k / mAP@k of `bundle` for `query` images (positives within `radius` metres of map positions).

    With `hint_noise_m`, each query gets a GPS hint at its true position plus Gaussian noise of that many
    metres, and search is restricted to `hint_radius`. Pass `descriptors` (rows in `query` order) to reuse
    them; `model` is then not needed.
    """
    if descriptors is None:
        items = list(zip(query.keys, map(str, query.image_paths())))
        extraction = DescriptorExtractor(model, device, batch_size).describe_files(items)
        order = {key: i for i, key in enumerate(query.keys)}
        query = query.select(np.array([order[key] for key in extraction.keys], dtype=np.int64))
        descriptors = extraction.descriptors
    east, north, _ = latlon_to_utm(query.lat, query.lon, bundle.table.zone)   # the map's zone, whatever the CSV's
    query_xy = np.stack([east, north], axis=1)
    hint = None
    if hint_noise_m is not None:
        hint = query_xy + np.random.default_rng(seed).normal(0.0, hint_noise_m, (len(query), 2))
    result = bundle.search(descriptors, k, hint_xy=hint, radius=hint_radius)
    map_xy = np.stack([bundle.table.easting, bundle.table.northing], axis=1)
    positives = positives_within(query_xy, map_xy, radius)
    ks = tuple(x for x in (1, 5, 10, 20) if x <= k)
    return RetrievalRun(query=query, descriptors=descriptors, result=result, positives=positives,
                        metrics=retrieval_metrics(result.ids, positives, ks=ks))


def rerank_run(bundle: MapBundle, run: RetrievalRun, reranker, batch_size: int = 32,
               device: str = "cpu") -> tuple[np.ndarray, dict]:
    """Re-rank a retrieval run's candidates: returns (ranked map ids (Q, K), metrics). Candidate descriptors,
    poses and overlaps come from the map; queries go through the re-ranker in batches (the re-ranker is
    attached to the map first)."""
    import torch

    from .rerank.base import rerank_order

    ids = run.result.ids
    if (ids < 0).any():
        raise ValueError("some queries have fewer candidates than K; use a smaller K")
    ranked = np.empty_like(ids)
    poses_all = bundle.table.poses
    reranker.attach_map(bundle.descriptors)
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            block = ids[start:start + batch_size]
            query = torch.from_numpy(np.ascontiguousarray(run.descriptors[start:start + batch_size], np.float32))
            candidates = torch.from_numpy(np.asarray(bundle.descriptors[block.reshape(-1)], np.float32))
            candidates = candidates.reshape(*block.shape, -1)
            poses = overlaps = None
            if reranker.uses_geometry:
                poses = torch.from_numpy(poses_all[block]).to(device)
                overlaps = torch.from_numpy(np.stack([bundle.overlap.lookup(row, row) for row in block])).to(device)
            scores = reranker(query.to(device), candidates.to(device), poses, overlaps,
                              ids=torch.from_numpy(block).to(device))
            ranked[start:start + batch_size] = np.take_along_axis(block, rerank_order(scores).cpu().numpy(), 1)
    ks = tuple(x for x in (1, 5, 10, 20) if x <= ids.shape[1])
    return ranked, retrieval_metrics(ranked, run.positives, ks=ks)
