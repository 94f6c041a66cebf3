"""vpr-eval on a synthetic town: the Table 4.1 layout, result files, prediction files and the thesis grids."""
import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import lund_halves, write_photos_csv

from vpr_rerank_ros.cli import eval_main, map_main
from vpr_rerank_ros.datasets.msls import load_side, read_predictions
from vpr_rerank_ros.descriptors.extract import DescriptorExtractor
from vpr_rerank_ros.mapbuild import map_model


def test_vpr_eval_compares_rerankers(synthetic_map, tmp_path, capsys):
    root, report = synthetic_map
    out = tmp_path / "eval"
    dim = report.bundle.dim
    code = eval_main(["--msls", str(root / "msls"), "--city", "synth0", "--map", str(report.bundle.root), "-K", "40",
                      "--reranker", "none", "--reranker", "superglobal:P=1,beta=0.6", "--reranker", "k_reciprocal",
                      "--reranker", f"gnn:dim={dim},K=40,L=20,layers=1", "--grid", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "WARNING: re-ranker gnn has NO TRAINED WEIGHTS" in captured.err
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
    assert f"expects 4096-D descriptors (its `dim`), the map {report.bundle.root} holds {report.bundle.dim}-D" \
        in capsys.readouterr().err
    assert eval_main([*args, "-K", "40", "--reranker", f"gnn:dim={report.bundle.dim}"]) == 1   # L = 127 > K
    assert "needs at least L = 127 candidates, got 40" in capsys.readouterr().err
    fov = f"gnn:dim={report.bundle.dim},K=40,L=20,fov_radius=80.0"     # the map's overlaps assume 50 m
    assert eval_main([*args, "-K", "40", "--reranker", fov]) == 1
    assert "trained with a 80 m / 90° field of view, the map" in capsys.readouterr().err
    assert eval_main(["--msls", str(root / "msls"), "--city", "nowhere", "--map", str(report.bundle.root)]) == 1
    assert "no such directory" in capsys.readouterr().err


def write_h5(path, keys, descriptors, identity=None):
    """A descriptor file as an external pipeline would write it: plain h5py, datasets keys and descriptors."""
    with h5py.File(path, "w") as f:
        f.create_dataset("keys", data=list(keys), dtype=h5py.string_dtype())
        f.create_dataset("descriptors", data=descriptors)
        if identity:
            f.attrs["model_identity"] = identity


def test_vpr_eval_and_vpr_map_with_precomputed_descriptors(synthetic_map, tmp_path, capsys):
    """Descriptors from a file give the same table as describing the images with the map's model; a map can be
    built from such a file too."""
    root, report = synthetic_map
    bundle = report.bundle
    query = load_side(root / "msls", "synth0", "query")
    described = DescriptorExtractor(map_model(bundle)).describe_files(
        list(zip(query.keys, map(str, query.image_paths()))))
    file = tmp_path / "descriptors.h5"
    write_h5(file, [*described.keys, *bundle.table.keys],
             np.concatenate([described.descriptors, np.asarray(bundle.descriptors, np.float32)]))
    assert map_main(["build", "--msls", str(root / "msls"), "--cities", "synth0", "--descriptors", str(file),
                     "--out", str(tmp_path / "map")]) == 0
    assert "precomputed (descriptors.h5)" in capsys.readouterr().out
    common = ["--msls", str(root / "msls"), "--city", "synth0", "-K", "40", "--config",
              str(Path(__file__).resolve().parents[1] / "config" / "eval_rerankers.yaml")]
    assert eval_main([*common, "--map", str(bundle.root), "--out", str(tmp_path / "described")]) == 0
    assert eval_main([*common, "--map", str(tmp_path / "map"), "--descriptors", str(file),
                      "--out", str(tmp_path / "precomputed")]) == 0
    described_rows = list(csv.DictReader(open(tmp_path / "described" / "results.csv")))
    precomputed_rows = list(csv.DictReader(open(tmp_path / "precomputed" / "results.csv")))
    assert [r["reranker"] for r in described_rows] == ["none", "aqe", "alpha_qe", "superglobal", "k_reciprocal",
                                                       "gnn_knn"]
    for a, b in zip(described_rows, precomputed_rows):
        assert a["reranker"] == b["reranker"]
        for column in ("map@1", "map@10", "recall@20"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-6)


def test_precomputed_descriptors_are_checked(synthetic_map, tmp_path, capsys):
    root, report = synthetic_map
    args = ["--msls", str(root / "msls"), "--city", "synth0", "--map", str(report.bundle.root), "-K", "20"]
    rows = np.asarray(report.bundle.descriptors[:3], np.float32)
    cases = [(["a", "b", "c"], rows, None, "no descriptor for 32 of 32 images"),
             (["a"], rows, None, "'descriptors' is [3, "),
             (["a", "b", "c"], rows * 2, None, "must be finite (no NaN or inf) and L2-normalised"),
             (["a", "b", "c"], rows[:, :8] / np.linalg.norm(rows[:, :8], axis=1, keepdims=True), None, "8-D"),
             (["a", "b", "c"], rows, "f" * 64, "descriptors of model ffffffffffff")]

    keys = list(load_side(root / "msls", "synth0", "query").keys)
    for i, (names, data, identity, message) in enumerate(cases):
        file = tmp_path / f"bad{i}.h5"
        if message.startswith("no descriptor"):
            write_h5(file, names, data, identity)
        else:   # every query present, so the check under test is the one that fails
            reps = np.resize(data, (len(keys), data.shape[1])) if len(names) == 3 else data
            write_h5(file, keys if len(names) == 3 else names, reps, identity)
        assert eval_main([*args, "--descriptors", str(file)]) == 1
        assert message in capsys.readouterr().err, message
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert eval_main([*args, "--descriptors", str(tmp_path / "junk.h5")]) == 1
    assert "not a readable HDF5 file" in capsys.readouterr().err


def test_vpr_eval_geometric_adds_a_verified_row_per_reranker(synthetic_map, synthetic_map_with_features, tmp_path,
                                                             capsys, monkeypatch):
    from vpr_rerank_ros.evaluation import read_conditions
    from vpr_rerank_ros.local_features import OpenCVExtractor

    root, report = synthetic_map
    args = ["--msls", str(root / "msls"), "--city", "synth0", "-K", "20"]
    real, calls = OpenCVExtractor.__call__, []
    monkeypatch.setattr(OpenCVExtractor, "__call__", lambda self, rgb: calls.append(1) or real(self, rgb))
    out = tmp_path / "eval"
    assert eval_main([*args, "--map", str(synthetic_map_with_features.root), "--reranker", "none", "--reranker",
                      "superglobal", "--geometric", "top_n=10,min_inliers=10,min_margin=3,weight=0.3",
                      "--out", str(out)]) == 0
    assert len(calls) == 32                                  # each query's features once, for both rows
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("re-ranker")).split()[-2:] == ["fired", "changed"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["reranker"] for r in rows] == ["none", "none+geometric", "superglobal", "superglobal+geometric"]
    assert rows[0]["fired"] == rows[0]["changed"] == ""
    assert 0 < float(rows[1]["changed"]) <= float(rows[1]["fired"]) < 1    # it stands aside on most queries
    assert len(read_predictions(out / "predictions_none_geometric.txt")) == 32
    table = lines.index(next(line for line in lines if line.startswith("Recall@1 per condition")))
    conditions = read_conditions(load_side(root / "msls", "synth0", "query"))
    assert lines[table].split()[3:] == [str(v) for values in conditions.values() for v in np.unique(values)]
    assert lines[table + 1].split()[1:] == [str(int((values == v).sum())) for values in conditions.values()
                                            for v in np.unique(values)]
    assert [line.split()[0] for line in lines[table + 2:table + 6]] == [r["reranker"] for r in rows]
    assert eval_main([*args, "--map", str(report.bundle.root), "--geometric"]) == 1
    assert "has no local features for geometric verification" in capsys.readouterr().err
    assert eval_main([*args, "--map", str(synthetic_map_with_features.root), "--geometric", "topn=3"]) == 1
    assert "geometric verification has no parameter 'topn'" in capsys.readouterr().err
    assert len(calls) == 32                                  # refused before any query was described


def test_vpr_eval_on_geotagged_photos_matches_the_msls_side(synthetic_map, tmp_path, capsys):
    """The city's queries given as a CSV of paths and poses (--queries) score exactly as its MSLS query side."""
    root, report = synthetic_map
    query = load_side(root / "msls", "synth0", "query")
    photos = write_photos_csv(query, tmp_path / "queries.csv")
    common = ["--map", str(report.bundle.root), "-K", "20", "--reranker", "none", "--reranker", "superglobal"]
    assert eval_main(["--msls", str(root / "msls"), "--city", "synth0", *common, "--out", str(tmp_path / "a")]) == 0
    assert eval_main(["--queries", str(photos), *common, "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"results written to {tmp_path / 'b'}"
    msls, csv_rows = (list(csv.DictReader(open(tmp_path / side / "results.csv"))) for side in "ab")
    assert msls == csv_rows and int(msls[0]["queries"]) == 32
    assert (tmp_path / "a" / "predictions_none.txt").read_text() == (tmp_path / "b" / "predictions_none.txt").read_text()
    for wrong in (["--queries", str(photos), "--city", "synth0"], ["--msls", str(root / "msls")],
                  ["--queries", str(photos), "--subtask", "s2w"]):
        with pytest.raises(SystemExit):
            eval_main([*wrong, *common])
        assert "--queries" in capsys.readouterr().err
    assert eval_main(["--queries", str(tmp_path / "none.csv"), *common]) == 1
    assert "none.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_vpr_eval_geometric_on_the_lund_photos(shared_data, tmp_path, capsys):
    """Real photos: a map of the even Lund frames with RootSIFT features, the odd frames as --queries (EXIF GPS),
    re-ranked and geometrically verified."""
    even, odd = lund_halves(shared_data, tmp_path)
    assert map_main(["build", "--out", str(tmp_path / "map"), "--images", str(even), "--local-features",
                     "rootsift"]) == 0
    capsys.readouterr()
    assert eval_main(["--queries", str(odd), "--map", str(tmp_path / "map"), "-K", "10", "--reranker", "none",
                      "--geometric", "top_n=10", "--out", str(tmp_path / "eval")]) == 0
    output = capsys.readouterr().out
    assert output.startswith("odd: 15 queries with positives, K = 10"), output
    rows = list(csv.DictReader(open(tmp_path / "eval" / "results.csv")))
    assert [r["reranker"] for r in rows] == ["none", "none+geometric"]
    assert float(rows[0]["map@1"]) >= 0.8 and float(rows[1]["map@1"]) >= float(rows[0]["map@1"]) - 0.07
    assert 0 < float(rows[1]["fired"])               # real photos of one street: the matcher has evidence
