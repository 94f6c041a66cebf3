"""Training: the quantized-AP loss against the thesis's equations, FoV relevance labels, the epoch loop's
checkpoints and choice, and vpr-train's two steps on the synthetic town."""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vpr_rerank_ros.cli import train_main
from vpr_rerank_ros.datasets.msls import load_side
from vpr_rerank_ros.evaluation import RetrievalRun
from vpr_rerank_ros.geo import UtmZone, fov_overlap, latlon_to_utm, meridian_convergence_deg
from vpr_rerank_ros.mapbuild import map_model
from vpr_rerank_ros.mapdb import MapBundle, MapTable, SearchResult
from vpr_rerank_ros.metrics import retrieval_metrics
from vpr_rerank_ros.rerank import build_reranker, load_reranker
from vpr_rerank_ros.training import (CandidateSet, Schedule, TrainSettings, ap_loss, candidate_set, quantized_ap,
                                     train, validation_map10)


def quantized_ap_reference(scores, labels, bins):
    """Eq. 2.27-2.33 literally: triangle kernels, binned precision over the first k bins, binned recall step."""
    delta = 2.0 / (bins - 1)
    centres = [1.0 - i * delta for i in range(bins)]
    kernel = [[max(1.0 - abs(s - b) / delta, 0.0) for s in scores] for b in centres]
    n = sum(labels)
    ap = 0.0
    for k in range(bins):
        hits = sum(kernel[i][j] * labels[j] for i in range(k + 1) for j in range(len(scores)))
        mass = sum(kernel[i][j] for i in range(k + 1) for j in range(len(scores)))
        precision = hits / mass if mass > 0 else 0.0
        recall_step = sum(kernel[k][j] * labels[j] for j in range(len(scores))) / n
        ap += precision * recall_step
    return ap


def exact_ap(scores, labels):
    order = np.argsort(-np.asarray(scores), kind="stable")
    y = np.asarray(labels)[order]
    return float(sum(y[i] * y[:i + 1].mean() for i in range(len(y))) / y.sum())


def test_quantized_ap_follows_the_equations():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 30, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.rand(4, 30, generator=g) < 0.3
    for bins in (5, 20):
        got = quantized_ap(scores, labels, bins)
        for b in range(4):
            assert got[b].item() == pytest.approx(quantized_ap_reference(scores[b].tolist(), labels[b].tolist(), bins),
                                                  abs=1e-9)
    # With fine bins it approaches the exact AP of the ranking; well separated scores give 1.
    fine = quantized_ap(scores, labels, 2001)
    for b in range(4):
        assert fine[b].item() == pytest.approx(exact_ap(scores[b].numpy(), labels[b].numpy()), abs=0.02)
    separated = torch.tensor([[0.9, -0.5, 0.8, -0.6]])
    assert quantized_ap(separated, torch.tensor([[True, False, True, False]])).item() == pytest.approx(1.0)
    assert quantized_ap(separated, torch.tensor([[False, True, False, True]])).item() < 0.6
    assert math.isnan(quantized_ap(separated, torch.zeros(1, 4, dtype=torch.bool)).item())   # nothing relevant
    with pytest.raises(ValueError, match="bins"):
        quantized_ap(separated, separated > 0, bins=1)


def test_quantized_ap_has_gradients_towards_the_relevant():
    scores = torch.tensor([[0.1, 0.14, -0.5]], requires_grad=True)   # an irrelevant one in the relevant's bins
    (1 - quantized_ap(scores, torch.tensor([[True, False, False]]))).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[0, 0] < 0 and scores.grad[0, 1] > 0          # raise the relevant, lower the other
    assert scores.grad[0, 2] == 0                                   # bins away from any relevant: no say


@pytest.fixture(scope="module")
def town_sets(synthetic_map):
    root, report = synthetic_map
    bundle = report.bundle
    query = load_side(root / "msls", "synth0", "query")
    return candidate_set(bundle, query, 40, model=map_model(bundle)), root, bundle


