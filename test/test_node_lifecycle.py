"""The managed vpr_localizer (`vpr_localizer_managed`) over DDS, driven from a separate client node through the
standard lifecycle services (~/change_state, ~/get_state) as nav2's lifecycle manager drives it: it localises
only while active, configure loads the map (a bad one fails the transition and leaves it unconfigured), cleanup
and shutdown release it."""
import pytest
from node_harness import image_msg, running_node, write_params

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.images import read_rgb

pytestmark = pytest.mark.ros

NODE = "/vpr_localizer"


class Lifecycle:
    """The managed node's lifecycle services, called from the test's client."""

    def __init__(self, client, node):
        self.client, self.node = client, node

    def state(self) -> str:
        from lifecycle_msgs.srv import GetState

        return self.client.call(GetState, f"{NODE}/get_state", GetState.Request(), self.node).current_state.label

    def change(self, transition: str) -> bool:
        """Ask for `transition` (configure, activate, ...); whether the node made it."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        request = ChangeState.Request(transition=Transition(label=transition))
        return self.client.call(ChangeState, f"{NODE}/change_state", request, self.node, timeout=120).success


def test_managed_node_localises_only_while_active(synthetic_map, tmp_path):
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    root, report = synthetic_map
    frame = read_rgb(load_city(root / "msls", "synth0")[0].image_path(0))
    params = write_params(tmp_path / "params.yaml", map_path=str(report.bundle.root), top_k=20)
    with running_node(params, tmp_path, managed=True) as (node, client):
        lifecycle = Lifecycle(client, node)
        poses = client.collect(PoseWithCovarianceStamped, f"{NODE}/pose", 10)
        images = client.node.create_publisher(Image, "/image", qos_profile_sensor_data)
        sent = [0]

        def answered(seconds: float) -> bool:
            """Send a frame every 0.5 s for up to `seconds`; whether a pose came back."""
            poses.clear()
            for _ in range(int(seconds / 0.5)):
                images.publish(image_msg(frame, 1000 + sent[0]))
                sent[0] += 1
                if client.spin_until(lambda: poses, timeout=0.5):
                    return True
            return False

        assert lifecycle.state() == "unconfigured"
        assert images.get_subscription_count() == 0
        assert lifecycle.change("configure") and lifecycle.state() == "inactive"
        assert "loaded " in node.log() and "map images" in node.log()
        assert not answered(1.0)                                      # inactive: not subscribed, no poses
        assert lifecycle.change("activate") and lifecycle.state() == "active"
        assert answered(30.0), node.log()
        assert lifecycle.change("deactivate") and lifecycle.state() == "inactive"
        client.spin_for(0.5)                                          # a pose of the frame in hand may come late
        assert not answered(3.0), "a deactivated node published a pose"
        assert lifecycle.change("activate") and answered(30.0), node.log()
        assert lifecycle.change("deactivate") and lifecycle.change("cleanup")
        assert lifecycle.state() == "unconfigured"
        assert lifecycle.change("shutdown") and lifecycle.state() == "finalized"
        assert node.alive()


def test_configure_with_a_bad_map_fails_and_stays_unconfigured(tmp_path):
    params = write_params(tmp_path / "params.yaml", map_path=str(tmp_path / "no_map"))
    with running_node(params, tmp_path, managed=True) as (node, client):
        lifecycle = Lifecycle(client, node)
        assert not lifecycle.change("configure")
        assert lifecycle.state() == "unconfigured" and node.alive()
        assert lifecycle.change("shutdown") and lifecycle.state() == "finalized"
    assert f"configure failed, the node stays unconfigured: {tmp_path / 'no_map'}: no such map directory" in node.log()
