"""The re-ranking interface: a re-ranker maps `RerankInputs` (a batch of queries and their initially
retrieved candidates, see inputs.py) to (B, K) scores, higher is better; the new order is a stable
descending sort of the scores (`rerank_order`). Subclasses implement `score`."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .inputs import RerankInputs


class Reranker(nn.Module):
    """Base class of every re-ranker; `name` is its registry name (registry.py)."""

    name = "base"
    learned = False         # needs trained weights
    uses_geometry = False   # whether poses / overlaps / query_heading affect the scores (else not looked up)

    def forward(self, inputs: RerankInputs) -> torch.Tensor:
        if not isinstance(inputs, RerankInputs):
            raise TypeError(f"a re-ranker takes RerankInputs, got {type(inputs).__name__}")
        return self.score(inputs)

    def score(self, inputs: RerankInputs) -> torch.Tensor:
        """(B, K) scores of the candidates, higher is better."""
        raise NotImplementedError

    def attach_map(self, descriptors) -> None:
        """Precompute whatever depends only on the map's (N, D) descriptors; most re-rankers need nothing."""

    def untrained_warning(self) -> str | None:
        """What every edge (CLI, node) warns when this re-ranker runs without trained weights; None when fine."""
        return None

    @classmethod
    def parameters_with_defaults(cls) -> dict:
        """The constructor's parameters and their defaults: what `build_reranker(name, **params)` accepts."""
        signature = inspect.signature(cls.__init__)
        return {p.name: p.default for p in list(signature.parameters.values())[1:]
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_at_least(name: str, value, minimum=1) -> None:
    """A re-ranker parameter's lower bound, as a ValueError naming the parameter."""
    if not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def reranker_label(name: str, params: dict) -> str:
    """'superglobal P=1,beta=0.6': a re-ranker and its parameters in one table cell."""
    return " ".join([name, ",".join(f"{k}={v}" for k, v in params.items())]).strip()


def rerank_order(scores: torch.Tensor) -> torch.Tensor:
    """(B, K) indices of the candidates in their new order (stable: ties keep the initial order)."""
    return torch.sort(scores.float(), dim=1, descending=True, stable=True).indices


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, M, D) x (B, N, D) -> (B, M, N) inner products (of L2-normalised rows: cosine similarities)."""
    return torch.einsum("bmd,bnd->bmn", a, b)