def test_candidates_are_labelled_by_fov_overlap_with_the_query(town_sets):
    data, _, bundle = town_sets
    q = data.run.query
    east, north, _ = latlon_to_utm(q.lat, q.lon, bundle.table.zone)
    heading = q.heading - meridian_convergence_deg(q.lat, q.lon, bundle.table.zone)
    for i in (0, 7, 31):
        overlap = fov_overlap(np.array([east[i], north[i], heading[i]]), bundle.table.poses[data.run.result.ids[i]])
        assert np.array_equal(data.relevant[i], overlap > 1 / 3)
    assert data.relevant.shape == (32, 40) and 0 < data.relevant.mean() < 1
    assert len(data.trainable(40)) == int(data.relevant.any(1).sum()) > 16
    assert set(data.trainable(5)) == set(np.flatnonzero(data.relevant[:, :5].any(1)))
    assert np.array_equal(data.run.query_poses[:, 2] % 360, heading % 360)      # the queries' grid headings


def test_rows_without_a_relevant_candidate_are_masked_not_nan():
    scores = torch.tensor([[0.9, 0.1, -0.2], [0.5, 0.4, 0.3]], requires_grad=True)
    relevant = torch.tensor([[True, False, False], [False, False, False]])
    loss = ap_loss(scores, relevant)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1 - quantized_ap(scores[:1], relevant[:1]).item())
    assert torch.isfinite(scores.grad).all() and (scores.grad[1] == 0).all()
    with pytest.raises(ValueError, match="no row of the batch"):
        ap_loss(scores, torch.zeros_like(relevant))


def test_train_writes_every_epoch_and_keeps_the_best(town_sets, tmp_path):
    data, _, bundle = town_sets
    model = build_reranker("gnn", dim=bundle.dim, K=40, L=20, width=48, heads=4, mlp=96)
    settings = TrainSettings(epochs=3, K=40, lr=1e-3, batch_size=8)
    lines = []
    with pytest.raises(ValueError, match="no epoch beat the retrieval order on validation"):
        train(model, [data], [data], settings, tmp_path / "refused", log=lambda _: None)
    assert not (tmp_path / "refused" / "best.safetensors").exists()
    model = build_reranker("gnn", dim=bundle.dim, K=40, L=20, width=48, heads=4, mlp=96)   # a tiny model that
    best = train(model, [data], [data], settings, tmp_path, log=lines.append, allow_worse=True)   # cannot win
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == \
        ["best.safetensors", "epoch_01.safetensors", "epoch_02.safetensors", "epoch_03.safetensors"]
    log = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["epoch"]) for r in log] == [0, 1, 2, 3]                 # epoch 0: the initial model
    assert lines[0].startswith("epoch 0/3 (initial model): val mAP@10") and "retrieval order" in lines[0]
    assert [float(r["lr"]) for r in log[1:]] == pytest.approx([1e-3, 9e-4, 8.1e-4])
    assert float(log[-1]["loss"]) < float(log[1]["loss"])              # it learns (on its own queries)
    chosen = max(log[1:], key=lambda r: float(r["val_map@10"]))
    kept = load_file(str(tmp_path / f"epoch_{int(chosen['epoch']):02d}.safetensors"))
    assert all(torch.equal(tensor, kept[name]) for name, tensor in load_file(str(best)).items())
    loaded = load_reranker(best)
    assert loaded.trained and validation_map10(loaded, [data], 40, "cpu") == pytest.approx(float(chosen["val_map@10"]))
    assert lines[-1].startswith(f"best: epoch_{int(chosen['epoch']):02d}")
    with pytest.raises(ValueError, match="needs K = 80"):
        train(model, [data], [data], TrainSettings(epochs=1, K=80), tmp_path / "x")


def test_a_step_trains_only_queries_with_a_relevant_candidate_within_its_k(town_sets, tmp_path):
    """vpr-train retrieves max(K) candidates; a step with a smaller K must not see a query whose relevant
    candidates all lie beyond its K (AP = 0/0 would poison the loss and every weight)."""
    data, _, bundle = town_sets
    beyond = data.relevant.copy()
    beyond[:, :20] = False                            # the relevant ones of every query now lie at ranks 21-40
    beyond[:4, 5] = True                              # except four queries with one relevant among the first 20
    shifted = type(data)(data.bundle, data.run, beyond)
    model = build_reranker("fc", dim=bundle.dim, hidden=16)
    train(model, [shifted], [data], TrainSettings(epochs=1, K=20, batch_size=32), tmp_path, log=lambda _: None,
          allow_worse=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    nothing = type(data)(data.bundle, data.run, np.zeros_like(beyond))
    with pytest.raises(ValueError, match="no training query has a relevant candidate among its top K = 20"):
        train(model, [nothing], [data], TrainSettings(epochs=1, K=20), tmp_path / "n", log=lambda _: None)


def test_a_non_finite_loss_stops_training_naming_epoch_and_batch(town_sets, tmp_path):
    data, _, bundle = town_sets
    model = build_reranker("fc", dim=bundle.dim, hidden=16)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="epoch 1, batch 1: the loss is nan"):
        train(model, [data], [data], TrainSettings(epochs=1, K=40), tmp_path, log=lambda _: None)


