"""vpr-eval on a synthetic town: the Table 4.1 layout, result files, prediction files and the thesis grids."""
import csv

from vpr_rerank_ros.cli import eval_main
from vpr_rerank_ros.datasets.msls import read_predictions


def test_vpr_eval_compares_rerankers(synthetic_map, tmp_path, capsys):
    root, report = synthetic_map
    out = tmp_path / "eval"
    dim = report.bundle.dim
    code = eval_main(["--msls", str(root / "msls"), "--city", "synth0", "--map", str(report.bundle.root), "-K", "40",
                      "--reranker", "none", "--reranker", "superglobal:P=1,beta=0.6", "--reranker", "k_reciprocal",
                      "--reranker", f"gnn:dim={dim},K=40,L=20,layers=1", "--grid", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "WARNING: gnn has no trained weights" in captured.err
    lines = captured.out.splitlines()
    assert any(line.startswith("re-ranker") and "map@10" in line and "recall@20" in line for line in lines)
    assert any(line.startswith("grid superglobal: best by mAP@10") for line in lines)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["reranker"] for r in rows] == ["none", "superglobal", "k_reciprocal", "gnn", "aqe (grid best)",
                                             "alpha_qe (grid best)", "superglobal (grid best)"]
    none = next(r for r in rows if r["reranker"] == "none")
    assert 0.6 < float(none["map@1"]) <= 1.0 and int(none["queries"]) == 32
    predictions = read_predictions(out / "predictions_none.txt")
    assert len(predictions) == 32 and all(len(v) == 40 for v in predictions.values())
    assert (out / "results.md").read_text().startswith("| re-ranker |")


def test_vpr_eval_errors(synthetic_map, tmp_path, capsys):
    root, report = synthetic_map
    args = ["--msls", str(root / "msls"), "--city", "synth0", "--map", str(report.bundle.root)]
    assert eval_main([*args, "--reranker", "fancy"]) == 1
    assert "unknown re-ranker 'fancy'" in capsys.readouterr().err
    assert eval_main([*args, "-K", "40", "--reranker", "gnn:K=40,L=20"]) == 1    # D = 4096 expected
    assert f"expects 4096-D descriptors (its `dim`), got {report.bundle.dim}-D" in capsys.readouterr().err
    assert eval_main([*args, "-K", "40", "--reranker", f"gnn:dim={report.bundle.dim}"]) == 1   # L = 127 > K
    assert "needs at least L = 127 candidates, got 40" in capsys.readouterr().err
    assert eval_main(["--msls", str(root / "msls"), "--city", "nowhere", "--map", str(report.bundle.root)]) == 1
    assert "no such directory" in capsys.readouterr().err
