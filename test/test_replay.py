"""Offline bag replay: a query drive through the shared synthetic town, localised and scored."""
import csv

from conftest import SYNTH_SEED, synth_config
from vpr_rerank_ros.cli import replay_main
from vpr_rerank_ros.datasets.synth_town import BagConfig, plan_city, write_bag


def test_replay_scores_a_drive(synthetic_map, tmp_path, capsys):
    _, report = synthetic_map
    config = synth_config()
    bag = write_bag(tmp_path / "drive", plan_city(config, SYNTH_SEED, 0), config,
                    BagConfig(length_m=60.0, fps=2.0, gps_noise_m=4.0, no_fix_prob=0.2, storage="sqlite3"), SYNTH_SEED)
    rows_csv = tmp_path / "frames.csv"
    assert replay_main([str(bag), "--map", str(report.bundle.root), "--top-k", "20", "--csv", str(rows_csv)]) == 0
    out = capsys.readouterr().out
    assert "frames localised: 16" in out and "recall (25 m): recall@1" in out and "latency (median ms)" in out
    rows = list(csv.DictReader(open(rows_csv)))
    assert len(rows) == 16
    errors = sorted(float(r["error_m"]) for r in rows)
    assert errors[len(errors) // 2] < 25.0                        # median error with the offline descriptor
    assert sum(r["gps_used"] == "True" for r in rows) >= 8        # most frames had a fresh fix
    assert replay_main([str(bag), "--map", str(report.bundle.root), "--no-gps", "--top-k", "20"]) == 0
    assert "GPS hint used 0" in capsys.readouterr().out
    assert replay_main([str(tmp_path / "nope"), "--map", str(report.bundle.root)]) == 1
    assert "no such bag" in capsys.readouterr().err
