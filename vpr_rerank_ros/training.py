"""Training the learned re-rankers (docs/training.md): the quantized average-precision loss, per-query
candidate sets drawn from a city's map, the epoch loop with per-epoch checkpoints chosen by validation
mAP@10, and the thesis's two-step schedule (FC1 alone, then the GNN with FC1 frozen)."""
from __future__ import annotations

import csv
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import distributed
from .datasets.msls import MslsSide, load_side
from .evaluation import RetrievalRun, evaluate_queries, rerank_run
from .geo import fov_overlap
from .mapdb import MapBundle
from .metrics import retrieval_metrics
from .rerank import LearnedReranker, build_reranker, load_reranker, rerank_inputs, save_reranker
from .rerank.learned import count_summary

STEPS = ("fc", "gnn")


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


def ap_loss(scores: torch.Tensor, relevant: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """1 - AP_Q averaged over the rows that have a relevant candidate; rows without one are masked out (their
    AP is 0/0), so they can neither poison the loss with NaN nor count as solved."""
    has_relevant = relevant.any(1)
    if not has_relevant.any():
        raise ValueError("no row of the batch has a relevant candidate")
    return 1.0 - quantized_ap(scores[has_relevant], relevant[has_relevant], bins).mean()


@dataclass
class CandidateSet:
    """One city's queries for training or validation: retrieval on its map, and which candidates are
    relevant (FoV overlap with the query above a threshold, the thesis's training label)."""

    bundle: MapBundle
    run: RetrievalRun          # query descriptors and true poses, top-K map ids, 25 m positives for mAP
    relevant: np.ndarray       # (Q, K) bool

    def trainable(self, k: int) -> np.ndarray:
        """Query rows with a relevant candidate among their first `k` (the others have no AP to learn from)."""
        return np.flatnonzero(self.relevant[:, :k].any(1))


def candidate_set(bundle: MapBundle, query: MslsSide, k: int, descriptors: np.ndarray | None = None,
                  model=None, min_overlap: float = 1 / 3, device: str | None = None) -> CandidateSet:
    """Retrieve the top `k` map images for each query (describing them with `model` unless `descriptors`
    are given) and label each candidate by its FoV overlap with the query's true pose."""
    if not query.has_positions:
        raise ValueError(f"{query.city}/{query.side}: queries without positions cannot be labelled")
    run = evaluate_queries(bundle, model, query, k=k, descriptors=descriptors, device=device)
    if (run.result.ids < 0).any():
        raise ValueError(f"{query.city}: the map {bundle.root} has fewer than K = {k} images to retrieve")
    graph = bundle.overlap
    overlap = fov_overlap(run.query_poses[:, None], bundle.table.poses[run.result.ids], graph.radius, graph.fov_deg)
    return CandidateSet(bundle, run, overlap > min_overlap)


@dataclass(frozen=True)
class TrainSettings:
    """One training step: `epochs` passes over the training queries, their top `K` candidates each; Adam with
    the learning rate multiplied by `lr_decay` after every epoch; loss 1 - AP_Q over `bins` bins."""

    epochs: int
    K: int
    lr: float = 1e-4
    lr_decay: float = 0.9
    batch_size: int = 32
    bins: int = 20             # not given in the thesis: our choice
    seed: int = 0
    mixed_precision: bool = True   # bfloat16 autocast on CUDA (the loss in float32); no effect on the CPU

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.K < 2 or self.batch_size < 1 or not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"need epochs >= 1, K >= 2, batch_size >= 1, lr > 0, 0 < lr_decay <= 1: {self}")


SHARED_SETTINGS = ("lr", "lr_decay", "batch_size", "bins", "seed")   # schedule keys that apply to both steps


