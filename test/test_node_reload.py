"""Run-time reconfiguration of the vpr_localizer node over DDS: ~/reload_map and re-ranker changes through
parameters are loaded beside the pipeline and swapped in between two frames, so the node keeps localising
frames and publishing diagnostics at their period meanwhile; what cannot be done is refused with the reason,
and the node goes on with the map and re-ranker it has."""
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import pytest
from node_harness import NodeProcess, diagnostics_values, image_msg, running_node, write_params

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.frames import DIAGNOSTICS_PERIOD_S
from vpr_rerank_ros.images import read_rgb

pytestmark = pytest.mark.ros

RELOAD_S = 3.0                 # what `pad` adds to every load of a map, about
FRAME_SPACING_S = 0.5          # the test's camera rate
BLOCKED_S = 2.5 * DIAGNOSTICS_PERIOD_S   # a gap in the diagnostics this long: the executor was blocked
RELOAD = "/vpr_localizer/reload_map"


def pad(map_dir: Path) -> None:
    """Add a sparse file of zeros (no disk space) to the map at `map_dir`, registered in map.json as an attachment,
    which MapBundle.load checksums like the map's own files; sized so that its SHA-256 takes about RELOAD_S on
    this machine, so every later load of the map (a reload too) takes about that long more."""
    digest, zeros, sample_mib = hashlib.sha256(), bytes(1 << 20), 64
    start = time.perf_counter()
    for _ in range(sample_mib):
        digest.update(zeros)
    mib = max(sample_mib, math.ceil(sample_mib * RELOAD_S / (time.perf_counter() - start)))
    for _ in range(mib - sample_mib):
        digest.update(zeros)
    with open(map_dir / "padding.bin", "wb") as f:
        f.truncate(mib << 20)
    meta = json.loads((map_dir / "map.json").read_text())
    meta["files"]["padding.bin"] = {"bytes": mib << 20, "sha256": digest.hexdigest()}
    (map_dir / "map.json").write_text(json.dumps(meta, indent=2))


class Camera:
    """Publishes the town's query frames to the node every FRAME_SPACING_S while the test waits, and records
    when poses and diagnostics arrive (test-side monotonic time)."""

    def __init__(self, synthetic_map, client, node):
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image

        query, _ = load_city(synthetic_map[0] / "msls", "synth0")
        self.frames = [read_rgb(query.image_path(i)) for i in range(4)]
        self.client, self.node, self.sent = client, node, 0
        self.poses, self.diagnostics = [], []      # (receive time, message)
        client.node.create_subscription(PoseWithCovarianceStamped, "/vpr_localizer/pose",
                                        lambda msg: self.poses.append((time.monotonic(), msg)), 10)
        client.node.create_subscription(DiagnosticArray, "/diagnostics",
                                        lambda msg: self.diagnostics.append((time.monotonic(), msg)), 10)
        self.images = client.node.create_publisher(Image, "/image", qos_profile_sensor_data)
        client.wait_for_subscriber(self.images, node)

    def run_until(self, done, timeout: float = 60.0) -> None:
        """Send frames until done() holds; fails with the node's log after `timeout` seconds."""
        end = time.monotonic() + timeout
        while not done():
            assert self.node.alive(), self.node.log()
            assert time.monotonic() < end, f"timed out:\n{self.node.log()}"
            self.images.publish(image_msg(self.frames[self.sent % len(self.frames)], 1000 + self.sent))
            self.sent += 1
            self.client.spin_until(done, FRAME_SPACING_S)

    def pose_since(self, t: float) -> bool:
        return any(received > t for received, _ in self.poses)

    def reported_since(self, t: float) -> bool:
        """Whether a pose and a diagnostics message arrived after time `t`."""
        return self.pose_since(t) and any(received > t for received, _ in self.diagnostics)


def test_reload_swaps_the_map_while_frames_and_diagnostics_go_on(synthetic_map, tmp_path):
    from std_srvs.srv import Trigger

    map_path = shutil.copytree(synthetic_map[1].bundle.root, tmp_path / "map")
    params = write_params(tmp_path / "params.yaml", map_path=str(map_path), top_k=20, rate_hz=4.0)
    with running_node(params, tmp_path) as (node, client):
        camera = Camera(synthetic_map, client, node)
        pad(map_path)                               # the map on disk grows: its reload takes seconds
        padded = time.monotonic()
        camera.run_until(lambda: camera.reported_since(padded))
        asked = time.monotonic()
        future = client.call_async(Trigger, RELOAD, Trigger.Request(), node)
        camera.run_until(future.done)
        answered = time.monotonic()
        camera.run_until(lambda: camera.reported_since(answered + 1.0))
    response = future.result()
    assert response.success, response.message
    assert response.message == f"reloaded {len(synthetic_map[1].bundle)} map images"
    assert answered - asked > BLOCKED_S          # long enough for a blocked executor to show
    assert any(asked < t < answered for t, _ in camera.poses), (asked, answered, camera.poses)
    times = [t for t, _ in camera.diagnostics]
    around = [t for t in times if t <= asked][-1:] + [t for t in times if asked < t < answered] + \
        [t for t in times if t >= answered][:1]
    gaps = [b - a for a, b in zip(around, around[1:])]
    assert max(gaps) < BLOCKED_S, (answered - asked, gaps)


