"""What a re-ranker receives: one typed object for a batch of queries and their candidates, and the one
builder that makes it from a map (used by the localizer, evaluation, training and the benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:   # the builder takes a map; the object itself needs none
    from ..mapdb import MapBundle


@dataclass(frozen=True)
class RerankInputs:
    """A batch of B queries with K candidates each, in initial retrieval order.

    query          (B, D) L2-normalised query descriptors
    candidates     (B, K, D) L2-normalised candidate descriptors
    poses          (B, K, 3) candidates' easting, northing (m), grid heading (deg); None without map geometry
    overlaps       (B, K, K) candidates' positional affinities (FoV overlap) from the map's overlap graph
    query_heading  (B,) the queries' grid headings (deg clockwise from UTM grid north); NaN = unknown
    ids            (B, K) the candidates' map rows: lets a re-ranker use what it precomputed for the map
    """

    query: torch.Tensor
    candidates: torch.Tensor
    poses: torch.Tensor | None = None
    overlaps: torch.Tensor | None = None
    query_heading: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        q, c = self.query, self.candidates
        if q.dim() != 2 or c.dim() != 3 or c.shape[0] != q.shape[0] or c.shape[2] != q.shape[1]:
            raise ValueError(f"expected query (B, D) and candidates (B, K, D), got {tuple(q.shape)} and "
                             f"{tuple(c.shape)}")
        b, k = c.shape[:2]
        expected = {"poses": (b, k, 3), "overlaps": (b, k, k), "query_heading": (b,), "ids": (b, k)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must be {_dims(name)} = {shape}, got {tuple(value.shape)}")

    @property
    def batch(self) -> int:
        return self.candidates.shape[0]

    @property
    def k(self) -> int:
        return self.candidates.shape[1]

    def to(self, device: str | torch.device) -> "RerankInputs":
        """The same inputs on `device`."""
        return replace(self, **{name: None if value is None else value.to(device)
                                for name, value in vars(self).items()})

    def first(self, k: int) -> "RerankInputs":
        """The inputs restricted to each query's first `k` candidates."""
        cut = {"candidates": self.candidates[:, :k], "poses": _head(self.poses, k), "ids": _head(self.ids, k),
               "overlaps": None if self.overlaps is None else self.overlaps[:, :k, :k]}
        return replace(self, **cut)


def _dims(name: str) -> str:
    return {"poses": "(B, K, 3)", "overlaps": "(B, K, K)", "query_heading": "(B,)", "ids": "(B, K)"}[name]


def _head(value: torch.Tensor | None, k: int) -> torch.Tensor | None:
    return None if value is None else value[:, :k]


def rerank_inputs(bundle: "MapBundle", query: np.ndarray, ids: np.ndarray, query_heading: np.ndarray | None = None,
                  geometry: bool = True, device: str | torch.device = "cpu") -> RerankInputs:
    """The inputs for (B, D) query descriptors and their (B, K) candidate map rows: candidate descriptors,
    and with `geometry` the candidates' poses, their overlaps (one batched lookup) and the queries' grid
    headings ((B,) degrees, NaN = unknown). Re-rankers that ignore geometry are spared the lookup."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"candidate ids must be (B, K), got {ids.shape}")
    if (ids < 0).any():
        raise ValueError("some queries have fewer candidates than K (padding ids of -1); use a smaller K")
    query = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
    candidates = bundle.rows(ids)
    poses = overlaps = heading = None
    if geometry:
        poses = torch.from_numpy(bundle.table.poses[ids])
        overlaps = torch.from_numpy(bundle.overlap.lookup_batch(ids))
        if query_heading is not None:
            heading = torch.from_numpy(np.asarray(query_heading, dtype=np.float64).reshape(len(ids)))
    inputs = RerankInputs(torch.from_numpy(query), torch.from_numpy(candidates), poses, overlaps, heading,
                          torch.from_numpy(ids))
    return inputs.to(device)
