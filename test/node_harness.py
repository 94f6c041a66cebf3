"""Shared by the node tests: start `vpr_localizer` as a subprocess with a params file, and talk to it over DDS
from an rclpy node in the test process (its own Context, so tests stay independent)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import yaml

from vpr_rerank_ros import live_replay
from vpr_rerank_ros.frames import STATUS_NAME


def write_params(path: Path, **params) -> Path:
    """A params file for the node, whatever its namespace (`/**`)."""
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    return path


class NodeProcess(live_replay.NodeProcess):
    """The node as `vpr-replay --live` starts it, with its log and ROS_HOME in the test's folder; `managed`: the
    managed node, `vpr_localizer_managed`, started alike."""

    def __init__(self, params_file: Path, tmp_path: Path, *ros_args: str, managed: bool = False) -> None:
        log_path, env = tmp_path / f"node_{time.monotonic_ns()}.log", {"ROS_HOME": str(tmp_path / "ros_home")}
        if not managed:
            super().__init__([params_file], log_path, list(ros_args), env=env)
            return
        self.log_path = log_path   # live_replay.NodeProcess runs the plain node's module
        command = [os.path.join(sys.prefix, "bin", "vpr_localizer_managed"), "--ros-args", "--params-file",
                   str(params_file), *ros_args]
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                            stdout=log, stderr=subprocess.STDOUT, text=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        """Resident set size of the node (VmRSS in /proc)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


@contextmanager
def running_node(params_file: Path, tmp_path: Path, *ros_args: str,
                 managed: bool = False) -> Iterator[tuple[NodeProcess, "RosClient"]]:
    """A node subprocess and a test client; on leaving, the node gets SIGINT and must exit with code 0."""
    node, client = NodeProcess(params_file, tmp_path, *ros_args, managed=managed), RosClient()
    try:
        yield node, client
    finally:
        code = node.stop()
        client.close()
    assert code == 0, node.log()


class RosClient:
    """A test-side rclpy node with a single-threaded executor in a private Context."""

    def __init__(self, name: str = "node_test") -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.clients = {}           # service name -> client

    def collect(self, msg_type, topic: str, depth: int) -> list:
        """A list that every message received on `topic` is appended to."""
        received = []
        self.node.create_subscription(msg_type, topic, received.append, depth)
        return received

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.05, max(0.0, end - time.monotonic())))

    def spin_until(self, done: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not done() and time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.05)
        return done()

    def next_message(self, received: list, timeout: float = 5.0) -> bool:
        """Empty `received` (a subscription's list) and spin until a new message lands in it."""
        received.clear()
        return self.spin_until(lambda: received, timeout)

    def wait_for_subscriber(self, publisher, node: NodeProcess, timeout: float = 60.0) -> None:
        """Until the node has subscribed to `publisher`'s topic; fails with the node's log if it died."""
        end = time.monotonic() + timeout
        while publisher.get_subscription_count() == 0:
            assert node.alive(), node.log()
            assert time.monotonic() < end, f"the node did not come up:\n{node.log()}"
            self.executor.spin_once(timeout_sec=0.2)

    def call_async(self, srv_type, service: str, request, node: NodeProcess, timeout: float = 60.0):
        """Send `request` to `service` once the node offers it (fails with the node's log if it died); returns
        the response's Future, for the caller to spin on."""
        if service not in self.clients:
            self.clients[service] = self.node.create_client(srv_type, service)
        client = self.clients[service]
        end = time.monotonic() + timeout
        while not client.service_is_ready():
            assert node.alive(), node.log()
            assert time.monotonic() < end, f"the node does not offer {service}:\n{node.log()}"
            self.executor.spin_once(timeout_sec=0.1)
        return client.call_async(request)

    def call(self, srv_type, service: str, request, node: NodeProcess, timeout: float = 60.0):
        """The node's response to `request` on `service`."""
        future = self.call_async(srv_type, service, request, node, timeout)
        assert self.spin_until(future.done, timeout), f"no response from {service}:\n{node.log()}"
        return future.result()

    def set_parameters(self, node: NodeProcess, **values):
        """Set the node's parameters in one atomic change; returns its rcl_interfaces/SetParametersResult."""
        from rcl_interfaces.srv import SetParametersAtomically
        from rclpy.parameter import Parameter

        request = SetParametersAtomically.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg() for name, value in values.items()])
        return self.call(SetParametersAtomically, f"{live_replay.NODE}/set_parameters_atomically", request,
                         node).result

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def time_msg(seconds: float):
    """builtin_interfaces/Time of `seconds`."""
    from builtin_interfaces.msg import Time

    sec, nanosec = divmod(round(seconds * 1e9), 10**9)
    return Time(sec=sec, nanosec=nanosec)


def set_stamp(msg, seconds: float):
    """Set the header stamp of `msg` to `seconds`; returns `msg`."""
    msg.header.stamp = time_msg(seconds)
    return msg


def stamp_of(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def image_msg(rgb: np.ndarray, stamp_s: float, encoding: str = "rgb8"):
    """A sensor_msgs/Image of a 3-channel uint8 array."""
    from sensor_msgs.msg import Image

    msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, step=rgb.shape[1] * 3)
    msg.header.frame_id, msg.data = "camera", rgb.tobytes()
    return set_stamp(msg, stamp_s)


def diagnostics_values(array) -> dict[str, str]:
    """The key/values of the node's pipeline status in a DiagnosticArray."""
    status = next(s for s in array.status if s.name == STATUS_NAME)
    return {kv.key: kv.value for kv in status.values}
