"""The vpr_localizer node over real DDS: a subprocess started with a params file localises frames from a test
publisher, survives bad frames, publishes diagnostics, and exits non-zero with a clear message at bad start-up.
Its parameters are declared read-only unless they can change at run time, with their ranges."""
import math

import numpy as np
import pytest
from node_harness import NodeProcess, diagnostics_values, image_msg, running_node, set_stamp, write_params

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.geo import EnuFrame
from vpr_rerank_ros.images import read_rgb
from vpr_rerank_ros.localizer import LocalizerSettings

pytestmark = pytest.mark.ros

CAMERA_FRAMES = ("front_camera", "")   # frame_id of the even and odd frames sent


def test_node_localises_frames_over_dds(synthetic_map, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, NavSatFix

    root, report = synthetic_map
    query, _ = load_city(root / "msls", "synth0")
    datum = (float(query.lat[0]), float(query.lon[0]))
    params = write_params(tmp_path / "params.yaml", map_path=str(report.bundle.root), top_k=20, rate_hz=4.0,
                          datum_lat=datum[0], datum_lon=datum[1])
    with running_node(params, tmp_path) as (node, client):
        poses = client.collect(PoseWithCovarianceStamped, "/vpr_localizer/pose", 10)
        estimates = client.collect(NavSatFix, "/vpr_localizer/fix", 10)
        diagnostics = client.collect(DiagnosticArray, "/diagnostics", 10)
        images = client.node.create_publisher(Image, "/image", qos_profile_sensor_data)
        fixes = client.node.create_publisher(NavSatFix, "/gps/fix", qos_profile_sensor_data)
        client.wait_for_subscriber(images, node)
        bad = image_msg(np.zeros((4, 4, 3), np.uint8), 999, encoding="yuv422")      # must be survived
        for _ in range(3):   # best effort: the first messages after discovery may be lost
            images.publish(bad)
            client.spin_for(0.5)
        frames = list(range(0, 16, 2))
        for n, i in enumerate(frames):
            nan_fix = NavSatFix(latitude=float("nan"), longitude=13.0)              # must be ignored
            nan_fix.header.stamp.sec = 1000 + n
            fixes.publish(nan_fix)
            image = image_msg(read_rgb(query.image_path(i)), 1000 + n)
            image.header.frame_id = CAMERA_FRAMES[n % 2]
            images.publish(image)
            client.spin_for(1.0)
        client.spin_until(lambda: len(poses) >= len(frames) - 2 and len(estimates) >= len(frames) - 2
                          and diagnostics, timeout=20)
        assert node.alive(), "the node died"
    log = node.log()
    assert len(poses) >= len(frames) - 2, log
    frame = EnuFrame(*datum)
    stamps = {p.header.stamp.sec for p in poses}
    assert stamps <= {1000 + n for n in range(len(frames))}                     # the image stamps, no others
    errors = []
    for p in poses:
        i = frames[p.header.stamp.sec - 1000]
        e, n, _ = frame.to_enu(query.lat[i], query.lon[i])
        errors.append(math.hypot(p.pose.pose.position.x - float(e), p.pose.pose.position.y - float(n)))
        floor = LocalizerSettings.position_floor_m ** 2                        # x variance: never below the floor
        assert p.header.frame_id == "map" and p.pose.covariance[0] >= floor and p.pose.covariance[14] >= 1e5
    assert np.median(errors) < 30.0, errors
    # ~/fix is the camera's position: in the image's frame, "camera" for images without one
    assert len(estimates) >= len(frames) - 2
    assert all(f.header.frame_id == (CAMERA_FRAMES[(f.header.stamp.sec - 1000) % 2] or "camera") for f in estimates)
    values = diagnostics_values(diagnostics[-1])
    assert int(values["bad"]) >= 1 and int(values["processed"]) >= len(frames) - 2
    assert int(values["bad_fixes"]) >= 1 and values["image_conversion"] == "numpy"
    assert "unsupported encoding 'yuv422'" in log


def test_bad_start_up_exits_non_zero_with_a_clear_message(tmp_path):
    params = write_params(tmp_path / "params.yaml", map_path=str(tmp_path / "no_map"))
    node = NodeProcess(params, tmp_path)
    assert node.process.wait(timeout=60) == 1
    assert f"vpr_localizer: {tmp_path / 'no_map'}: no such map directory" in node.log()


def test_an_untrained_learned_reranker_is_refused_unless_allowed(synthetic_map, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    bundle = synthetic_map[1].bundle
    small = f"{{dim: {bundle.dim}, K: 20, L: 10, width: 48, heads: 4, mlp: 96}}"
    common = dict(map_path=str(bundle.root), top_k=20, reranker="gnn", reranker_params=small)
    refused = NodeProcess(write_params(tmp_path / "refused.yaml", **common), tmp_path)
    assert refused.process.wait(timeout=120) == 1
    assert "re-ranker gnn has NO TRAINED WEIGHTS" in refused.log() and "allow_untrained: true" in refused.log()
    with running_node(write_params(tmp_path / "allowed.yaml", **common, allow_untrained=True), tmp_path) as (node, client):
        diagnostics = client.collect(DiagnosticArray, "/diagnostics", 10)
        assert client.spin_until(lambda: len(diagnostics) >= 2, timeout=120), node.log()
        assert all(d.status[0].level == DiagnosticStatus.WARN and "NO TRAINED WEIGHTS" in d.status[0].message
                   for d in diagnostics)
    assert node.log().count("NO TRAINED WEIGHTS") >= 3              # at start-up and at every period


@pytest.mark.parametrize("source", ["imu", "odometry"])
def test_the_heading_of_an_imu_or_odometry_topic_reaches_the_reranker(synthetic_map, tmp_path, source):
    """heading_source: the orientation's yaw (ENU) plus camera_yaw_deg, as a compass heading, is the hint of the
    frames stamped near it; an orientation that is not one is counted and skipped; a stale one is not used."""
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, Imu

    root, report = synthetic_map
    query, _ = load_city(root / "msls", "synth0")
    bundle = report.bundle
    model = f"{{dim: {bundle.dim}, K: 20, L: 10, width: 48, heads: 4, mlp: 96, heading: true}}"
    params = write_params(tmp_path / "params.yaml", map_path=str(bundle.root), top_k=20, reranker="gnn",
                          reranker_params=model, allow_untrained=True, heading_source=source, camera_yaw_deg=-90.0)
    message_type = {"imu": Imu, "odometry": Odometry}[source]

    def orientation(yaw_deg: float, stamp: float, valid: bool = True):
        msg = set_stamp(message_type(), stamp)
        target = msg.orientation if source == "imu" else msg.pose.pose.orientation
        target.z, target.w = math.sin(math.radians(yaw_deg) / 2), math.cos(math.radians(yaw_deg) / 2)
        if not valid:
            target.z = target.w = 0.0                                     # all zeros: no orientation
        return msg

    with running_node(params, tmp_path) as (node, client):
        diagnostics = client.collect(DiagnosticArray, "/diagnostics", 10)
        images = client.node.create_publisher(Image, "/image", qos_profile_sensor_data)
        headings = client.node.create_publisher(message_type, "/heading", qos_profile_sensor_data)
        client.wait_for_subscriber(images, node)
        client.wait_for_subscriber(headings, node)
        frame = read_rgb(query.image_path(0))

        def reported(text: str) -> bool:
            return bool(diagnostics) and text in diagnostics_values(diagnostics[-1])["heading"]

        def counted(counter: str) -> bool:
            return bool(diagnostics) and int(diagnostics_values(diagnostics[-1])[counter]) >= 1

        for n in range(60):   # until the node reports it (best effort: messages after discovery may be lost)
            headings.publish(orientation(0.0, 1000 + n, valid=False))
            headings.publish(orientation(60.0, 1000 + n))                  # ENU yaw 60 = compass 30
            images.publish(image_msg(frame, 1000 + n))
            if client.spin_until(lambda: reported("120.0 deg") and counted("bad_headings"), timeout=1.0):
                break
        assert reported("120.0 deg") and counted("bad_headings"), node.log()   # camera looks right: 30 + 90
        values = diagnostics_values(diagnostics[-1])
        assert values["heading"] == f"120.0 deg (compass) from {source}" and int(values["headings"]) >= 1
        images.publish(image_msg(frame, 2000))                             # no heading near this stamp
        for _ in range(3):
            if client.spin_until(lambda: reported("from the image stamp: not used"), timeout=5):
                break
            images.publish(image_msg(frame, 2000))
        assert reported("from the image stamp: not used"), node.log()
    assert "ignoring heading message: orientation quaternion (0.0, 0.0, 0.0, 0.0) is not a rotation" in node.log()


def test_parameters_are_read_only_unless_they_change_at_run_time():
    from vpr_rerank_ros.node import PARAMETERS, parameter_descriptor
    from vpr_rerank_ros.rerank import available_rerankers

    assert {name for name in PARAMETERS if not parameter_descriptor(name).read_only} == \
        {"reranker", "reranker_params", "top_k", "pose_matches", "publish_matches"}
    assert parameter_descriptor("top_k").integer_range[0].from_value == 1
    assert 0 < parameter_descriptor("rate_hz").floating_point_range[0].from_value < 0.01
    assert parameter_descriptor("gps_max_age_s").floating_point_range[0].from_value == 0.0
    assert not parameter_descriptor("datum_lat").floating_point_range                    # NaN: the map's centre
    assert all(name in parameter_descriptor("reranker").description for name in available_rerankers())


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


@pytest.mark.parametrize("params, message", [
    ({}, "has no local features for geometric verification: rebuild it with vpr-map build --local-features"),
    ({"geometric_params": "{topn: 3}"}, "parameter geometric_params: geometric verification has no parameter 'topn'"),
])
def test_geometric_verification_is_refused_at_start_up(synthetic_map, tmp_path, params, message):
    bundle = synthetic_map[1].bundle             # a map without local features
    node = NodeProcess(write_params(tmp_path / "params.yaml", map_path=str(bundle.root), geometric=True, **params),
                       tmp_path)
    assert node.process.wait(timeout=120) == 1
    assert message in node.log()


def test_the_node_verifies_geometrically_and_counts_it(synthetic_map, synthetic_map_with_features, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    query, _ = load_city(synthetic_map[0] / "msls", "synth0")
    params = write_params(tmp_path / "params.yaml", map_path=str(synthetic_map_with_features.root), top_k=20,
                          rate_hz=4.0, geometric=True, geometric_params="{top_n: 10, min_inliers: 10, min_margin: 3}",
                          cpu_threads=1)
    with running_node(params, tmp_path) as (node, client):
        diagnostics = client.collect(DiagnosticArray, "/diagnostics", 10)
        images = client.node.create_publisher(Image, "/image", qos_profile_sensor_data)
        client.wait_for_subscriber(images, node)
        # With these settings the trigger fires on the test town's queries 6, 8, 12 and 13 (test_localizer's)
        for n, i in enumerate((6, 8, 12, 13, 6, 8)):
            images.publish(image_msg(read_rgb(query.image_path(i)), 1000 + n))
            client.spin_for(1.0)

        def fired() -> bool:
            return bool(diagnostics) and int(diagnostics_values(diagnostics[-1])["verification_fired"]) >= 2

        assert client.spin_until(fired, timeout=20), node.log()
    values = diagnostics_values(diagnostics[-1])
    assert int(values["verification_fired"]) >= int(values["verification_changed"])
    assert float(values["latency_local_features_ms"]) > 0 and float(values["latency_verification_ms"]) > 0
    assert "with none + geometric verification of the top 10 on cpu (torch CPU threads: 1)" in node.log()
