"""Training the learned re-rankers (thesis 3.3, method.md §5): the quantized average-precision loss,
per-query candidate sets drawn from a city's map, and the epoch loop with per-epoch checkpoints chosen by
validation mAP@10. The two-step schedule (FC1 alone, then the GNN with FC1 frozen) is `vpr-train`'s."""
from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .datasets.msls import MslsSide
from .evaluation import RetrievalRun, evaluate_queries, rerank_run
from .geo import fov_overlap, latlon_to_utm, meridian_convergence_deg
from .mapdb import MapBundle
from .rerank.learned import LearnedReranker, save_reranker


# The thesis's two steps (3.3): FC1 alone on its L2-normalised output with K = 255 for 10 epochs, then FC1
# frozen and the GNN trained with K = 319, L = 127 for 5; Adam, lr 1e-4 x 0.9 per epoch, batch 32. `bins` is
# not given in the thesis. `vpr-train --config` overrides any of these.
THESIS_SCHEDULE = {
    "lr": 1e-4, "lr_decay": 0.9, "batch_size": 32, "bins": 20, "seed": 0,
    "min_overlap": 1 / 3,          # a candidate is relevant when its FoV overlap with the query exceeds this
    "fc": {"epochs": 10, "K": 255},
    "gnn": {"epochs": 5, "K": 319, "model": {"L": 127, "layers": 1, "positional": True}},
}


