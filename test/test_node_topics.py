"""The node's camera topic follows image_transport's naming over DDS: with `compressed: true`, remapping
`image:=/camera/image_raw` subscribes to /camera/image_raw/compressed, and a remapping of `image/compressed`
itself wins."""
import pytest
from node_harness import running_node, set_stamp, stamp_of, write_params

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.images import encode_jpeg, read_rgb

pytestmark = pytest.mark.ros


@pytest.mark.parametrize("remap, topic", [("image:=/camera/image_raw", "/camera/image_raw/compressed"),
                                          ("image/compressed:=/cam/jpeg", "/cam/jpeg")],
                         ids=["base_topic", "compressed_topic"])
def test_compressed_frames_arrive_on_the_image_transport_name(synthetic_map, tmp_path, remap, topic):
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage

    root, report = synthetic_map
    query, _ = load_city(root / "msls", "synth0")
    frame = CompressedImage(format="jpeg", data=encode_jpeg(read_rgb(query.image_path(0))))
    params = write_params(tmp_path / "params.yaml", map_path=str(report.bundle.root), top_k=20, compressed=True)
    with running_node(params, tmp_path, "-r", remap) as (node, client):
        poses = client.collect(PoseWithCovarianceStamped, "/vpr_localizer/pose", 10)
        images = client.node.create_publisher(CompressedImage, topic, qos_profile_sensor_data)
        client.wait_for_subscriber(images, node)
        for n in range(8):                                   # best effort: re-sent until a pose comes back
            set_stamp(frame, 3000 + n)
            images.publish(frame)
            if client.spin_until(lambda: poses, timeout=2.0):
                break
    assert poses and stamp_of(poses[0]) >= 3000, node.log()
