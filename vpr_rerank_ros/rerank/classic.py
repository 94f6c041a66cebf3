"""Training-free re-rankers that refine descriptors: none, average query expansion, alpha-weighted query
expansion (thesis eq. 2.3, 2.4) and SuperGlobal re-ranking (eq. 2.5-2.7, as the official code does it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reranker, check_at_least, cosine
from .inputs import RerankInputs


class NoRerank(Reranker):
    """The initial similarities (the retrieval order, up to exact ties)."""

    name = "none"

    def score(self, inputs: RerankInputs) -> torch.Tensor:
        query, candidates = inputs.query, inputs.candidates
        return torch.einsum("bd,bkd->bk", query, candidates)


class AverageQueryExpansion(Reranker):
    """New query = mean of the query and its top-k candidates; candidates re-scored against it."""

    name = "aqe"

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        check_at_least("k", k)
        self.k = int(k)

    def score(self, inputs: RerankInputs) -> torch.Tensor:
        query, candidates = inputs.query, inputs.candidates
        expanded = (query + candidates[:, :self.k].sum(1)) / (1 + min(self.k, candidates.shape[1]))
        return torch.einsum("bd,bkd->bk", F.normalize(expanded, dim=1), candidates)


class AlphaQueryExpansion(Reranker):
    """New query = query + top-k candidates weighted by similarity^alpha (negative similarities count 0)."""

    name = "alpha_qe"

    def __init__(self, k: int = 1, alpha: float = 1.0) -> None:
        super().__init__()
        check_at_least("k", k)
        check_at_least("alpha", alpha, 0)
        self.k, self.alpha = int(k), float(alpha)

    def score(self, inputs: RerankInputs) -> torch.Tensor:
        query, candidates = inputs.query, inputs.candidates
        top = candidates[:, :self.k]
        weights = torch.einsum("bd,bkd->bk", query, top).clamp_min(0) ** self.alpha
        expanded = query + torch.einsum("bk,bkd->bd", weights, top)
        return torch.einsum("bd,bkd->bk", F.normalize(expanded, dim=1), candidates)


class SuperGlobal(Reranker):
    """SuperGlobal re-ranking (Shao et al. 2023) among the candidates: each candidate becomes the weighted mean
    of itself (weight 1) and its P nearest candidates (weight beta x similarity); the refined query is the
    element-wise max of the P + 1 best refined candidates; score = mean of s(q, c~) and s(q~, c~)."""

    name = "superglobal"

    def __init__(self, P: int = 1, beta: float = 0.15) -> None:
        super().__init__()
        check_at_least("P", P)
        check_at_least("beta", beta, 0)
        self.P, self.beta = int(P), float(beta)

    def score(self, inputs: RerankInputs) -> torch.Tensor:
        query, candidates = inputs.query, inputs.candidates
        n = min(self.P + 1, candidates.shape[1])
        sim = cosine(candidates, candidates)                                  # (B, K, K): the one K^2 D product
        values, index = sim.topk(n, dim=2)                                    # self first
        weights = torch.cat([torch.ones_like(values[..., :1]), self.beta * values[..., 1:]], dim=2)
        weights = weights / weights.sum(2, keepdim=True)
        # The refined candidates c~_i = sum_r weights[i, r] c_index[i, r] are never formed: s(x, c~_i) is the same
        # weighted sum of the s(x, c_j), so each score costs one K x D matrix-vector product.
        first = _mixed(weights, index, torch.einsum("bkd,bd->bk", candidates, query))   # s(q, c~_i)
        best = first.topk(n, dim=1).indices.unsqueeze(2).expand(-1, -1, n)  # the n best refined candidates
        # ...and only those n are formed, from their n x n neighbours, for the refined query (their element-wise max).
        best_index, best_weights = index.gather(1, best), weights.gather(1, best)
        neighbours = torch.gather(candidates, 1, best_index.flatten(1).unsqueeze(2).expand(-1, -1, candidates.shape[2]))
        refined_query = (best_weights.unsqueeze(3) * neighbours.view(*best.shape, -1)).sum(2).amax(1)
        second = _mixed(weights, index, torch.einsum("bkd,bd->bk", candidates, refined_query))   # s(q~, c~_i)
        return (first + second) / 2


def _mixed(weights: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, K) sum_r weights[b, i, r] values[b, index[b, i, r]]: per-candidate values carried to the refined ones."""
    return (weights * values.gather(1, index.flatten(1)).view_as(index)).sum(2)
