"""The re-ranking interface and the registry of re-rankers by name.

A re-ranker maps a batch of queries and their initially retrieved candidates to new scores:
    scores = reranker(query, candidates, poses=None, overlaps=None, query_heading=None, ids=None)
with `query` (B, D) and `candidates` (B, K, D) L2-normalised, in initial retrieval order; `poses` (B, K, 3)
= (easting, northing, grid heading deg) of the candidates; `overlaps` (B, K, K) their positional affinities
when the map has them precomputed; `query_heading` (B,) degrees (NaN = unknown); `ids` (B, K) the candidates'
map rows, which let a re-ranker use what it precomputed for the whole map (`attach_map`). It returns (B, K)
scores, higher is better; the new order is a stable descending sort (`rerank_order`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

REGISTRY: dict[str, Callable[..., "Reranker"]] = {}


def register(name: str):
    """Class decorator: make a re-ranker constructible by `build_reranker(name, **params)`."""
    def wrap(cls):
        REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


class Reranker(nn.Module):
    """Base class: validates inputs once, then calls `score`."""

    name = "base"
    learned = False
    uses_geometry = False   # whether `poses` / `overlaps` / `query_heading` affect the scores

    def forward(self, query: torch.Tensor, candidates: torch.Tensor, poses: torch.Tensor | None = None,
                overlaps: torch.Tensor | None = None, query_heading: torch.Tensor | None = None,
                ids: torch.Tensor | None = None) -> torch.Tensor:
        if query.dim() != 2 or candidates.dim() != 3 or candidates.shape[0] != query.shape[0] \
                or candidates.shape[2] != query.shape[1]:
            raise ValueError(f"expected query (B, D) and candidates (B, K, D), got {tuple(query.shape)} and "
                             f"{tuple(candidates.shape)}")
        if poses is not None and poses.shape != (*candidates.shape[:2], 3):
            raise ValueError(f"poses must be (B, K, 3), got {tuple(poses.shape)}")
        if overlaps is not None and overlaps.shape != (candidates.shape[0], candidates.shape[1], candidates.shape[1]):
            raise ValueError(f"overlaps must be (B, K, K), got {tuple(overlaps.shape)}")
        if ids is not None and ids.shape != candidates.shape[:2]:
            raise ValueError(f"ids must be (B, K), got {tuple(ids.shape)}")
        return self.score(query, candidates, poses, overlaps, query_heading, ids)

    def score(self, query, candidates, poses, overlaps, query_heading, ids) -> torch.Tensor:
        raise NotImplementedError

    def attach_map(self, descriptors: torch.Tensor) -> None:
        """Precompute whatever depends only on the map's (N, D) descriptors; most re-rankers need nothing."""


def build_reranker(name: str, **params) -> Reranker:
    """A re-ranker by registry name with its parameters (as accepted from YAML)."""
    from . import classic, learned, neighbours  # noqa: F401  (registers the re-rankers)

    if name not in REGISTRY:
        raise ValueError(f"unknown re-ranker {name!r}; known: {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[name](**params)
    except TypeError as exc:
        raise ValueError(f"re-ranker {name!r}: {exc}") from exc


def reranker_label(name: str, params: dict) -> str:
    """'superglobal P=1,beta=0.6': a re-ranker and its parameters in one table cell."""
    return " ".join([name, ",".join(f"{k}={v}" for k, v in params.items())]).strip()


def rerank_order(scores: torch.Tensor) -> torch.Tensor:
    """(B, K) indices of the candidates in their new order (stable: ties keep the initial order)."""
    return torch.sort(scores.float(), dim=1, descending=True, stable=True).indices


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, M, D) x (B, N, D) -> (B, M, N) inner products (of L2-normalised rows: cosine similarities)."""
    return torch.einsum("bmd,bnd->bmn", a, b)