def test_failed_reload_keeps_the_old_map(synthetic_map, tmp_path):
    from std_srvs.srv import Trigger

    map_path = shutil.copytree(synthetic_map[1].bundle.root, tmp_path / "map")
    params = write_params(tmp_path / "params.yaml", map_path=str(map_path), top_k=20, rate_hz=4.0)
    with running_node(params, tmp_path) as (node, client):
        camera = Camera(synthetic_map, client, node)
        camera.run_until(lambda: camera.poses)
        table = map_path / "images.csv"
        data = bytearray(table.read_bytes())
        data[0] ^= 0x20                            # same size, other checksum
        table.write_bytes(bytes(data))
        corrupt = client.call(Trigger, RELOAD, Trigger.Request(), node)
        answered = time.monotonic()
        camera.run_until(lambda: camera.pose_since(answered))
        shutil.rmtree(map_path)
        removed = client.call(Trigger, RELOAD, Trigger.Request(), node)
        answered = time.monotonic()
        camera.run_until(lambda: camera.reported_since(answered))
    assert not corrupt.success and not removed.success
    assert corrupt.message.startswith("map not reloaded, still localising with the old one: MapError: ")
    assert f"{table}: checksum mismatch" in corrupt.message, corrupt.message
    assert f"{map_path}: no such map directory" in removed.message, removed.message
    values = diagnostics_values(camera.diagnostics[-1][1])
    assert values["map_images"] == str(len(synthetic_map[1].bundle)) and values["errors"] == "0", values


def test_reranker_changes_at_run_time(synthetic_map, tmp_path):
    params = write_params(tmp_path / "params.yaml", map_path=str(synthetic_map[1].bundle.root), top_k=20,
                          rate_hz=4.0)
    with running_node(params, tmp_path) as (node, client):
        camera = Camera(synthetic_map, client, node)
        camera.run_until(lambda: camera.poses)

        def in_use() -> str:
            return diagnostics_values(camera.diagnostics[-1][1])["reranker"] if camera.diagnostics else ""

        changed = client.set_parameters(node, reranker="superglobal", reranker_params="{P: 1, beta: 0.6}")
        camera.run_until(lambda: in_use() == "superglobal")
        swapped = time.monotonic()
        camera.run_until(lambda: camera.pose_since(swapped))
        refused = {
            "name": client.set_parameters(node, reranker="nope"),
            "parameter": client.set_parameters(node, reranker_params="{Q: 1}"),
            "yaml": client.set_parameters(node, reranker_params="{P: 1"),
            "map": client.set_parameters(node, reranker="gnn", reranker_params="{}"),   # 4096-D model, 333-D map
            "read-only": client.set_parameters(node, map_frame="odom"),
            "range": client.set_parameters(node, top_k=0),
            "pose_matches": client.set_parameters(node, pose_matches=30),
        }
        assert client.set_parameters(node, top_k=10, pose_matches=3).successful
        asked = time.monotonic()
        camera.run_until(lambda: camera.reported_since(asked))
        assert in_use() == "superglobal"
        # Another re-ranker alone takes its own defaults, not SuperGlobal's P and beta.
        back = client.set_parameters(node, reranker="none")
        camera.run_until(lambda: in_use() == "none")
    assert changed.successful, changed.reason
    reasons = {what: result.reason for what, result in refused.items() if not result.successful}
    assert set(reasons) == set(refused), reasons
    assert "unknown re-ranker 'nope'" in reasons["name"]
    assert "re-ranker 'superglobal' has no parameter 'Q'" in reasons["parameter"]
    assert "reranker_params is not valid YAML" in reasons["yaml"]
    assert "4096-D" in reasons["map"]
    assert "read-only parameter: map_frame" in reasons["read-only"]
    assert "top_k out of range" in reasons["range"]
    assert "need pose_matches <= top_k" in reasons["pose_matches"]
    assert "re-ranker superglobal swapped in" in node.log()
    assert back.successful, back.reason
    assert "parameters changed: reranker='none', reranker_params='{}'" in node.log()
    assert "parameter change refused: unknown re-ranker 'nope'" in node.log()


def test_a_learned_model_needing_more_candidates_than_top_k_is_refused_at_start(synthetic_map, tmp_path):
    bundle = synthetic_map[1].bundle
    small = f"{{dim: {bundle.dim}, K: 30, L: 10, width: 32, heads: 2, mlp: 64}}"
    params = write_params(tmp_path / "params.yaml", map_path=str(bundle.root), top_k=20, reranker="gnn",
                          reranker_params=small, allow_untrained=True)
    node = NodeProcess(params, tmp_path)
    assert node.process.wait(timeout=120) == 1
    assert "the gnn model re-ranks K = 30 candidates, but top_k is 20" in node.log()