def test_validation_that_scores_no_query_is_an_error(town_sets):
    data, _, bundle = town_sets
    unscored = type(data)(data.bundle, type(data.run)(**{**vars(data.run), "positives": [[]] * len(data.run.query)}),
                          data.relevant)
    with pytest.raises(ValueError, match="no validation query has a positive"):
        validation_map10(build_reranker("fc", dim=bundle.dim, hidden=16), [unscored], 40, "cpu")


def test_schedule_overrides_apply_to_both_steps_and_unknown_keys_are_named():
    schedule = Schedule.from_overrides({"lr": 1e-3, "fc": {"epochs": 2}, "gnn": {"K": 100, "model": {"L": 50}}})
    assert (schedule.fc.lr, schedule.gnn.lr, schedule.fc.epochs, schedule.fc.K) == (1e-3, 1e-3, 2, 255)
    assert (schedule.gnn.K, schedule.gnn.epochs, schedule.gnn_model["L"], schedule.gnn_model["layers"]) == (100, 5, 50, 1)
    assert Schedule.from_overrides(None) == Schedule()
    with pytest.raises(ValueError, match=r"unknown schedule keys \['epochs'\]"):
        Schedule.from_overrides({"epochs": 3})
    with pytest.raises(ValueError, match=r"unknown schedule keys \['model'\] in fc"):
        Schedule.from_overrides({"fc": {"model": {}}})


def test_vpr_train_runs_both_steps_with_fc1_frozen(synthetic_map, tmp_path, capsys):
    root, report = synthetic_map
    config = tmp_path / "tiny.yaml"
    config.write_text("batch_size: 8\nlr: 1.0e-3\nfc: {epochs: 2, K: 40}\n"
                      "gnn: {epochs: 1, K: 40, model: {L: 20, width: 48, heads: 4, mlp: 96, dropout: 0.0}}\n")
    city = f"synth0={report.bundle.root}"
    out = tmp_path / "run"
    args = ["--msls", str(root / "msls"), "--train", city, "--val", city, "--config", str(config), "--device", "cpu",
            "--allow-worse"]
    assert train_main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "synth0: 32 queries" in text and text.count("best: epoch_") == 2
    # The same command under torchrun with 2 processes (gloo): rank 0 alone logs, and every epoch's loss and
    # validation score are the one-process run's (weights: test_two_processes_under_torchrun_...; here FC1 starts
    # from an eigen-decomposition whose nearly degenerate directions differ at 1e-4 between thread counts).
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(Path(sys.executable).with_name("vpr-train")), *args, "--out", str(tmp_path / "two")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("synth0: 32 queries") == 2 and two.stdout.count("best: epoch_") == 2
    for step in ("fc", "gnn"):
        one, other = (list(csv.DictReader(open(folder / step / "log.csv"))) for folder in (out, tmp_path / "two"))
        assert [r["val_map@10"] for r in one] == [r["val_map@10"] for r in other]
        assert [float(r["loss"]) for r in one[1:]] == pytest.approx([float(r["loss"]) for r in other[1:]], rel=1e-4)
    fc, gnn = load_file(str(out / "fc" / "best.safetensors")), load_file(str(out / "gnn" / "best.safetensors"))
    assert torch.equal(fc["fc1.weight"], gnn["fc1.weight"]) and torch.equal(fc["fc1.bias"], gnn["fc1.bias"])
    model = load_reranker(out / "gnn" / "best.safetensors")
    assert (model.config.K, model.config.L, model.config.width) == (40, 20, 48)
    # Step 2 alone from the step-1 checkpoint gives the same GNN.
    again = tmp_path / "again"
    assert train_main([*args, "--out", str(again), "--steps", "gnn",
                       "--fc-weights", str(out / "fc" / "best.safetensors")]) == 0
    assert torch.equal(load_file(str(again / "gnn" / "best.safetensors"))["fc2.weight"], gnn["fc2.weight"])