@dataclass(frozen=True)
class Schedule:
    """The thesis's two steps (3.3): FC1 alone with K = 255 for 10 epochs, then the GNN with FC1 frozen,
    K = 319, L = 127 for 5; both with TrainSettings' defaults. `gnn_model` holds the GNN's GnnConfig fields."""

    fc: TrainSettings = TrainSettings(epochs=10, K=255)
    gnn: TrainSettings = TrainSettings(epochs=5, K=319)
    gnn_model: dict = field(default_factory=lambda: {"L": 127, "layers": 1, "positional": True})
    min_overlap: float = 1 / 3   # a candidate is relevant when its FoV overlap with the query exceeds this

    @classmethod
    def from_overrides(cls, overrides: dict | None) -> "Schedule":
        """The default schedule with YAML-style overrides: {lr, lr_decay, batch_size, bins, seed (both steps),
        min_overlap, fc: {epochs, K, ...}, gnn: {epochs, K, ..., model: {GnnConfig fields}}}. Unknown keys are
        refused by name."""
        overrides = dict(overrides or {})
        default = cls()
        known = {*SHARED_SETTINGS, "min_overlap", *STEPS}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown schedule keys {unknown}; known: {sorted(known)}")
        shared = {k: overrides[k] for k in SHARED_SETTINGS if k in overrides}
        steps = {}
        for step in STEPS:
            section = dict(overrides.get(step) or {})
            model = section.pop("model", None) if step == "gnn" else None
            allowed = {f.name for f in fields(TrainSettings)}
            bad = sorted(set(section) - allowed)
            if bad:
                raise ValueError(f"unknown schedule keys {bad} in {step}; known: {sorted(allowed)} "
                                 f"{'and model' if step == 'gnn' else ''}".strip())
            steps[step] = replace(getattr(default, step), **shared, **section)
            if model is not None:
                steps["gnn_model"] = {**default.gnn_model, **model}
        return replace(default, **steps, min_overlap=overrides.get("min_overlap", default.min_overlap))


def _batch(data: CandidateSet, rows: np.ndarray, K: int, model: LearnedReranker, device: str):
    """The re-ranker's inputs and the relevance labels for `rows` of a candidate set. Without map ids: the
    model's FC1 cache belongs to whichever map it was last attached to, not necessarily this city's."""
    run = data.run
    inputs = rerank_inputs(data.bundle, run.descriptors[rows], run.result.ids[rows, :K], run.query_poses[rows, 2],
                           geometry=model.uses_geometry, device=device)
    return replace(inputs, ids=None), torch.from_numpy(data.relevant[rows, :K]).to(device)


def validation_map10(model: LearnedReranker, sets: list[CandidateSet], K: int, device: str) -> float:
    """mAP@10 over the queries of `sets` (each weighted by its query count) after re-ranking the top K."""
    total = weight = 0.0
    for data in sets:
        _, metrics = rerank_run(data.bundle, data.run.first(K), model.eval(), device=device)
        if metrics["queries"]:
            total += metrics["map@10"] * metrics["queries"]
            weight += metrics["queries"]
    if not weight:
        raise ValueError("no validation query has a positive among its candidates: validation cannot score "
                         "the model (check the validation cities' maps and K)")
    return total / weight


def retrieval_map10(sets: list[CandidateSet], K: int) -> float:
    """mAP@10 of the retrieval order itself (no re-ranking) over the queries of `sets`, weighted as
    `validation_map10`: the score a trained model has to beat."""
    total = weight = 0.0
    for data in sets:
        metrics = retrieval_metrics(data.run.result.ids[:, :K], data.run.positives, ks=(10,))
        total += metrics["map@10"] * metrics["queries"] if metrics["queries"] else 0.0
        weight += metrics["queries"]
    return total / weight if weight else float("nan")


def _check_finite(model: LearnedReranker, loss: torch.Tensor, epoch: int, batch: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"epoch {epoch}, batch {batch}: the loss is {loss.item()}")
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not torch.isfinite(parameter).all():
            raise FloatingPointError(f"epoch {epoch}, batch {batch}: parameter {name} is not finite")


