"""config/robot_localization.yaml against what vpr_localizer publishes: the EKF reads the node's pose topic in the
node's map frame as absolute x, y and yaw, and the published poses pass what robot_localization needs of a pose
input (frame id = world_frame, a stamp, a symmetric positive-definite covariance without zero variances), with
and without the node's temporal filter.
robot_localization itself does not exist on this machine (no ROS distribution), so the filter is not run."""
from pathlib import Path

import numpy as np
import pytest
import yaml
from node_harness import image_msg, running_node, write_params

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.images import read_rgb
from vpr_rerank_ros.node import PARAMETERS

CONFIG = Path(__file__).resolve().parents[1] / "config" / "robot_localization.yaml"
X, Y, YAW = 0, 1, 5          # indices in robot_localization's 15-element sensor config


def ekf() -> dict:
    return yaml.safe_load(CONFIG.read_text())["ekf_global"]["ros__parameters"]


def test_the_ekf_takes_absolute_x_y_and_yaw_from_the_node_in_its_map_frame():
    p = ekf()
    assert p["pose0"] == "/vpr_localizer/pose" and p["world_frame"] == p["map_frame"] == PARAMETERS["map_frame"][0]
    assert [i for i, used in enumerate(p["pose0_config"]) if used] == [X, Y, YAW]
    assert len(p["pose0_config"]) == len(p["odom0_config"]) == 15
    assert p["pose0_differential"] is False and p["pose0_rejection_threshold"] > 0 and p["two_d_mode"] is True
    assert len({p["map_frame"], p["odom_frame"], p["base_link_frame"]}) == 3          # REP-105: three frames


@pytest.mark.ros
@pytest.mark.parametrize("filtered", [False, True], ids=["frames", "temporal_filter"])
def test_published_poses_satisfy_what_robot_localization_needs(synthetic_map, tmp_path, filtered):
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    root, report = synthetic_map
    query, _ = load_city(root / "msls", "synth0")
    params = write_params(tmp_path / "params.yaml", map_path=str(report.bundle.root), top_k=20, rate_hz=4.0,
                          filter=filtered, position_floor_m=2.0)
    with running_node(params, tmp_path) as (node, client):
        poses = client.collect(PoseWithCovarianceStamped, ekf()["pose0"], 10)
        images = client.node.create_publisher(Image, "/image", qos_profile_sensor_data)
        client.wait_for_subscriber(images, node)
        for n in range(6):
            images.publish(image_msg(read_rgb(query.image_path(2 * n)), 2000 + n))
            client.spin_for(1.0)
        client.spin_until(lambda: len(poses) >= 3, timeout=20)
    assert len(poses) >= 3, node.log()
    for pose in poses:
        assert pose.header.frame_id == ekf()["world_frame"] and pose.header.stamp.sec >= 2000
        cov = np.asarray(pose.pose.covariance).reshape(6, 6)
        assert np.allclose(cov, cov.T) and (np.diag(cov) > 0).all()
        assert np.linalg.eigvalsh(cov).min() > 0                                   # positive definite
        if not filtered:                              # the frame's own estimate: at least the configured floor
            assert np.linalg.eigvalsh(cov[:2, :2]).min() >= 2.0 ** 2 - 1e-6
        q = pose.pose.pose.orientation
        assert abs(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w - 1.0) < 1e-9     # a unit quaternion
    assert f"temporal filter {'on' if filtered else 'off'}" in node.log()