def test_vpr_train_errors(synthetic_map, tmp_path, capsys):
    root, report = synthetic_map
    base = ["--msls", str(root / "msls"), "--val", f"synth0={report.bundle.root}", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        train_main([*base, "--train", "synth0"])
    assert "expected CITY=MAP_DIR" in capsys.readouterr().err
    train = ["--train", f"synth0={report.bundle.root}"]
    with pytest.raises(SystemExit) as usage:
        train_main([*base, *train, "--steps", "gnn"])
    assert usage.value.code == 2 and "needs --fc-weights" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    assert train_main([*base, *train, "--config", str(bad)]) == 1
    assert "unknown schedule keys ['learning_rate']" in capsys.readouterr().err
    assert train_main([*base, "--train", f"nowhere={report.bundle.root}"]) == 1
    assert "no such directory" in capsys.readouterr().err


def planted_clusters(tmp_path, queries, seed, dim=32, k=30, relevant=6):
    """Candidate sets in which the answer is readable only from positional affinity: each query's relevant
    images overlap one another around its true pose but are visually a little *less* similar to it than
    scattered distractors (so the retrieval order ranks distractors first); one relevant image is always among
    the top 10 (the GNN's anchors). Every query owns a block of `k` map images, 2 km from the next."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(queries, dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    similarity = np.c_[rng.uniform(0.40, 0.60, (queries, relevant)), rng.uniform(0.50, 0.75, (queries, k - relevant))]
    similarity[:, 0] = rng.uniform(0.70, 0.80, queries)             # the relevant anchor
    noise = rng.normal(size=(queries, k, dim))
    noise -= np.einsum("qkd,qd->qk", noise, q)[..., None] * q[:, None]
    noise /= np.linalg.norm(noise, axis=2, keepdims=True)
    rows = similarity[..., None] * q[:, None] + np.sqrt(1 - similarity[..., None] ** 2) * noise
    centre = np.c_[np.arange(queries) * 2000.0, np.zeros(queries)] + [386000.0, 6174000.0]
    heading = rng.uniform(0, 360, queries)
    distractors = np.c_[150.0 + 120.0 * np.arange(k - relevant), np.zeros(k - relevant)]   # 120 m apart: no overlaps
    offsets = np.concatenate([rng.normal(0, 3, (queries, relevant, 2)),
                              np.broadcast_to(distractors, (queries, k - relevant, 2))], axis=1)
    xy = centre[:, None] + offsets
    headings = np.c_[heading[:, None] + rng.normal(0, 8, (queries, relevant)), rng.uniform(0, 360, (queries, k - relevant))]
    table = MapTable(keys=[f"m{i}" for i in range(queries * k)], easting=xy[..., 0].ravel(),
                     northing=xy[..., 1].ravel(), heading=headings.ravel() % 360, zone=UtmZone(33))
    bundle = MapBundle.build(tmp_path / f"planted{seed}", table, rows.reshape(-1, dim).astype(np.float32),
                             {"kind": "planted"})
    order = np.argsort(-similarity, axis=1, kind="stable")          # the retrieval order
    ids = np.arange(queries)[:, None] * k + order
    labels = order < relevant
    result = SearchResult(ids=ids, scores=np.take_along_axis(similarity, order, 1).astype(np.float32),
                          restricted=np.zeros(queries, bool), fallback=np.zeros(queries, bool))
    positives = [row[mask] for row, mask in zip(ids, labels)]
    run = RetrievalRun(query=None, descriptors=q.astype(np.float32), query_poses=np.c_[centre, heading],
                       result=result, positives=positives, metrics=retrieval_metrics(ids, positives))
    return CandidateSet(bundle, run, labels)


def test_the_gnn_learns_planted_clusters_from_positional_affinity(tmp_path):
    """A fast proof of learning: the GNN with positional affinity lifts val mAP@10 from the untrained model's
    to at least 50 %; the same model without positional affinity ends clearly lower."""
    train_set, val_set = planted_clusters(tmp_path, 240, seed=1), planted_clusters(tmp_path, 80, seed=2)
    assert val_set.run.metrics["map@10"] < 0.4                      # the retrieval order is poor
    settings = TrainSettings(epochs=12, K=30, lr=1e-3, lr_decay=0.95, batch_size=16)
    scores = {}
    for positional in (True, False):
        torch.manual_seed(0)
        model = build_reranker("gnn", dim=32, hidden=32, K=30, L=10, width=64, heads=4, mlp=128,
                               positional=positional, dropout=0.0)
        out = tmp_path / f"positional_{positional}"
        train(model, [train_set], [val_set], settings, out, log=lambda _: None)
        log = list(csv.DictReader(open(out / "log.csv")))
        scores[positional] = (float(log[0]["val_map@10"]), max(float(r["val_map@10"]) for r in log[1:]))
    untrained, trained = scores[True]
    print(f"planted clusters: retrieval {val_set.run.metrics['map@10']:.3f}, gnn+pa untrained {untrained:.3f} -> "
          f"{trained:.3f}, gnn without positional affinity {scores[False][0]:.3f} -> {scores[False][1]:.3f}")
    assert trained >= 0.5 and trained > untrained + 0.2
    assert scores[False][1] < trained - 0.15


class Interrupted(Exception):
    pass


def test_training_resumes_after_the_last_complete_epoch_with_the_same_weights(tmp_path):
    """A run killed after epoch 2 and started again ends with exactly the weights of an uninterrupted run
    (optimiser, schedule, batch order and dropout continue where they stopped)."""
    train_set, val_set = planted_clusters(tmp_path, 60, seed=3), planted_clusters(tmp_path, 20, seed=4)
    settings = TrainSettings(epochs=3, K=30, lr=1e-3, batch_size=16)

    def model():
        torch.manual_seed(0)
        return build_reranker("gnn", dim=32, hidden=32, K=30, L=10, width=32, heads=4, mlp=64, dropout=0.2)

    whole = train(model(), [train_set], [val_set], settings, tmp_path / "whole", log=lambda _: None, allow_worse=True)

    def stop_after_epoch_2(line):
        if line.startswith("epoch 2/3"):
            raise Interrupted
    with pytest.raises(Interrupted):
        train(model(), [train_set], [val_set], settings, tmp_path / "cut", log=stop_after_epoch_2, allow_worse=True)
    assert not (tmp_path / "cut" / "epoch_03.safetensors").exists()
    (tmp_path / "cut" / "last.pt.partial").write_bytes(b"a state half written when the process was killed")
    lines = []
    resumed = train(model(), [train_set], [val_set], settings, tmp_path / "cut", log=lines.append, allow_worse=True)
    assert lines[0] == f"resuming after epoch 2/3 from {tmp_path / 'cut' / 'last.pt'}"
    for name in ("epoch_03.safetensors", "best.safetensors"):
        expected, got = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "cut" / name))
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    epochs = [[row["epoch"] for row in csv.DictReader(open(tmp_path / run / "log.csv"))] for run in ("whole", "cut")]
    assert epochs[0] == epochs[1] == ["0", "1", "2", "3"]
    assert resumed.name == whole.name
    with pytest.raises(ValueError, match="last.pt: the state of a training with other settings"):
        train(model(), [train_set], [val_set], TrainSettings(epochs=4, K=30), tmp_path / "cut", log=lambda _: None)


def test_two_processes_under_torchrun_train_the_same_weights_as_one(tmp_path):
    """DistributedDataParallel over 2 CPU processes (gloo), same global batch: the weights of every epoch
    match the one-process run's within float tolerance (without dropout, whose masks differ by rank)."""
    script = Path(__file__).with_name("ddp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "epoch 2/2" in two.stdout
    for name in ("fc/epoch_01", "fc/epoch_02", "gnn/epoch_01", "gnn/epoch_02"):
        one_weights = load_file(str(tmp_path / "one" / f"{name}.safetensors"))
        two_weights = load_file(str(tmp_path / "two" / f"{name}.safetensors"))
        assert one_weights.keys() == two_weights.keys()
        for key, tensor in one_weights.items():
            assert torch.allclose(tensor, two_weights[key], atol=1e-5, rtol=1e-4), f"{name} {key}"
    assert not any((tmp_path / "two" / "fc").glob("*.partial"))
