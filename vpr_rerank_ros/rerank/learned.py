"""Learned re-rankers (thesis chapter 3, docs/reranking.md): the GNN over affinity features [gnn], the FC-only
model [fc] and the CSA ablation [csa]; weights as safetensors + JSON config.

GNN: FC1 (D -> 512) + L2; node i's features are its visual affinities to the anchors r_0..r_L (query and
top-L candidates, on FC1 outputs) and, with `positional`, its field-of-view overlaps with the map anchors
r_1..r_L (zeros for the query); FC2 -> 768; `layers` x [12-head self-attention M, x <- x + MLP(x + M)];
L2; candidates are scored by cosine similarity to the refined query node. With `heading`, each node also
gets the angular affinity (1 + cos Δ) / 2 between the query's grid heading and its own (the thesis's
suggested extension; 0.5 when the query heading is unknown).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import dataclass_from, read_config, read_tensors, write_checkpoint
from ..geo import FOV_ANGLE_DEG, FOV_RADIUS_M, fov_overlap
from .base import Reranker, cosine
from .inputs import RerankInputs

VARIANTS = ("gnn", "fc", "csa")


@dataclass(frozen=True)
class GnnConfig:
    variant: str = "gnn"
    dim: int = 4096            # input descriptor dimension
    hidden: int = 512          # FC1 output (gnn, fc)
    K: int = 319               # candidates the model was trained for
    L: int = 127               # anchors besides the query
    width: int = 768
    heads: int = 12
    layers: int = 1
    mlp: int = 3072
    positional: bool = True
    heading: bool = False
    dropout: float = 0.2
    fov_radius: float = FOV_RADIUS_M
    fov_deg: float = FOV_ANGLE_DEG

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if min(self.dim, self.hidden, self.K, self.L, self.width, self.heads, self.layers, self.mlp) < 1:
            raise ValueError("dim, hidden, K, L, width, heads, layers and mlp must be positive")
        if self.L > self.K:
            raise ValueError(f"L ({self.L}) cannot exceed K ({self.K})")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")

    @property
    def node_features(self) -> int:
        return (self.L + 1) + (self.L if self.positional else 0) + (1 if self.heading else 0)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameters and names (in_proj_weight,
    in_proj_bias, out_proj)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, width) -> (B, N, width); `qkv` may come precomputed (see LearnedReranker.refine)."""
        if qkv is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)         # each (B, heads, N, width/heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def mix_channels(self, qkv: torch.Tensor) -> torch.Tensor:
        """The heads' outputs, concatenated, before out_proj, for one graph's channel-major q/k/v
        (3 x width, N) -> (width, N); no dropout. q/k/v are copied contiguous and kept 4-D: SDPA's fused CPU
        kernel is slower on strided heads and not used for 3-D inputs."""
        channels, n = qkv.shape
        q, k, v = qkv.view(3, 1, self.heads, channels // (3 * self.heads), n).transpose(3, 4).contiguous()
        return F.scaled_dot_product_attention(q, k, v)[0].transpose(1, 2).reshape(channels // 3, n)


class GnnLayer(nn.Module):
    """M = MultiHead(X, X, X); x <- x + MLP(x + M) (thesis eq. 3.5)."""

    def __init__(self, width: int, heads: int, mlp: int, dropout: float) -> None:
        super().__init__()
        self.attention = SelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def forward(self, x: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.mlp(x + self.attention(x, qkv))

    def forward_channels(self, x: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """The same layer, without dropout, on one graph's channel-major activations (width, N)."""
        attention, expand, shrink = self.attention, self.mlp[0], self.mlp[2]
        if qkv is None:
            qkv = channel_linear(attention.in_proj_weight, attention.in_proj_bias, x)
        y = channel_linear(attention.out_proj.weight, attention.out_proj.bias, attention.mix_channels(qkv), x)
        return channel_linear(shrink.weight, shrink.bias, self.mlp[1](channel_linear(expand.weight, expand.bias, y)), x)


def channel_linear(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """W x + b (+ residual) for channel-major x (in, columns) -> (out, columns): one GEMM whose output rows
    are channels: faster on CPU (MKL) than the node-major x W^T at the GNN's sizes (benchmarks/rerank.py)."""
    shift = bias[:, None] if residual is None else residual + bias[:, None]
    return torch.addmm(shift, weight, x)


def _versions(*tensors: torch.Tensor) -> tuple:
    """In-place updates (load_state_dict, optimiser steps) bump a tensor's version: a cache key for derived weights."""
    return tuple(t._version for t in tensors)


class LearnedReranker(Reranker):
    """The thesis model and its ablations; `weights` loads a checkpoint whose config must match the params."""

    learned = True

    def __init__(self, weights: str | Path | None = None, **params) -> None:
        super().__init__()
        unknown = sorted(set(params) - set(self.parameters_with_defaults()))
        if unknown:
            raise ValueError(f"the {self.variant} model has no parameter {unknown[0]!r}")
        params["variant"] = self.variant
        if weights is not None:
            stored = load_reranker_config(weights)
            clash = {k: (v, getattr(stored, k)) for k, v in params.items() if getattr(stored, k) != v}
            if clash:
                raise ValueError(f"{weights}: checkpoint config does not match the requested model: " +
                                 ", ".join(f"{k} requested {a!r}, stored {b!r}" for k, (a, b) in clash.items()))
            config = stored
        else:
            config = GnnConfig(**params)
        self.config = config
        self.uses_geometry = config.variant != "fc" and (config.positional or config.heading)
        c = config
        self.fc1 = nn.Linear(c.dim, c.hidden) if c.variant != "csa" else None
        if c.variant != "fc":
            self.input_dropout = nn.Dropout(c.dropout)
            self.fc2 = nn.Linear(c.node_features, c.width)
            self.layers = nn.ModuleList(GnnLayer(c.width, c.heads, c.mlp, c.dropout) for _ in range(c.layers))
        if c.variant == "csa":  # maps refined descriptors back to affinity space, for the CSA loss's MSE term
            self.head = nn.Sequential(nn.Linear(c.width, c.width), nn.GELU(), nn.Linear(c.width, c.L + 1))
        # Inference caches (not saved, moved with the module): FC1 of every map image (attach_map) and the
        # first layer's input projection folded into FC2; each is used only while the weights it came from
        # are unchanged.
        self.register_buffer("map_embeddings", None, persistent=False)
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)
        self._map_key = self._fold_key = None
        self.trained = weights is not None
        if weights is not None:
            tensors = read_tensors(weights)
            missing, unexpected = self.load_state_dict(tensors, strict=False)
            if missing or unexpected:
                raise ValueError(f"{weights}: weights do not fit {c.variant}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        self.eval()

    @classmethod
    def parameters_with_defaults(cls) -> dict:
        """`weights` and every GnnConfig field but the variant (a stored config must agree with those given)."""
        return {"weights": None, **{f.name: f.default for f in fields(GnnConfig) if f.name != "variant"}}

    def untrained_warning(self) -> str | None:
        if self.trained:
            return None
        return (f"re-ranker {self.name} has NO TRAINED WEIGHTS (give weights=PATH of a checkpoint): its ranking is "
                "that of a randomly initialised network")

    def embed(self, descriptors: torch.Tensor) -> torch.Tensor:
        """FC1 + L2 (identity + L2 for csa)."""
        return F.normalize(self.fc1(descriptors) if self.fc1 is not None else descriptors, dim=-1)

    def attach_map(self, descriptors: np.ndarray, chunk: int = 4096) -> None:
        """Embed every map descriptor once (FC1 is a fifth of a 1-layer GNN's work per query); later calls
        with `ids` look the candidates up instead of embedding them."""
        self._check_dim(descriptors.shape[1])
        if self.fc1 is None:
            return
        weight = self.fc1.weight
        with torch.no_grad():
            rows = [self.embed(torch.from_numpy(np.array(descriptors[i:i + chunk], np.float32))
                               .to(weight.device, weight.dtype)) for i in range(0, len(descriptors), chunk)]
        self.map_embeddings = torch.cat(rows) if rows else None
        self._map_key = _versions(self.fc1.weight, self.fc1.bias)

    def embed_nodes(self, query: torch.Tensor, candidates: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """(B, K+1, hidden) embeddings of the query and the candidates, the latter from the map cache when
        `ids` are given and the cache is current."""
        if ids is not None and self.map_embeddings is not None and \
                self._map_key == _versions(self.fc1.weight, self.fc1.bias):
            return torch.cat([self.embed(query).unsqueeze(1), self.map_embeddings[ids].to(query.dtype)], dim=1)
        return self.embed(torch.cat([query.unsqueeze(1), candidates], dim=1))

    def node_features(self, inputs: RerankInputs) -> torch.Tensor:
        """(B, K+1, node_features) affinity features of the query (row 0) and the candidates."""
        c = self.config
        candidates, poses, overlaps = inputs.candidates, inputs.poses, inputs.overlaps
        if candidates.shape[1] < c.L:
            raise ValueError(f"the {c.variant} model needs at least L = {c.L} candidates, got {candidates.shape[1]}")
        nodes = self.embed_nodes(inputs.query, candidates, inputs.ids)
        parts = [cosine(nodes, nodes[:, :c.L + 1])]                                    # visual affinity
        if c.positional:
            if overlaps is None and poses is None:
                raise ValueError("positional affinity needs the candidates' poses or their overlaps")
            if overlaps is not None:
                pos = overlaps[:, :, :c.L].to(nodes.dtype)
            else:
                pos = fov_overlap(poses[:, :, None, :].double(), poses[:, None, :c.L, :].double(),
                                  c.fov_radius, c.fov_deg).to(nodes.dtype)
            parts.append(torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1))         # the query has none
        if c.heading:
            parts.append(self._heading_affinity(inputs.query_heading, poses, nodes))
        return torch.cat(parts, dim=2)

    def _heading_affinity(self, query_heading, poses, nodes) -> torch.Tensor:
        b, n = nodes.shape[:2]
        if query_heading is None or poses is None:
            return torch.full((b, n, 1), 0.5, dtype=nodes.dtype, device=nodes.device)
        heading = query_heading.to(torch.float64).reshape(b, 1)
        delta = (heading - poses[:, :, 2].double()) * (math.pi / 180.0)     # deg2rad, which ONNX export lacks
        affinity = torch.where(torch.isnan(delta), torch.full_like(delta, 0.5), (1 + torch.cos(delta)) / 2)
        known = torch.where(torch.isnan(heading), torch.full_like(heading, 0.5), torch.ones_like(heading))
        return torch.cat([known, affinity], dim=1).unsqueeze(-1).to(nodes.dtype)

    def refine(self, inputs: RerankInputs) -> torch.Tensor:
        """(B, K+1, width) L2-normalised refined node descriptors (row 0 = query)."""
        features = self.input_dropout(self.node_features(inputs))
        # Inference shortcuts: FC2 is folded into the first layer's q/k/v projection, and a single graph (the
        # localizer's case) runs channel-major (see channel_linear; batches run faster node-major).
        inference = not self.training and not torch.is_grad_enabled()
        if inference and features.shape[0] == 1:
            columns = features[0].t()
            x = channel_linear(self.fc2.weight, self.fc2.bias, columns)
            qkv = channel_linear(*self._folded_first_projection(), columns)
            for i, layer in enumerate(self.layers):
                x = layer.forward_channels(x, qkv if i == 0 else None)
            return F.normalize(x.t(), dim=-1)[None]
        x = self.fc2(features)
        qkv = F.linear(features, *self._folded_first_projection()) if inference else None
        for i, layer in enumerate(self.layers):
            x = layer(x, qkv if i == 0 else None)
        return F.normalize(x, dim=-1)

    def _folded_first_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FC2 followed by the first layer's q/k/v projection is one affine map from the node features
        (2L+1 -> 3 x width instead of width -> 3 x width): a third of that projection's work, exact up to
        rounding. Recomputed whenever the weights change."""
        attention = self.layers[0].attention
        sources = (attention.in_proj_weight, attention.in_proj_bias, self.fc2.weight, self.fc2.bias)
        if self.folded_weight is None or self._fold_key != _versions(*sources):
            self.folded_weight = attention.in_proj_weight @ self.fc2.weight
            self.folded_bias = attention.in_proj_weight @ self.fc2.bias + attention.in_proj_bias
            self._fold_key = _versions(*sources)
        return self.folded_weight, self.folded_bias

    def _check_dim(self, dim: int) -> None:
        if dim != self.config.dim:
            raise ValueError(f"the {self.config.variant} model expects {self.config.dim}-D descriptors (its `dim`), "
                             f"got {dim}-D")

    def score(self, inputs: RerankInputs) -> torch.Tensor:
        self._check_dim(inputs.query.shape[1])
        if self.config.variant == "fc":
            nodes = self.embed_nodes(inputs.query, inputs.candidates, inputs.ids)
            return torch.einsum("bd,bkd->bk", nodes[:, 0], nodes[:, 1:])
        refined = self.refine(inputs)
        return torch.einsum("bd,bkd->bk", refined[:, 0], refined[:, 1:])


class GnnReranker(LearnedReranker):
    name = variant = "gnn"


class FcReranker(LearnedReranker):
    name = variant = "fc"


class CsaReranker(LearnedReranker):
    name = variant = "csa"


RERANKER_FORMAT = "vpr_rerank_ros.reranker"


def save_reranker(model: LearnedReranker, path: str | Path) -> Path:
    """Write `<stem>.safetensors` (weights) and `<stem>.json` (config)."""
    return write_checkpoint(path, model.state_dict(), RERANKER_FORMAT, asdict(model.config))


def load_reranker_config(path: str | Path) -> GnnConfig:
    return dataclass_from(GnnConfig, read_config(path, RERANKER_FORMAT), str(path))


def load_reranker(path: str | Path) -> LearnedReranker:
    """A learned re-ranker from its checkpoint, whatever its variant."""
    classes = {cls.variant: cls for cls in (GnnReranker, FcReranker, CsaReranker)}
    return classes[load_reranker_config(path).variant](weights=path)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_summary(model: LearnedReranker) -> str:
    """'9.38 M parameters (FC1 2.10 M)'."""
    total = parameter_count(model) - (parameter_count(model.head) if hasattr(model, "head") else 0)
    fc1 = parameter_count(model.fc1) if model.fc1 is not None else 0
    return f"{total / 1e6:.2f} M parameters (FC1 {fc1 / 1e6:.2f} M)"
