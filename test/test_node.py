"""The vpr_localizer node over real DDS: a subprocess started with a params file localises frames from a test
publisher, survives bad frames, publishes diagnostics, and exits non-zero with a clear message at bad start-up."""
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.geo import EnuFrame
from vpr_rerank_ros.images import read_rgb

pytestmark = pytest.mark.ros


def start_node(params_file, tmp_path):
    env = {**os.environ, "ROS_HOME": str(tmp_path / "ros_home"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vpr_rerank_ros.node", "--ros-args", "--params-file",
                             str(params_file)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def spin_for(executor, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        executor.spin_once(timeout_sec=0.1)


def image_msg(rgb, stamp_s, encoding="rgb8"):
    from sensor_msgs.msg import Image

    msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, step=rgb.shape[1] * 3)
    msg.header.stamp.sec, msg.header.frame_id = stamp_s, "camera"
    msg.data = rgb.tobytes()
    return msg


def test_node_localises_frames_over_dds(synthetic_map, tmp_path):
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, NavSatFix

    root, report = synthetic_map
    query, _ = load_city(root / "msls", "synth0")
    datum = (float(query.lat[0]), float(query.lon[0]))
    params = tmp_path / "params.yaml"
    params.write_text(f"vpr_localizer:\n  ros__parameters:\n    map_path: {report.bundle.root}\n    top_k: 20\n"
                      f"    rate_hz: 4.0\n    datum_lat: {datum[0]}\n    datum_lon: {datum[1]}\n")
    process = start_node(params, tmp_path)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("node_test", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    poses, diagnostics = [], []
    node.create_subscription(PoseWithCovarianceStamped, "/vpr_localizer/pose", poses.append, 10)
    node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    images = node.create_publisher(Image, "/image", qos_profile_sensor_data)
    fixes = node.create_publisher(NavSatFix, "/gps/fix", qos_profile_sensor_data)
    try:
        deadline = time.monotonic() + 60
        while images.get_subscription_count() == 0 and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1]
            executor.spin_once(timeout_sec=0.2)
        assert images.get_subscription_count() > 0, "the node did not come up"
        bad = image_msg(np.zeros((4, 4, 3), np.uint8), 999, encoding="yuv422")      # must be survived
        for _ in range(3):   # best effort: the first messages after discovery may be lost
            images.publish(bad)
            spin_for(executor, 0.5)
        frames = list(range(0, 16, 2))
        for n, i in enumerate(frames):
            nan_fix = NavSatFix(latitude=float("nan"), longitude=13.0)              # must be ignored
            nan_fix.header.stamp.sec = 1000 + n
            fixes.publish(nan_fix)
            images.publish(image_msg(read_rgb(query.image_path(i)), 1000 + n))
            spin_for(executor, 1.0)
        end = time.monotonic() + 20
        while (len(poses) < len(frames) - 2 or not diagnostics) and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.1)
        assert process.poll() is None, "the node died"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        executor.shutdown()
        rclpy.shutdown(context=context)
    assert len(poses) >= len(frames) - 2, err
    frame = EnuFrame(*datum)
    stamps = {p.header.stamp.sec for p in poses}
    assert stamps <= {1000 + n for n in range(len(frames))}                     # the image stamps, no others
    errors = []
    for p in poses:
        i = frames[p.header.stamp.sec - 1000]
        e, n, _ = frame.to_enu(query.lat[i], query.lon[i])
        errors.append(math.hypot(p.pose.pose.position.x - float(e), p.pose.pose.position.y - float(n)))
        assert p.header.frame_id == "map" and p.pose.covariance[0] >= 25.0 and p.pose.covariance[14] >= 1e5
    assert np.median(errors) < 30.0, errors
    status = diagnostics[-1].status[0]
    assert status.name == "vpr_localizer: pipeline"
    values = {kv.key: kv.value for kv in status.values}
    assert int(values["bad"]) >= 1 and int(values["processed"]) >= len(frames) - 2
    assert process.returncode == 0, err
    assert "unsupported encoding 'yuv422'" in err


def test_bad_start_up_exits_non_zero_with_a_clear_message(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"vpr_localizer:\n  ros__parameters:\n    map_path: {tmp_path / 'no_map'}\n")
    process = start_node(params, tmp_path)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"vpr_localizer: {tmp_path / 'no_map'}: no such map directory" in err


def test_config_yaml_documents_every_parameter():
    import yaml

    from conftest import REPO
    from vpr_rerank_ros.node import PARAMETERS

    text = (REPO / "config" / "localize.yaml").read_text()
    params = yaml.safe_load(text)["vpr_localizer"]["ros__parameters"]
    assert set(params) == set(PARAMETERS)
    lines = text.splitlines()
    for name in PARAMETERS:   # each parameter line follows a comment line
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        assert lines[index - 1].strip().startswith("#"), name
    for name, value in params.items():
        default = PARAMETERS[name][0]
        assert type(value) is type(default) and (value == default or (value != value and default != default)), name