def quantized_ap(scores: torch.Tensor, relevant: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """(B,) quantized average precision AP_Q (thesis eq. 2.27-2.33) of (B, K) cosine scores against (B, K)
    relevance labels: similarities are soft-assigned to `bins` triangular bins centred on 1, 1 - Δ, ..., -1
    (Δ = 2 / (bins - 1)); precision and incremental recall are taken per bin, from the most similar down.
    Rows without a relevant candidate have no AP: NaN."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    delta = 2.0 / (bins - 1)
    centres = 1.0 - delta * torch.arange(bins, device=scores.device, dtype=scores.dtype)
    soft = (1.0 - (scores.unsqueeze(1) - centres[:, None]).abs() / delta).clamp_min(0.0)   # (B, bins, K)
    labels = relevant.to(scores.dtype)
    hits = torch.einsum("bnk,bk->bn", soft, labels)                                        # Λ_n(s)ᵀ y
    precision = hits.cumsum(1) / soft.sum(2).cumsum(1).clamp_min(1e-12)
    return (precision * hits).sum(1) / labels.sum(1)


@dataclass
class CandidateSet:
    """One city's queries for training or validation: retrieval on its map, and which candidates are
    relevant (FoV overlap with the query above a threshold, the thesis's training label)."""

    bundle: MapBundle
    run: RetrievalRun          # query descriptors, top-K map ids, 25 m positives for mAP
    relevant: np.ndarray       # (Q, K) bool

    @property
    def trainable(self) -> np.ndarray:
        """Query rows with at least one relevant candidate (the others have no AP to learn from)."""
        return np.flatnonzero(self.relevant.any(1))


def candidate_set(bundle: MapBundle, query: MslsSide, k: int, descriptors: np.ndarray | None = None,
                  model=None, min_overlap: float = 1 / 3, device: str | None = None) -> CandidateSet:
    """Retrieve the top `k` map images for each query (describing them with `model` unless `descriptors`
    are given) and label each candidate by its FoV overlap with the query's true pose."""
    if not query.has_positions:
        raise ValueError(f"{query.city}/{query.side}: queries without positions cannot be labelled")
    run = evaluate_queries(bundle, model, query, k=k, descriptors=descriptors, device=device)
    if (run.result.ids < 0).any():
        raise ValueError(f"{query.city}: the map {bundle.root} has fewer than K = {k} images to retrieve")
    q = run.query
    zone = bundle.table.zone
    east, north, _ = latlon_to_utm(q.lat, q.lon, zone)
    heading = np.mod(q.heading - meridian_convergence_deg(q.lat, q.lon, zone), 360.0)
    query_poses = np.stack([east, north, heading], axis=1)
    graph = bundle.overlap
    overlap = fov_overlap(query_poses[:, None], bundle.table.poses[run.result.ids], graph.radius, graph.fov_deg)
    return CandidateSet(bundle, run, overlap > min_overlap)


@dataclass(frozen=True)
class TrainSettings:
    """One training step: `epochs` passes over the training queries, their top `K` candidates each."""

    epochs: int
    K: int
    lr: float = 1e-4
    lr_decay: float = 0.9          # learning rate multiplied by this after every epoch
    batch_size: int = 32
    bins: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.K < 2 or self.batch_size < 1 or not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"need epochs >= 1, K >= 2, batch_size >= 1, lr > 0, 0 < lr_decay <= 1: {self}")


def _batch(data: CandidateSet, rows: np.ndarray, K: int, model: LearnedReranker, device: str):
    """Tensors for `rows` of a candidate set: query, candidates, poses, overlaps, labels. No map ids: the
    model's FC1 cache belongs to whichever map it was last attached to, not necessarily this city's."""
    bundle, ids = data.bundle, data.run.result.ids[rows, :K]
    query = torch.from_numpy(np.ascontiguousarray(data.run.descriptors[rows], np.float32)).to(device)
    candidates = torch.from_numpy(np.asarray(bundle.descriptors[ids.reshape(-1)], np.float32))
    poses = overlaps = None
    if model.uses_geometry:
        poses = torch.from_numpy(bundle.table.poses[ids]).to(device)
        overlaps = torch.from_numpy(np.stack([bundle.overlap.lookup(r, r) for r in ids])).to(device)
    labels = torch.from_numpy(data.relevant[rows, :K]).to(device)
    return query, candidates.reshape(*ids.shape, -1).to(device), poses, overlaps, labels


def validation_map10(model: LearnedReranker, sets: list[CandidateSet], K: int, device: str) -> float:
    """mAP@10 over the queries of `sets` (each weighted by its query count) after re-ranking the top K."""
    total = weight = 0.0
    for data in sets:
        result = data.run.result
        run = replace(data.run, result=replace(result, ids=result.ids[:, :K], scores=result.scores[:, :K]))
        _, metrics = rerank_run(data.bundle, run, model.eval(), device=device)
        total += metrics["map@10"] * metrics["queries"]
        weight += metrics["queries"]
    return total / weight if weight else float("nan")


def train(model: LearnedReranker, train_sets: list[CandidateSet], val_sets: list[CandidateSet],
          settings: TrainSettings, out: str | Path, device: str = "cpu",
          log: Callable[[str], None] = print) -> Path:
    """Train the parameters of `model` that require gradients with Adam and the quantized-AP loss
    (1 - AP_Q, averaged over the batch's queries); after every epoch write `epoch_NN.safetensors` and score
    it on `val_sets` (mAP@10); copy the best epoch to `best.safetensors` and return its path. A `log.csv`
    records loss, learning rate, validation mAP@10 and time per epoch."""
    if not train_sets or not val_sets:
        raise ValueError("training needs at least one training and one validation candidate set")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters")
    for data in train_sets + val_sets:
        if data.run.result.ids.shape[1] < settings.K:
            raise ValueError(f"candidate sets hold {data.run.result.ids.shape[1]} candidates, the step needs K = "
                             f"{settings.K}")
    model.to(device)
    optimiser = torch.optim.Adam(parameters, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=settings.lr_decay)
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    best, best_map, rows_log = None, -1.0, []
    for epoch in range(1, settings.epochs + 1):
        start, losses = time.monotonic(), []
        model.train()
        batches = [(i, chunk) for i, data in enumerate(train_sets)
                   for chunk in np.array_split(rng.permutation(data.trainable),
                                               max(1, -(-len(data.trainable) // settings.batch_size)))
                   if len(chunk)]
        for i in rng.permutation(len(batches)):
            index, rows = batches[i]
            query, candidates, poses, overlaps, labels = _batch(train_sets[index], np.sort(rows), settings.K,
                                                                model, device)
            scores = model(query, candidates, poses, overlaps)
            loss = 1.0 - quantized_ap(scores, labels, settings.bins).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        lr = optimiser.param_groups[0]["lr"]
        schedule.step()
        path = save_reranker(model, out / f"epoch_{epoch:02d}.safetensors")
        score = validation_map10(model, val_sets, settings.K, device)
        row = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "lr": lr,
               "val_map@10": score, "seconds": time.monotonic() - start}
        rows_log.append(row)
        log(f"epoch {epoch}/{settings.epochs}: loss {row['loss']:.4f}, lr {lr:.3g}, val mAP@10 {100 * score:.2f}, "
            f"{row['seconds']:.0f} s")
        if score > best_map:
            best, best_map = path, score
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_log[0]))
        writer.writeheader()
        writer.writerows(rows_log)
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(best.with_suffix(suffix), out / f"best{suffix}")
    log(f"best: {best.name} (val mAP@10 {100 * best_map:.2f}) -> {out / 'best.safetensors'}")
    return out / "best.safetensors"
