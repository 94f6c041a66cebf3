"""Full-size raw frames over DDS: 1920x1080 rgb8 sensor_msgs/Image frames (6.2 MB) from a camera driver in a separate
process (test/frame_publisher.py, up to 30 Hz) reach the node with its default camera QoS (image_qos_reliability
auto) and get poses, from a reliable publisher as is and from a best-effort one with the Fast DDS profile for large
frames (config/fastdds_large_frames.xml) in the publisher's process; without it, best-effort frames are lost and
the node says so, loudly. The rule that turns counters into that warning is checked as a unit too."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from node_harness import diagnostics_values, running_node, write_params

from conftest import REPO
from vpr_rerank_ros.datasets.msls import load_city

pytestmark = pytest.mark.ros

SECONDS, RATE_HZ = 3.0, 30.0
PROFILE = REPO / "config" / "fastdds_large_frames.xml"


def run_camera(command: list[str], env: dict, client) -> int:
    """Run the camera process while the client spins; the number of frames it sent. Its `sent N` line ends the wait:
    how long its own DDS teardown takes is not what is tested (it is killed after 10 s more)."""
    camera = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(camera.stdout), daemon=True)
    reader.start()
    finished = client.spin_until(lambda: any(line.startswith("sent") for line in lines) or camera.poll() is not None,
                                 120)
    if not client.spin_until(lambda: camera.poll() is not None, 10):
        camera.kill()
    camera.wait()
    reader.join(5)
    sent = [int(line.split()[1]) for line in lines if line.startswith("sent")]
    assert finished and sent, f"the camera process printed no `sent` line (exit {camera.returncode}): {lines}"
    return sent[0]


def drive_camera(synthetic_map, tmp_path, reliability: str, profile: bool):
    """Start the node (compressed: false, default QoS), run the camera process against it; the poses, the node's
    last diagnostics values, the frames sent, the node's log and its diagnostics statuses (level, message)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped

    root, report = synthetic_map
    image = load_city(root / "msls", "synth0")[0].image_path(0)
    params = write_params(tmp_path / "params.yaml", map_path=str(report.bundle.root), top_k=20)
    env = {**os.environ, **({"FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE)} if profile else {})}
    with running_node(params, tmp_path) as (node, client):
        poses = client.collect(PoseWithCovarianceStamped, "/vpr_localizer/pose", 100)
        diagnostics = client.collect(DiagnosticArray, "/diagnostics", 10)
        assert client.spin_until(lambda: not node.alive() or client.node.count_subscribers("/image"), 120)
        assert node.alive(), node.log()
        sent = run_camera([sys.executable, str(Path(__file__).parent / "frame_publisher.py"), reliability,
                           str(SECONDS), str(RATE_HZ), str(image)], env, client)
        client.spin_for(2.5)                  # the node processes its last frame and reports
        assert diagnostics, node.log()
        values = diagnostics_values(diagnostics[-1])
        statuses = [(d.status[0].level, d.status[0].message) for d in diagnostics]
    print(f"{reliability} publisher, profile {profile}: sent {sent}, received {values['received']}, lost "
          f"{values['lost']}, processed {values['processed']}, subscription {values['image_qos']}")
    return poses, values, sent, node.log(), statuses


@pytest.mark.parametrize("reliability, profile", [("reliable", False), ("best_effort", True)],
                         ids=["reliable_publisher", "best_effort_publisher_with_profile"])
def test_full_size_raw_frames_arrive_and_get_poses(synthetic_map, tmp_path, reliability, profile):
    poses, values, sent, log, _ = drive_camera(synthetic_map, tmp_path, reliability, profile)
    assert ("now reliable, as its publishers offer" in log) == (reliability == "reliable"), log   # auto followed it
    assert int(values["received"]) >= 0.8 * sent and int(values["lost"]) <= 0.1 * sent, (values, sent, log)
    assert len(poses) >= 2 and int(values["bad"]) == 0, (values, log)


def test_lost_full_size_frames_are_warned_about(synthetic_map, tmp_path):
    from diagnostic_msgs.msg import DiagnosticStatus

    poses, values, sent, log, statuses = drive_camera(synthetic_map, tmp_path, "best_effort", False)
    assert int(values["lost"]) >= 0.5 * sent, (values, sent)    # Fast DDS's default 512 KB segment: frames lost
    assert "camera frames lost in transport" in log and "fastdds_large_frames.xml" in log
    assert any(level == DiagnosticStatus.WARN and "camera frames lost in transport" in message
               for level, message in statuses), statuses


def test_the_loss_warning_names_the_cause_and_the_setting():
    from rclpy.qos import ReliabilityPolicy

    from vpr_rerank_ros.node import loss_warning

    assert loss_warning(0, 30, 1.0, ReliabilityPolicy.BEST_EFFORT) is None
    best_effort = loss_warning(29, 1, 1.0, ReliabilityPolicy.BEST_EFFORT)
    assert best_effort.startswith("29 camera frames lost in transport in the last 1 s (1 received)")
    assert "shared-memory segment" in best_effort and "fastdds_large_frames.xml" in best_effort
    reliable = loss_warning(3, 27, 1.0, ReliabilityPolicy.RELIABLE)
    assert "history depth" in reliable and "fastdds_large_frames.xml" not in reliable
