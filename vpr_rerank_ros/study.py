"""The training study (`vpr-study --seed S --out DIR`): does the learned re-ranker help on cities it never saw?

From nothing and reproducibly: a seeded synthetic town of several cities (training, validation and held-out
test cities), ONE descriptor model fitted on the first training city's database and used for every map (a
GNN's FC1 is meaningless across maps described by different models), the thesis's two training steps for
each learned row, and every re-ranker scored on the test cities. Writes `results.csv` / `results.md` (one
row per re-ranker, metrics over all test queries), the training logs and `training.png` (loss and
validation mAP@10 per epoch). Each stage is skipped when its output exists, so an interrupted study resumes.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .datasets import geotagged
from .datasets.msls import load_side
from .datasets.synth_town import SynthConfig, generate
from .datasets.town import TownConfig
from .descriptors.model import load_native, save_model
from .descriptors.offline import OFFLINE_BLOCK, fit_offline_model, offline_config
from .evaluation import Comparison, compare_rerankers, evaluate_queries
from .mapbuild import build_map
from .mapdb import MapBundle
from .metrics import RESULT_COLUMNS, ks_up_to, retrieval_metrics
from .rerank import COMPARED
from .rerank.learned import count_summary
from .training import CandidateSet, TrainSettings, candidate_set, initial_fc, train, train_gnn

# The learned rows: name -> GnnConfig fields of the step-2 model (fc is step 1 itself).
LEARNED = {"gnn": {"positional": False}, "gnn+pa": {"positional": True},
           "gnn+pa+heading": {"positional": True, "heading": True}}


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of the study, chosen for a 2-core CPU (the thesis's: K = 319 / 255, L = 127, width 768, 12 heads,
    MLP 3072, lr 1e-4; see docs/training.md)."""

    train_cities: int = 2
    val_cities: int = 1
    test_cities: int = 2
    town: SynthConfig = field(default_factory=lambda: SynthConfig(
        town=TownConfig(blocks_x=5, blocks_y=4), width=320, height=240, query_sequences=40, query_frames=30))
    K: int = 100                    # candidates re-ranked, in training and at test time
    L: int = 50                     # anchors of the GNN
    width: int = 384
    heads: int = 8
    mlp: int = 1536
    fc_epochs: int = 8
    gnn_epochs: int = 12
    lr: float = 3e-4
    batch_size: int = 32
    workers: int = 2                # rendering processes
    descriptor_block: int = OFFLINE_BLOCK   # EfficientNet-Lite0 block of the offline descriptor (15 before 2026-11-30)

    @property
    def cities(self) -> int:
        return self.train_cities + self.val_cities + self.test_cities

    def split(self) -> tuple[list[str], list[str], list[str]]:
        names = [f"synth{i}" for i in range(self.cities)]
        a, b = self.train_cities, self.train_cities + self.val_cities
        return names[:a], names[a:b], names[b:]


def run_study(seed: int, out: str | Path, config: StudyConfig = StudyConfig(),
              log: Callable[[str], None] = print) -> Path:
    """The whole study into `out`; returns the path of results.csv."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = json.dumps({"seed": seed, **asdict(config)}, indent=2, default=str) + "\n"
    if (out / "config.json").exists() and (out / "config.json").read_text() != settings:
        raise ValueError(f"{out} holds a study with other settings (its config.json): resume it with those, or "
                         "give another --out")
    (out / "config.json").write_text(settings)
    timings: dict[str, float] = {}
    train_names, val_names, test_names = config.split()

    def stage(name: str, work: Callable):
        start = time.monotonic()
        result = work()
        timings[name] = time.monotonic() - start
        log(f"{name}: {timings[name]:.0f} s")
        return result

    town = out / "town"
    if not (town / "synth_town.json").exists():
        stage("generate town", lambda: generate(town, config.cities, seed, config.town, config.workers, True))
    model = stage("fit descriptor", lambda: _descriptor(out, town, train_names[0], config.descriptor_block))
    maps = stage("build maps", lambda: {city: _map(out, town, city, model)
                                        for city in train_names + val_names + test_names})
    sets = stage("retrieve and label", lambda: {city: candidate_set(maps[city], load_side(town, city, "query"),
                                                                    config.K, model=model)
                                                for city in train_names + val_names})
    train_sets, val_sets = [sets[c] for c in train_names], [sets[c] for c in val_names]
    weights = stage("train", lambda: _train_all(out / "runs", train_sets, val_sets, config, seed, log))
    rows = stage("evaluate", lambda: _evaluate(maps, town, test_names, model, weights, config.K, log))
    _plot(out / "runs", out / "training.png")
    path = _write(out, rows, seed, config, timings)
    log(f"results: {path}")
    return path


def _descriptor(out: Path, town: Path, city: str, block: int):
    """The one descriptor model of the study, fitted on `city`'s database images (kept in out/)."""
    path = out / "descriptor.safetensors"
    if path.exists():
        return load_native(path)
    fit = fit_offline_model(geotagged.from_msls(town, [city]).items, offline_config(backbone_block=block),
                            progress=True)
    save_model(fit.model, path)
    return fit.model


