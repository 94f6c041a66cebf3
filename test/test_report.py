"""The HTML replay report: written from small synthetic replays (with and without ground truth, with frames that
got no estimate), and end to end through `vpr-replay --report` on a drive through the shared synthetic town."""
import math
import re

import numpy as np
import pytest

from conftest import SYNTH_SEED, check_page, synth_config
from vpr_rerank_ros.cli import replay_main
from vpr_rerank_ros.datasets.synth_town import BagConfig, plan_city, write_bag
from vpr_rerank_ros.geo import UtmZone
from vpr_rerank_ros.mapdb import MapTable
from vpr_rerank_ros.replay import FrameEstimate, GpsTrack, format_report, score_frames
from vpr_rerank_ros.report import FIGURES, ReplaySetup, write_index, write_report
from vpr_rerank_ros.truth import TruthTrack

SETUP = ReplaySetup("bags/drive_a", "maps/town", "superglobal P=1,beta=0.6", 50, False, True, "offline")
E0, N0 = 500_000.0, 5_300_000.0


def synthetic_replay(with_truth: bool = True, frames: int = 30):
    """A 2 m/frame drive east then north: estimates 1..3 m off (two 80 m off), every 7th frame without one, 2 m
    sigma covariances; GPS fixes every other frame; a grid of map images around it; latency per stage."""
    rng = np.random.default_rng(0)
    stamps = np.arange(frames, dtype=np.int64) * 200_000_000 + 10**9
    truth_xy = np.array([(E0 + min(i, 15) * 2.0, N0 + max(0, i - 15) * 2.0) for i in range(frames)])
    estimates = []
    for i, (stamp, xy) in enumerate(zip(stamps, truth_xy)):
        offset = (80.0, 0.0) if i in (9, 20) else rng.normal(0.0, 1.5, 2)
        x, y = (math.nan, math.nan) if i % 7 == 3 else xy + offset
        estimates.append(FrameEstimate(int(stamp), x, y, [(x, y)], confidence=float(rng.uniform(0.3, 1.0)),
                                       gps_used=True, covariance=np.diag([4.0, 4.0]),
                                       latency_ms={"descriptor": 30.0 + i, "retrieval": 0.5, "total": 40.0 + i}))
    truth = TruthTrack(stamps, truth_xy) if with_truth else None
    gps = GpsTrack(stamps[::2], truth_xy[::2] + 3.0)
    grid = np.mgrid[-40:80:6, -40:80:6].reshape(2, -1)
    table = MapTable(keys=[f"m{i}" for i in range(grid.shape[1])], easting=E0 + grid[0], northing=N0 + grid[1],
                     heading=np.zeros(grid.shape[1]), zone=UtmZone(33))
    return score_frames(estimates, truth, {}, gps, map_table=table)


def test_report_shows_the_figures_and_the_text_reports_numbers(tmp_path):
    report = synthetic_replay()
    summary = format_report(report)
    write_report(tmp_path, report, summary, SETUP)
    page = check_page(tmp_path)
    assert sorted(re.findall(r'src="([^"]+)"', page)) == sorted(FIGURES)
    for line in summary.splitlines():                  # every figure of the text report, as printed
        label, _, values = line.partition(": ")
        assert f"<th>{label}</th><td>{values}</td>" in page, line
    assert "calibration" in page and "mean NEES" in page and report.calibration["frames_scored"] == 26
    assert "frames localised</th><td>26 of 30" in page
    for text in ("bags/drive_a", "maps/town (400 images, UTM 33N)", "superglobal P=1,beta=0.6", "<td>50</td>",
                 "temporal filter</th><td>off", "GPS hint</th><td>on", "offline"):
        assert text in page, text
    assert [k for k in report.rows[0] if k.endswith("_ms")] == ["descriptor_ms", "retrieval_ms", "total_ms"]
    assert report.latency_ms == {"descriptor": pytest.approx(np.median([30.0 + i for i in range(30)])),
                                 "retrieval": 0.5, "total": pytest.approx(np.median([40.0 + i for i in range(30)]))}


def test_report_without_ground_truth(tmp_path):
    report, folder = synthetic_replay(with_truth=False), tmp_path / "new" / "report"
    write_report(folder, report, format_report(report), SETUP)
    page = check_page(folder)
    assert sorted(re.findall(r'src="([^"]+)"', page)) == ["latency.png", "over_time.png", "trajectory.png"]
    assert "No ground truth in this bag: no error plots." in page and "Jumps over time" in page
    assert "no ground truth</th><td>consistency only" in page and "jump between frames (m)</th>" in page
    # Written again over a report with truth: its error figures go, other files stay.
    write_report(folder, synthetic_replay(), "", SETUP)
    (folder / "notes.txt").write_text("kept")
    write_report(folder, report, format_report(report), SETUP)
    assert sorted(p.name for p in folder.iterdir()) == ["index.html", "latency.png", "notes.txt", "over_time.png",
                                                       "trajectory.png"]


def test_report_of_a_replay_without_any_estimate(tmp_path):
    """A live replay whose node never answered: no estimate, no covariance, no confidence, no stage latency."""
    stamps = np.arange(5, dtype=np.int64) * 10**8
    frames = [FrameEstimate(int(s), math.nan, math.nan) for s in stamps]
    report = score_frames(frames, TruthTrack(stamps, np.array([(E0 + i, N0) for i in range(5)])), {})
    write_report(tmp_path, report, format_report(report), SETUP)
    page = check_page(tmp_path)
    assert sorted(re.findall(r'src="([^"]+)"', page)) == ["error_cdf.png", "over_time.png", "trajectory.png"]
    assert "frames localised</th><td>0 of 5" in page and "No latency was measured." in page
    assert "No frame has both an estimate with a covariance and a truth." in page


def test_index_links_reports(tmp_path):
    page = write_index(tmp_path, "Live replays", [("gnn+pa (trained here)", "gnn_pa_trained_here/index.html",
                                                   "median error 1.0 m")]).read_text()
    assert '<a href="gnn_pa_trained_here/index.html">gnn+pa (trained here)</a>' in page and "median error" in page


def test_vpr_replay_writes_a_report(synthetic_map, tmp_path, capsys):
    _, report = synthetic_map
    config = synth_config()
    bag = write_bag(tmp_path / "drive", plan_city(config, SYNTH_SEED, 0), config,
                    BagConfig(length_m=24.0, fps=2.0, gps_noise_m=4.0), SYNTH_SEED)
    folder = tmp_path / "report"
    assert replay_main([str(bag), "--map", str(report.bundle.root), "--top-k", "20", "--no-gps",
                        "--report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"report: {folder / 'index.html'}" in out
    page = check_page(folder)
    assert sorted(re.findall(r'src="([^"]+)"', page)) == sorted(FIGURES)
    summary = out.split("report: ")[0].strip()
    for line in summary.splitlines():
        label, _, values = line.partition(": ")
        assert f"<th>{label}</th><td>{values}</td>" in page, line
    assert "GPS hint</th><td>off" in page and "replay</th><td>offline" in page
    assert replay_main([str(bag), "--map", str(report.bundle.root), "--report", str(folder / "index.html")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
