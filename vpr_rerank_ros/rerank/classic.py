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
        sim = cosine(candidates, candidates)                                  # (B, K, K)
        values, index = sim.topk(n, dim=2)                                    # self first
        weights = torch.cat([torch.ones_like(values[..., :1]), self.beta * values[..., 1:]], dim=2)
        weights = weights / weights.sum(2, keepdim=True)
        # The weighted mean over each candidate's P + 1 neighbours, one neighbour rank at a time: (P + 1) K D work
        # and K D memory, instead of a K x K mixing matrix times the candidates (a second K^2 D product).
        refined = torch.zeros_like(candidates)
        for rank in range(n):
            neighbour = torch.gather(candidates, 1, index[..., rank, None].expand(-1, -1, candidates.shape[2]))
            refined.addcmul_(weights[..., rank, None], neighbour)
        first = torch.einsum("bd,bkd->bk", query, refined)                    # s(q, c~_i)
        best = first.topk(n, dim=1).indices
        refined_query = torch.gather(refined, 1, best.unsqueeze(-1).expand(-1, -1, refined.shape[2])).amax(1)
        second = torch.einsum("bd,bkd->bk", refined_query, refined)           # s(q~, c~_i)
        return (first + second) / 2
