"""Live bag replay over real DDS: vpr-replay --live starts the node with use_sim_time, plays a drive bag through
the shared synthetic town onto its topics with /clock, and scores the poses it publishes."""
import csv
import math

import pytest

from conftest import SYNTH_SEED, check_page, synth_config
from vpr_rerank_ros.cli import replay_main
from vpr_rerank_ros.datasets.synth_town import BagConfig, plan_city, write_bag

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def drive_bag(tmp_path_factory):
    """16 frames at 2 Hz through the shared synthetic town, with GPS fixes."""
    config = synth_config()
    return write_bag(tmp_path_factory.mktemp("live") / "drive", plan_city(config, SYNTH_SEED, 0), config,
                     BagConfig(length_m=60.0, fps=2.0, gps_noise_m=4.0), SYNTH_SEED)


def test_live_replay_scores_what_the_node_publishes(synthetic_map, drive_bag, tmp_path, capsys):
    _, report = synthetic_map
    bag = drive_bag
    rows_csv, folder = tmp_path / "frames.csv", tmp_path / "report"
    assert replay_main([str(bag), "--map", str(report.bundle.root), "--top-k", "20", "--live", "--wait-for-node",
                        "--rate", "2", "--frame-timeout", "15", "--csv", str(rows_csv), "--report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "frames sent 16, answered 16; node received 16, processed 16, dropped 0 (latest frame wins), bad 0, " \
           "errors 0, lost in transport 0;" in out, out
    assert "recall (25 m): recall@1" in out and "end_to_end" in out and "descriptor" in out, out
    rows = list(csv.DictReader(open(rows_csv)))
    assert len(rows) == 16
    errors = sorted(float(r["error_m"]) for r in rows)
    assert errors[len(errors) // 2] < 25.0, errors                # the same bound as the offline replay
    # Per frame: the wall time to each pose; the node's stages for the frames its diagnostics reported.
    assert all(float(r["end_to_end_ms"]) > 0 for r in rows)
    assert 1 <= sum(math.isfinite(float(r["descriptor_ms"])) for r in rows) < 16
    page = check_page(folder)
    assert "frames sent 16, answered 16;" in page and "live: /clock at up to 2x" in page and "ellipses.png" in page
    assert "latency.png" in page and "The confidences are not known" in page


def test_live_replay_at_bag_rate_accounts_for_every_frame(synthetic_map, drive_bag):
    from vpr_rerank_ros.live_replay import LiveSettings, NodeSetup, replay_live

    _, report = synthetic_map
    live = replay_live(drive_bag, NodeSetup(map_path=str(report.bundle.root), top_k=20), LiveSettings(rate=4.0))
    counts = live.node_counts
    assert live.final and live.sent == 16
    assert counts["received"] == counts["processed"] + counts["dropped"] and counts["bad"] == counts["errors"] == 0
    assert live.answered == counts["processed"] >= 1             # a dropped frame is never answered
    assert live.report.errors["missing"] == live.sent - live.answered


def test_live_replay_reports_a_node_that_fails_to_start(synthetic_map, tmp_path, capsys):
    _, report = synthetic_map
    config = synth_config()
    bag = write_bag(tmp_path / "drive", plan_city(config, SYNTH_SEED, 0), config,
                    BagConfig(length_m=10.0, fps=2.0), SYNTH_SEED)
    params = tmp_path / "node.yaml"
    params.write_text("vpr_localizer:\n  ros__parameters:\n    rate_hz: -1.0\n")
    assert replay_main([str(bag), "--map", str(report.bundle.root), "--live", "--node-params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "the vpr_localizer node exited with code 1" in err and "Parameter rate_hz out of range" in err, err


def test_live_options_need_live(synthetic_map, capsys):
    _, report = synthetic_map
    with pytest.raises(SystemExit):
        replay_main(["bag", "--map", str(report.bundle.root), "--rate", "2"])
    assert "need --live" in capsys.readouterr().err
