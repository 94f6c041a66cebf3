"""Training-free re-rankers on the neighbour graph of the query and its candidates: k-reciprocal encoding
(Zhong et al. 2017) and Zhang et al.'s GNN re-ranking (seed 002, eq. 8-14). Node 0 is the query, nodes
1..K the candidates; everything is batched matrix work, with no loops over queries or candidates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reranker
from .inputs import RerankInputs


def _graph(query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, K+1, D) nodes: the query first, then the candidates."""
    return torch.cat([query.unsqueeze(1), candidates], dim=1)


def _top_mask(order: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, N) boolean: [b, i, j] is true when j is among the first k of row i of `order`."""
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    return mask.scatter_(2, order[..., :k], True)


class KReciprocal(Reranker):
    """k-reciprocal re-ranking: Jaccard distance of expanded k-reciprocal neighbour encodings blended with the
    original (squared Euclidean, row-normalised) distance; higher score = smaller final distance."""

    name = "k_reciprocal"

    def __init__(self, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> None:
        super().__init__()
        if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
            raise ValueError(f"need k1 >= 1, k2 >= 1 and 0 <= lambda_value <= 1, got {k1}, {k2}, {lambda_value}")
        self.k1, self.k2, self.lambda_value = int(k1), int(k2), float(lambda_value)

    def score(self, inputs: RerankInputs) -> torch.Tensor:
        query, candidates = inputs.query, inputs.candidates
        dtype = query.dtype
        x = _graph(query, candidates).float()
        n = x.shape[1]
        dist = torch.cdist(x, x).pow(2)
        dist = dist / dist.amax(dim=2, keepdim=True).clamp_min(1e-12)          # each row by its maximum
        order = torch.argsort(dist, dim=2, stable=True)                        # row i starts with i itself
        forward = _top_mask(order, min(self.k1 + 1, n))
        reciprocal = forward & forward.transpose(1, 2)                         # R(i, k1)
        half = _top_mask(order, min(int(round(self.k1 / 2)) + 1, n))
        half_reciprocal = half & half.transpose(1, 2)                          # R(j, k1/2)
        # Expansion: add R(j, k1/2) for j in R(i, k1) when it shares more than 2/3 of itself with R(i, k1).
        shared = torch.einsum("bik,bjk->bij", reciprocal.float(), half_reciprocal.float())
        size = half_reciprocal.sum(2).float()
        accept = reciprocal & (shared > (2.0 / 3.0) * size.unsqueeze(1))
        expanded = reciprocal | (torch.einsum("bij,bjk->bik", accept.float(), half_reciprocal.float()) > 0)
        weights = torch.where(expanded, torch.exp(-dist), torch.zeros_like(dist))
        v = weights / weights.sum(2, keepdim=True)
        if self.k2 > 1:                                                        # local query expansion
            v = torch.einsum("bij,bjk->bik", _top_mask(order, min(self.k2, n)).float(), v) / min(self.k2, n)
        overlap = torch.minimum(v[:, :1, :], v).sum(2)                         # (B, N): sum_k min(V_q, V_j)
        jaccard = 1.0 - overlap / (2.0 - overlap)
        final = jaccard * (1.0 - self.lambda_value) + dist[:, 0, :] * self.lambda_value
        return (-final[:, 1:]).to(dtype)


class GnnKnn(Reranker):
    """Zhang et al.'s training-free GNN: node features = rows of the symmetrised top-k1 adjacency A* = (A + A^T)/2;
    each layer adds the top-k2 neighbours' features weighted by similarity^alpha (sum), then L2-normalises;
    candidates are scored by cosine similarity to the query node."""

    name = "gnn_knn"

    def __init__(self, k1: int = 20, k2: int = 6, alpha: float = 2.0, layers: int = 2) -> None:
        super().__init__()
        if k1 < 1 or k2 < 1 or layers < 1:
            raise ValueError(f"need k1, k2, layers >= 1, got {k1}, {k2}, {layers}")
        self.k1, self.k2, self.alpha, self.layers = int(k1), int(k2), float(alpha), int(layers)

    def score(self, inputs: RerankInputs) -> torch.Tensor:
        query, candidates = inputs.query, inputs.candidates
        dtype = query.dtype
        x = _graph(query, candidates).float()
        n = x.shape[1]
        sim = torch.einsum("bid,bjd->bij", x, x)
        order = torch.argsort(sim, dim=2, descending=True, stable=True)
        adjacency = _top_mask(order, min(self.k1, n)).float()
        h = (adjacency + adjacency.transpose(1, 2)) / 2                        # eq. 9
        edges = order[..., :min(self.k2, n)]                                    # eq. 12: top-k2 by similarity
        weight = torch.gather(sim, 2, edges).clamp_min(0) ** self.alpha
        mix = torch.zeros_like(sim).scatter_(2, edges, weight)                 # row i: its top-k2 neighbours' weights
        for _ in range(self.layers):                                          # eq. 14, sum aggregation
            h = F.normalize(h + torch.bmm(mix, h), dim=2)
        return torch.einsum("bj,bkj->bk", h[:, 0], h[:, 1:]).to(dtype)
