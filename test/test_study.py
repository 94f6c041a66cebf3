"""`vpr-study` end to end at a tiny size: town, one descriptor for every map, every learned row trained by
the study, every re-ranker scored on the held-out city, results and figures written; a second run resumes, one
with other settings is refused."""
import csv
from dataclasses import replace

import pytest

from vpr_rerank_ros.datasets.synth_town import SynthConfig
from vpr_rerank_ros.datasets.town import TownConfig
from vpr_rerank_ros.study import StudyConfig, run_study

TINY = StudyConfig(train_cities=1, val_cities=1, test_cities=1, K=30, L=10, width=48, heads=4, mlp=96,
                   fc_epochs=1, gnn_epochs=1, workers=1,
                   town=SynthConfig(town=TownConfig(blocks_x=2, blocks_y=2), width=128, height=96, frame_spacing_m=8.0,
                                    query_sequences=3, query_frames=8))


@pytest.mark.slow
def test_the_study_runs_from_nothing_and_resumes(tmp_path):
    lines = []
    results = run_study(3, tmp_path, TINY, log=lines.append)
    rows = list(csv.DictReader(open(results)))
    assert [r["reranker"] for r in rows] == ["none", "aqe", "alpha_qe", "superglobal", "k_reciprocal", "gnn_knn",
                                             "fc", "gnn", "gnn+pa", "gnn+pa+heading"]
    assert list(rows[0]) == ["reranker", "map@1", "map@5", "map@10", "map@20", "recall@5", "recall@10", "recall@20"]
    assert all(0.0 <= float(r[c]) <= 1.0 for r in rows for c in list(r)[1:])
    for name in ("fc", "gnn", "gnn+pa", "gnn+pa+heading"):
        assert (tmp_path / "runs" / name / "best.safetensors").exists() and (tmp_path / "runs" / name / "log.csv").exists()
    assert (tmp_path / "training.png").stat().st_size > 10_000 and "| gnn+pa |" in (tmp_path / "results.md").read_text()
    # A second run reuses town, descriptor, maps and checkpoints and gives the same table.
    again = []
    assert list(csv.DictReader(open(run_study(3, tmp_path, TINY, log=again.append)))) == rows
    assert not any(line.startswith(("generate town", "epoch")) for line in again)
    # Resuming with other settings (here the descriptor's block) would mix two studies: refused before any work.
    with pytest.raises(ValueError, match="holds a study with other settings"):
        run_study(3, tmp_path, replace(TINY, descriptor_block=15))
