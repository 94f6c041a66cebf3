"""Training-free re-rankers on the neighbour graph of the query and its candidates: k-reciprocal encoding
(Zhong et al. 2017) and Zhang et al.'s GNN re-ranking (seed 002, eq. 8-14). Node 0 is the query, nodes
1..K the candidates; everything is batched matrix work, with no loops over queries or candidates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reranker
from .inputs import RerankInputs


def _gram(query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, K+1, K+1) float32 inner products of the graph's nodes, the query first: one product over the stacked
    nodes, so that equal descriptors get bit-equal rows and their ties stay exact."""
    x = torch.cat([query.unsqueeze(1), candidates], dim=1).float()
    return torch.einsum("bid,bjd->bij", x, x)


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
        gram = _gram(inputs.query, inputs.candidates)
        n = gram.shape[1]
        norms = torch.diagonal(gram, dim1=1, dim2=2)
        dist = (norms.unsqueeze(2) + norms.unsqueeze(1)).sub_(gram, alpha=2).clamp_min_(0)   # squared Euclidean
        dist = dist / dist.amax(dim=2, keepdim=True).clamp_min(1e-12)          # each row by its maximum
        # Sets are float 0/1 (B, N, N) masks: intersections and unions are then exact matrix products.
        near = _nearest(dist, min(self.k1 + 1, n))                             # row i starts with i itself
        reciprocal = _reciprocal(near)                                         # R(i, k1)
        half_reciprocal = _reciprocal(near[..., :min(int(round(self.k1 / 2)) + 1, n)])   # R(j, k1/2), symmetric
        # Expansion: add R(j, k1/2) for j in R(i, k1) when more than 2/3 of it lies in R(i, k1) (an integer test).
        shared = torch.bmm(reciprocal, half_reciprocal)                        # [i, j] = |R(i, k1) & R(j, k1/2)|
        accept = reciprocal * (3 * shared > 2 * half_reciprocal.sum(1, keepdim=True))
        expanded = reciprocal + torch.bmm(accept, half_reciprocal)             # > 0 on the expanded set
        weights = torch.where(expanded > 0, dist.neg().exp_(), 0.0)
        v = weights / weights.sum(2, keepdim=True)
        if self.k2 > 1:                                                        # local query expansion:
            v = torch.bmm(_rows(near[..., :min(self.k2, n)]), v) / min(self.k2, n)   # mean of the k2 nearest's rows
        overlap = torch.minimum(v[:, :1], v[:, 1:]).sum(2)                     # (B, K): sum_k min(V_q, V_j)
        jaccard = 1.0 - overlap / (2.0 - overlap)
        final = jaccard * (1.0 - self.lambda_value) + dist[:, 0, 1:] * self.lambda_value
        return (-final).to(inputs.query.dtype)


def _nearest(dist: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, k) indices of each row's k smallest of the (B, N, N) non-negative float32 `dist`, ties by index (a
    stable sort's first k): topk of int64 keys, the float's bits (ordered like the floats when >= 0) then the
    column. A stable sort of the whole rows would cost several times as much; a plain topk breaks ties arbitrarily."""
    key = (dist.view(torch.int32).long() << 32) | torch.arange(dist.shape[2], device=dist.device)
    return torch.topk(key, k, dim=2, largest=False).indices


def _rows(near: torch.Tensor) -> torch.Tensor:
    """(B, N, N) float 0/1: [b, i, j] = 1 when j is in row i of the (B, N, k) index lists `near`."""
    n = near.shape[1]
    return torch.zeros(near.shape[0], n, n, dtype=torch.float32, device=near.device).scatter_(2, near, 1.0)


def _reciprocal(near: torch.Tensor) -> torch.Tensor:
    """(B, N, N) float 0/1: [b, i, j] = 1 when j is in row i of `near` and i in row j (mutual neighbours)."""
    forward = _rows(near)
    return forward * forward.transpose(1, 2)


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
        sim = _gram(inputs.query, inputs.candidates)
        n = sim.shape[1]
        order = torch.argsort(sim, dim=2, descending=True, stable=True)
        adjacency = _rows(order[..., :min(self.k1, n)])
        h = (adjacency + adjacency.transpose(1, 2)) / 2                        # eq. 9
        edges = order[..., :min(self.k2, n)]                                    # eq. 12: top-k2 by similarity
        weight = torch.gather(sim, 2, edges).clamp_min(0) ** self.alpha
        mix = torch.zeros_like(sim).scatter_(2, edges, weight)                 # row i: its top-k2 neighbours' weights
        for _ in range(self.layers):                                          # eq. 14, sum aggregation
            h = F.normalize(h + torch.bmm(mix, h), dim=2)
        return torch.einsum("bj,bkj->bk", h[:, 0], h[:, 1:]).to(inputs.query.dtype)
