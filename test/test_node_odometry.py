"""Odometry into the node's temporal filter over DDS (`filter: true, odometry: true`): the twist of nav_msgs/Odometry
on 'odom' (body frame) is rotated by the frame's estimated heading into the map and replaces the filter's
constant-velocity guess. The same frame sent again and again is a vehicle that the camera sees standing still:
without odometry every filtered pose stays exactly on the estimate; with 10 m/s forward they lead it along the
estimated heading (not along the odometry's own orientation, which is 90 deg off here)."""
import math

import numpy as np
import pytest
from node_harness import diagnostics_values, image_msg, running_node, set_stamp, stamp_of, write_params

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.images import read_rgb

pytestmark = pytest.mark.ros

SPEED = 10.0       # m/s forward
DT = 0.1           # s between frame stamps
FRAMES = 8


def test_odometry_velocity_moves_the_filtered_pose_along_the_heading(synthetic_map, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from nav_msgs.msg import Odometry
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    root, report = synthetic_map
    frame = read_rgb(load_city(root / "msls", "synth0")[0].image_path(0))
    params = write_params(tmp_path / "params.yaml", map_path=str(report.bundle.root), top_k=20, filter=True,
                          odometry=True)
    with running_node(params, tmp_path) as (node, client):
        poses = client.collect(PoseWithCovarianceStamped, "/vpr_localizer/pose", 10)
        diagnostics = client.collect(DiagnosticArray, "/diagnostics", 10)
        images = client.node.create_publisher(Image, "/image", qos_profile_sensor_data)
        odometry = client.node.create_publisher(Odometry, "/odom", qos_profile_sensor_data)
        client.wait_for_subscriber(images, node)
        client.wait_for_subscriber(odometry, node)
        answered = {}                                     # stamp -> pose
        for n in range(4 * FRAMES):                       # best effort: re-sent until answered
            if len(answered) >= FRAMES:
                break
            stamp = 1000 + DT * len(answered)
            odom = set_stamp(Odometry(), stamp)
            odom.twist.twist.linear.x = SPEED
            odom.pose.pose.orientation.w = 1.0            # yaw 0: not the vehicle's heading in the map
            odometry.publish(odom)
            client.spin_for(0.05)
            images.publish(image_msg(frame, stamp))
            client.spin_until(lambda: any(abs(stamp_of(p) - stamp) < 1e-6 for p in poses), 10.0)
            answered.update({round(stamp_of(p), 6): p for p in poses})
        client.spin_until(lambda: diagnostics and "from odometry" in diagnostics_values(diagnostics[-1])["velocity"],
                          3.0)
    assert len(answered) >= FRAMES, node.log()
    ordered = [answered[k] for k in sorted(answered)]
    start = np.array([ordered[0].pose.pose.position.x, ordered[0].pose.pose.position.y])   # the filter's restart
    q = ordered[0].pose.pose.orientation
    yaw = 2 * math.atan2(q.z, q.w)                      # the vehicle's estimated heading, ENU
    forward, left = np.array([math.cos(yaw), math.sin(yaw)]), np.array([-math.sin(yaw), math.cos(yaw)])
    leads = [(np.array([p.pose.pose.position.x, p.pose.pose.position.y]) - start) for p in ordered[1:]]
    along, across = [float(d @ forward) for d in leads], [float(d @ left) for d in leads]
    assert min(along) > 0.05, (along, across)           # ignored odometry: exactly 0
    assert max(abs(a) for a in across) < 0.3 * min(along), (along, across)
    assert "from odometry" in diagnostics_values(diagnostics[-1])["velocity"], diagnostics_values(diagnostics[-1])