def train(model: LearnedReranker, train_sets: list[CandidateSet], val_sets: list[CandidateSet],
          settings: TrainSettings, out: str | Path, device: str = "cpu",
          log: Callable[[str], None] = print, allow_worse: bool = False,
          workers: distributed.Workers | None = None) -> Path:
    """Train the parameters of `model` that require gradients with Adam and `ap_loss`; score the initial model
    and every epoch on `val_sets` (mAP@10), writing `epoch_NN.safetensors`; copy the best epoch to
    `best.safetensors` and return its path. `log.csv` records loss, learning rate, validation mAP@10 and
    time per epoch (epoch 0: the initial model). A non-finite loss or parameter stops training with an error
    naming the epoch and batch. When no epoch beats the retrieval order on validation, no `best` is written and
    a ValueError says so, unless `allow_worse`.

    After every epoch the loop's whole state goes atomically to `last.pt`: started again on the same `out` with
    the same settings, training resumes after the last complete epoch and ends with the weights of an
    uninterrupted run. Under torchrun (`workers`, default: from the environment) the model is wrapped in
    DistributedDataParallel and each rank takes its share of every batch, weighted so that the gradient is the
    whole batch's; rank 0 validates and writes."""
    workers = workers or distributed.workers(device)
    log = workers.quiet(log)
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
    if not any(len(data.trainable(settings.K)) for data in train_sets):
        raise ValueError(f"no training query has a relevant candidate among its top K = {settings.K}")
    model.to(device)
    optimiser = torch.optim.Adam(parameters, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=settings.lr_decay)
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    baseline = retrieval_map10(val_sets, settings.K)
    run_id = {"settings": asdict(settings), "model": asdict(model.config),
              "queries": [list(data.relevant.shape) for data in train_sets + val_sets]}
    net = _parallel(model, workers, device)          # before rank 0's validation fills its inference caches
    state = _read_state(out / STATE, run_id)
    if state is not None:
        _restore_state(state, model, optimiser, schedule, rng, device)
        rows_log = state["log"]
        log(f"resuming after epoch {len(rows_log) - 1}/{settings.epochs} from {out / STATE}")
    else:
        initial = workers.broadcast(validation_map10(model, val_sets, settings.K, device) if workers.main else None)
        rows_log = [{"epoch": 0, "loss": float("nan"), "lr": float("nan"), "val_map@10": initial, "seconds": 0.0}]
        log(f"epoch 0/{settings.epochs} (initial model): val mAP@10 {100 * initial:.2f} (retrieval order "
            f"{100 * baseline:.2f})")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=settings.mixed_precision and "cuda" in device)
    for epoch in range(len(rows_log), settings.epochs + 1):
        start, loss_sum = time.monotonic(), 0.0
        model.train()
        batches = [(i, chunk) for i, data in enumerate(train_sets)
                   for chunk in np.array_split(rng.permutation(data.trainable(settings.K)),
                                               max(1, -(-len(data.trainable(settings.K)) // settings.batch_size)))
                   if len(chunk)]
        for number, i in enumerate(rng.permutation(len(batches)), start=1):
            index, rows = batches[i]
            rows = np.sort(rows)
            mine = rows[workers.rank::workers.world]
            # ap_loss is this rank's mean; scaled by its share of the batch (x world, as DDP averages the
            # ranks' gradients) the step is that of the whole batch. A rank left without rows runs one with
            # weight 0 (DDP needs every rank's backward).
            weight = len(mine) * workers.world / len(rows)
            inputs, labels = _batch(train_sets[index], mine if len(mine) else rows[:1], settings.K, model, device)
            with autocast:
                scores = net(inputs)
            loss = ap_loss(scores.float(), labels, settings.bins) * weight
            _check_finite(model, loss, epoch, number)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            _check_finite(model, loss, epoch, number)
            loss_sum += loss.item()
        lr = optimiser.param_groups[0]["lr"]
        schedule.step()
        score = None
        if workers.main:
            save_reranker(model, out / f"epoch_{epoch:02d}.safetensors")
            score = validation_map10(model, val_sets, settings.K, device)
        score = workers.broadcast(score)
        row = {"epoch": epoch, "loss": workers.sum(loss_sum) / (workers.world * len(batches)), "lr": lr,
               "val_map@10": score, "seconds": time.monotonic() - start}
        rows_log.append(row)
        if workers.main:
            _write_state(out / STATE, run_id, model, optimiser, schedule, rng, device, rows_log)
        workers.barrier()
        log(f"epoch {epoch}/{settings.epochs}: loss {row['loss']:.4f}, lr {lr:.3g}, val mAP@10 {100 * score:.2f}, "
            f"{row['seconds']:.0f} s")
    if workers.main:
        _keep_best(out, rows_log, baseline, allow_worse, log)
    workers.barrier()                                 # the other ranks go on once best.safetensors is there
    return out / "best.safetensors"


def _keep_best(out: Path, rows_log: list[dict], baseline: float, allow_worse: bool,
               log: Callable[[str], None]) -> None:
    """Write log.csv and copy the best epoch (highest validation mAP@10, the first on ties; epoch 0 is not a
    candidate) to best.safetensors (atomically), unless it is worse than the retrieval order and that is not
    allowed."""
    _write_log(out / "log.csv", rows_log)
    scored = [row for row in rows_log[1:] if math.isfinite(row["val_map@10"])]
    if not scored:
        raise ValueError(f"no epoch has a finite validation mAP@10; best.safetensors not written (see {out / 'log.csv'})")
    chosen = max(scored, key=lambda row: row["val_map@10"])
    best, best_map = out / f"epoch_{chosen['epoch']:02d}.safetensors", chosen["val_map@10"]
    if best_map < baseline and not allow_worse:
        raise ValueError(f"no epoch beat the retrieval order on validation (best {best.name}: mAP@10 "
                         f"{100 * best_map:.2f} < {100 * baseline:.2f}); best.safetensors not written (the epochs "
                         f"are in {out}; allow_worse / --allow-worse keeps the best of them anyway)")
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(best.with_suffix(suffix), out / f"best{suffix}.partial")
        os.replace(out / f"best{suffix}.partial", out / f"best{suffix}")
    log(f"best: {best.name} (val mAP@10 {100 * best_map:.2f}, initial {100 * rows_log[0]['val_map@10']:.2f}) -> "
        f"{out / 'best.safetensors'}")


STATE = "last.pt"   # the epoch loop's state after its last complete epoch (see `train`)


def _parallel(model: LearnedReranker, workers: distributed.Workers, device: str) -> torch.nn.Module:
    """`model` itself for one process, else wrapped in DistributedDataParallel (no buffers to broadcast: the
    learned re-rankers' buffers are inference caches)."""
    if workers.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    cuda = torch.device(device).type == "cuda"
    return DistributedDataParallel(model, device_ids=[torch.device(device).index] if cuda else None,
                                   forward_sync_buffers=False,
                                   find_unused_parameters=model.config.variant == "csa")  # its head: CSA loss only


def _write_state(path: Path, run_id: dict, model, optimiser, schedule, rng, device: str, rows_log: list) -> None:
    """Everything the loop needs to continue, written to a temporary file and renamed over `path`: a kill
    leaves either the previous epoch's state or this one's, never half of one."""
    state = {"run": run_id, "model": model.state_dict(),
             "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
             "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
             "log": rows_log}
    if torch.device(device).type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _restore_state(state: dict, model, optimiser, schedule, rng, device: str) -> None:
    """Put back what `_write_state` saved: weights, optimiser, schedule and random generators."""
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    schedule.load_state_dict(state["schedule"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _read_state(path: Path, run_id: dict) -> dict | None:
    """The state of an interrupted run of the same training in `path`, or None when there is none."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file torch cannot read: say which, do not guess
        raise ValueError(f"{path}: cannot read the training state ({exc}); delete it to start afresh") from exc
    if state.get("run") != run_id:
        raise ValueError(f"{path}: the state of a training with other settings, model or data; use another output "
                         f"folder (or delete {path.name} to start afresh)")
    return state


def _write_log(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def load_candidate_sets(msls_root: str | Path, cities: Sequence[tuple[str, str | Path]], k: int,
                        min_overlap: float = 1 / 3, model_weights: str | Path | None = None,
                        descriptor_file: str | Path | None = None, device: str | None = None,
                        log: Callable[[str], None] = print) -> list[CandidateSet]:
    """A candidate set per (city, map directory): the city's queries described with the map's model (or
    `model_weights`, or read from `descriptor_file`), their top `k` candidates, FoV labels."""
    from .descriptors.extract import read_descriptors
    from .mapbuild import map_model

    sets = []
    for city, path in cities:
        bundle = MapBundle.load(path)
        query = load_side(msls_root, city, "query")
        descriptors = model = None
        if descriptor_file is not None:
            descriptors, identity = read_descriptors(descriptor_file, list(query.keys))
            bundle.check_descriptors(descriptors, identity, str(descriptor_file))
        else:
            model = map_model(bundle, model_weights)
        data = candidate_set(bundle, query, k, descriptors, model, min_overlap, device)
        log(f"{city}: {len(data.run.query)} queries, {len(data.trainable(k))} with a relevant candidate among the "
            f"top {k}")
        sets.append(data)
    return sets


def train_schedule(train_sets: list[CandidateSet], val_sets: list[CandidateSet], schedule: Schedule,
                   out: str | Path, steps: Sequence[str] = STEPS, fc_weights: str | Path | None = None,
                   device: str = "cpu", log: Callable[[str], None] = print,
                   allow_worse: bool = False) -> dict[str, Path]:
    """The two steps into `out/fc` and `out/gnn`: FC1 alone (the `fc` re-ranker), then the GNN with that FC1
    copied in and frozen (from `fc_weights` when step 1 is not run). All maps must share one descriptor model
    (a re-ranker learns one descriptor space). Returns each step's best checkpoint."""
    steps = tuple(steps)
    if steps not in (("fc",), ("gnn",), STEPS):
        raise ValueError(f"steps must be fc, gnn or fc,gnn, got {','.join(steps)}")
    if steps == ("gnn",) and fc_weights is None:
        raise ValueError("the gnn step alone needs the FC1 weights of step 1 (fc_weights)")
    if len({data.bundle.meta.descriptor.identity or data.bundle.dim for data in train_sets + val_sets}) > 1:
        raise ValueError("the maps were built with different descriptor models: build them all with the same "
                         "--model (a re-ranker learns one descriptor space)")
    out, best = Path(out), {}
    if "fc" in steps:
        fc = initial_fc(train_sets, schedule.gnn_model.get("hidden", 512))
        log(f"step 1, fc: {count_summary(fc)}, FC1 from the training maps' principal directions")
        best["fc"] = fc_weights = train(fc, train_sets, val_sets, schedule.fc, out / "fc", device, log,
                                          allow_worse)
    if "gnn" in steps:
        best["gnn"] = train_gnn(fc_weights, train_sets, val_sets, schedule.gnn, schedule.gnn_model, out / "gnn",
                                device, log, allow_worse)
    return best


def initial_fc(train_sets: list[CandidateSet], hidden: int = 512, sample: int = 100_000) -> LearnedReranker:
    """The `fc` model before step 1: FC1 projects onto the `hidden` leading principal directions (uncentred,
    as cosine retrieval sees them) of up to `sample` of the training maps' descriptors, without bias. Training
    then starts near the retrieval's own geometry; from a random projection it started far below it and, on
    the synthetic study, never caught up (docs/training.md)."""
    dim = train_sets[0].bundle.dim
    moment, count = np.zeros((dim, dim)), 0
    for data in train_sets:
        descriptors = data.bundle.descriptors
        step = max(1, -(-len(train_sets) * len(descriptors) // sample))
        rows = np.asarray(descriptors[::step], np.float64)
        moment += rows.T @ rows
        count += len(rows)
    _, vectors = np.linalg.eigh(moment / max(count, 1))                # ascending eigenvalues
    leading = vectors[:, ::-1][:, :hidden].T
    # An eigenvector's sign is arbitrary (LAPACK's choice varies with threads and machines): make each one's
    # largest component positive, so that every process and machine starts from the same FC1.
    leading = leading * np.sign(leading[np.arange(len(leading)), np.abs(leading).argmax(1)])[:, None]
    weight = np.zeros((hidden, dim))
    weight[:len(leading)] = leading                                     # rows beyond dim (hidden > dim) stay 0
    fc = build_reranker("fc", dim=dim, hidden=hidden)
    with torch.no_grad():
        fc.fc1.weight.copy_(torch.from_numpy(weight))
        fc.fc1.bias.zero_()
    return fc


def train_gnn(fc_weights: str | Path, train_sets: list[CandidateSet], val_sets: list[CandidateSet],
              settings: TrainSettings, model_params: dict, out: str | Path, device: str = "cpu",
              log: Callable[[str], None] = print, allow_worse: bool = False) -> Path:
    """Step 2: a GNN (`model_params`: GnnConfig fields) with the FC1 of the step-1 checkpoint `fc_weights`
    copied in and frozen, trained by `train`; returns its best checkpoint."""
    fc = load_reranker(fc_weights)
    torch.manual_seed(settings.seed)
    gnn = build_reranker("gnn", **{"dim": fc.config.dim, "hidden": fc.config.hidden, "K": settings.K, **model_params})
    gnn.fc1.load_state_dict(fc.fc1.state_dict())
    gnn.fc1.requires_grad_(False)
    log(f"step 2, gnn: {count_summary(gnn)}, FC1 frozen from {fc_weights}")
    return train(gnn, train_sets, val_sets, settings, out, device, log, allow_worse)


def required_k(schedule: Schedule, steps: Sequence[str] = STEPS) -> int:
    """Candidates to retrieve per query so that every step of `steps` has its K."""
    return max(getattr(schedule, step).K for step in steps)