def _map(out: Path, town: Path, city: str, model) -> MapBundle:
    path = out / "maps" / city
    if (path / "map.json").exists():
        bundle = MapBundle.load(path, verify=False)
        bundle.check_model(model)
        return bundle
    return build_map(path, geotagged.from_msls(town, [city]), model, progress=True).bundle


def _train_all(runs: Path, train_sets: list[CandidateSet], val_sets: list[CandidateSet], config: StudyConfig,
               seed: int, log) -> dict[str, Path]:
    """Step 1 (fc), then each LEARNED row's step 2 on that FC1; a row already trained is kept."""
    common = {"K": config.K, "lr": config.lr, "batch_size": config.batch_size, "seed": seed}
    weights = {"fc": runs / "fc" / "best.safetensors"}
    if not weights["fc"].exists():
        fc = initial_fc(train_sets)
        log(f"fc: {count_summary(fc)}")
        train(fc, train_sets, val_sets, TrainSettings(epochs=config.fc_epochs, **common), runs / "fc", log=log,
              allow_worse=True)
    model = {"L": config.L, "width": config.width, "heads": config.heads, "mlp": config.mlp, "layers": 1}
    for name, params in LEARNED.items():
        weights[name] = runs / name / "best.safetensors"
        if not weights[name].exists():
            log(f"{name}:")
            train_gnn(weights["fc"], train_sets, val_sets, TrainSettings(epochs=config.gnn_epochs, **common),
                      {**model, **params}, runs / name, log=log, allow_worse=True)
    return weights


def _evaluate(maps: dict, town: Path, cities: list[str], model, weights: dict, k: int, log) -> list[Comparison]:
    """Every row on every test city; metrics pooled over all test queries (each query weighs the same)."""
    specs = [*COMPARED, *(("fc" if name == "fc" else "gnn", {"weights": str(path)}) for name, path in weights.items())]
    labels = [name for name, _ in COMPARED] + list(weights)
    ranked, positives = {label: [] for label in labels}, []
    starts = dict(zip(maps, np.cumsum([0] + [len(bundle) for bundle in maps.values()])))
    for city in cities:
        run = evaluate_queries(maps[city], model, load_side(town, city, "query"), k=k)
        offset = starts[city]                                       # map rows made unique across cities
        for label, row in zip(labels, compare_rerankers(maps[city], run, specs, log=log, warn=log)):
            ranked[label].append(row.ranked + offset)
        positives += [p + offset for p in run.positives]
        log(f"{city}: {run.metrics['queries']} test queries with positives")
    return [Comparison(label, {}, np.concatenate(ranked[label]),
                       retrieval_metrics(np.concatenate(ranked[label]), positives, ks=ks_up_to(k)))
            for label in labels]


def _write(out: Path, rows: list[Comparison], seed: int, config: StudyConfig, timings: dict) -> Path:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["reranker", *RESULT_COLUMNS])
        for row in rows:
            writer.writerow([row.name, *(f"{row.metrics[c]:.6f}" for c in RESULT_COLUMNS)])
    none = next(r for r in rows if r.name == "none").metrics["map@10"]
    lines = [f"# Training study, seed {seed}", "",
             f"Held-out test cities: {', '.join(config.split()[2])} ({rows[0].metrics['queries']} queries with "
             f"positives); K = {config.K}, L = {config.L}, GNN width {config.width}, {config.heads} heads, MLP "
             f"{config.mlp}; fc {config.fc_epochs} epochs, GNN {config.gnn_epochs} epochs, lr {config.lr:g}.", "",
             "| re-ranker | " + " | ".join(RESULT_COLUMNS) + " | mAP@10 / none |",
             "|---" * (len(RESULT_COLUMNS) + 2) + "|"]
    for row in rows:
        lines.append(f"| {row.name} | " + " | ".join(f"{100 * row.metrics[c]:.2f}" for c in RESULT_COLUMNS) +
                     f" | {row.metrics['map@10'] / none:.2f} |")
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return out / "results.csv"


def _plot(runs: Path, path: Path) -> None:
    """Loss and validation mAP@10 per epoch of every learned row (epoch 0: the initial model)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, map_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for log_file in sorted(runs.glob("*/log.csv")):
        rows = list(csv.DictReader(open(log_file)))
        epochs = [int(r["epoch"]) for r in rows]
        loss_axis.plot(epochs[1:], [float(r["loss"]) for r in rows[1:]], marker="o", label=log_file.parent.name)
        map_axis.plot(epochs, [100 * float(r["val_map@10"]) for r in rows], marker="o", label=log_file.parent.name)
    for axis in (loss_axis, map_axis):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    loss_axis.set(xlabel="epoch", ylabel="training loss (1 - AP_Q)", title="loss")
    map_axis.set(xlabel="epoch", ylabel="validation mAP@10 (%)", title="validation")
    map_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
