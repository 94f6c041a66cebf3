"""Live bag replay: the `vpr_localizer` node runs as a subprocess with `use_sim_time`, a drive bag's raw
serialized camera and GPS messages are played onto its topics with `/clock` from the bag's timeline, and the
poses and match markers the node publishes are matched to the ground truth interpolated to their header stamps
and scored with the offline replay's scoring (`replay.score_frames`); topics and truth are found as offline
(`replay.open_drive`).

Pacing: the bag clock runs at `rate` × wall time. With `wait_for_node` it also holds just before each camera
frame until the node has answered the previous one (or `frame_timeout_s` passed), so a slow CPU still scores
every frame; without it, frames the node cannot keep up with are dropped by the node (latest frame wins), as
they would be on a vehicle, and count as failures.
"""
from __future__ import annotations

import importlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.duration import Duration
from rclpy.executors import SingleThreadedExecutor
from rosgraph_msgs.msg import Clock
from visualization_msgs.msg import MarkerArray

from .bag import FIX_TYPE, TYPESTORE, iter_bag, stamp_ns
from .frames import COUNTERS, DIAGNOSTICS_PERIOD_S, STATUS_NAME
from .mapdb import MapBundle
from .replay import (STAGES, FrameEstimate, GpsTrack, ReplayInput, ReplayReport, format_report, open_drive,
                     score_frames, skip_reason)

CLOCK_PERIOD_S = 0.025         # /clock is published about every 25 ms of wall time (40 Hz)
NODE = "/vpr_localizer"        # the node's name, so its private topics are /vpr_localizer/pose, .../matches


@dataclass(frozen=True)
class NodeSetup:
    """What the node is started with. `params_file` holds any other node parameters; the replay always sets
    map_path, model_path, reranker, reranker_params, top_k, device, filter, compressed (from the bag), output: utm
    (the ground truth's frame), publish_matches: true (for Recall@k) and use_sim_time: true."""

    map_path: str
    model_path: str = ""
    reranker: str = "none"
    reranker_params: dict | None = None
    top_k: int = 100
    device: str = "auto"
    params_file: str | None = None
    filter: bool = False              # the node's temporal filter


@dataclass(frozen=True)
class LiveSettings:
    rate: float = 1.0                 # bag seconds per wall second
    wait_for_node: bool = False       # hold the bag clock until the node answered the previous frame
    frame_timeout_s: float = 30.0     # wall seconds to wait for an answer (and for the node's last report)
    startup_timeout_s: float = 180.0  # wall seconds for the node to load its map and subscribe
    use_gps: bool = True              # play the bag's GPS fixes

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.frame_timeout_s > 0 and self.startup_timeout_s > 0):
            raise ValueError("rate, frame_timeout_s and startup_timeout_s must be positive")

    def describe(self) -> str:
        """How the bag is played, in words (a report's header)."""
        if self.wait_for_node:
            return f"live: /clock at up to {self.rate:g}x the bag's speed, each frame waiting for the node's answer"
        return f"live: /clock at {self.rate:g}x the bag's speed, frames the node cannot keep up with dropped"


@dataclass
class LiveReport:
    report: ReplayReport
    sent: int                 # camera frames published
    answered: int             # frames the node published a pose for
    node_counts: dict         # frames.COUNTERS, from the node's last diagnostics
    final: bool               # the node's diagnostics after the last frame arrived (else the counts are older)
    wall_s: float             # playback time, from the first message to the node's last report


def format_live_report(live: LiveReport) -> str:
    """The offline error table plus what happened on the wire."""
    c = live.node_counts
    return (format_report(live.report) + "\n"
            f"frames sent {live.sent}, answered {live.answered}; node received {c.get('received', '?')}, "
            f"processed {c.get('processed', '?')}, dropped {c.get('dropped', '?')} (latest frame wins), "
            f"bad {c.get('bad', '?')}, errors {c.get('errors', '?')}, lost in transport {c.get('lost', '?')}"
            f"{'' if live.final else ' (its last report came before the end)'}; "
            f"playback {live.wall_s:.0f} s\n"
            "latency: node stages from /diagnostics, end_to_end = image published -> pose received")


def replay_live(bag: str | Path, node: NodeSetup, settings: LiveSettings = LiveSettings(),
                request: ReplayInput = ReplayInput()) -> LiveReport:
    """Start the node, play the bag to it, score its poses. Raises RuntimeError when the node fails."""
    table = MapBundle.load(node.map_path, verify=False, use_gpu=False).table   # a clear error before ROS
    zone = table.zone
    topics, truth = open_drive(bag, request, zone)
    gps = GpsTrack.read(bag, topics.gps, zone) if topics.gps else None
    played_gps = topics.gps if settings.use_gps else None
    messages = iter_bag(bag, {topics.image, played_gps} - {None})
    first = next(messages, None)
    if first is None:
        raise ValueError(f"{bag}: no messages on the camera topic {topics.image}")
    with tempfile.TemporaryDirectory(prefix="vpr_replay_") as tmp:
        remaps = [("image/compressed:=" if topics.compressed else "image:=") + topics.image,
                  *([f"gps/fix:={played_gps}"] if played_gps else [])]
        params = [*([node.params_file] if node.params_file else []),
                  _replay_params(node, topics.compressed, Path(tmp))]
        process = NodeProcess(params, Path(tmp) / "node.log", [arg for r in remaps for arg in ("-r", r)])
        context = rclpy.Context()
        try:
            rclpy.init(args=[], context=context)
            player = _Player(context, process, topics.image, topics.image_type, played_gps, settings,
                             start_ns=first[2])
            player.wait_for_node(settings.startup_timeout_s)
            start = time.monotonic()
            player.play(itertools.chain([first], messages))
            final = player.finish()
            wall_s = time.monotonic() - start
        finally:
            rclpy.try_shutdown(context=context)
            process.stop()
    frames, skipped, latency_ms = [], {}, player.frame_latency_ms()
    for stamp in player.sent:
        reason = skip_reason(truth, stamp)
        if reason is not None:
            skipped[stamp] = reason
            continue
        x, y = player.poses.get(stamp, (float("nan"), float("nan")))
        frames.append(FrameEstimate(stamp, x, y, player.matches.get(stamp, []),
                                    covariance=player.covariances.get(stamp), latency_ms=latency_ms.get(stamp, {})))
    try:
        report = score_frames(frames, truth, skipped, gps, map_table=table)
    except ValueError as exc:
        raise ValueError(f"{bag}: {exc}") from None
    answered = sum(stamp in player.poses for stamp in player.sent)
    return LiveReport(report, len(player.sent), answered, player.node_counts(), final, wall_s)


def _replay_params(node: NodeSetup, compressed: bool, folder: Path) -> Path:
    """The params file with what the replay sets (see NodeSetup)."""
    params = {"map_path": str(node.map_path), "model_path": str(node.model_path or ""), "reranker": node.reranker,
              "reranker_params": yaml.safe_dump(node.reranker_params or {}, default_flow_style=True).strip(),
              "top_k": int(node.top_k), "device": node.device, "filter": bool(node.filter),
              "compressed": compressed, "output": "utm",
              "publish_matches": True, "use_sim_time": True}
    path = folder / "replay_params.yaml"
    path.write_text(yaml.safe_dump({"vpr_localizer": {"ros__parameters": params}}))
    return path


class NodeProcess:
    """`python -m vpr_rerank_ros.node --ros-args --params-file F ... [ROS_ARGS]` as a subprocess, its output in a
    log file (a pipe could fill up and block the node); `stop` sends SIGINT, as Ctrl-C would."""

    def __init__(self, params_files: list, log_path: Path, ros_args: list[str] = (), env: dict | None = None) -> None:
        self.log_path = Path(log_path)
        command = [sys.executable, "-m", "vpr_rerank_ros.node", "--ros-args",
                   *(arg for f in params_files for arg in ("--params-file", str(f))), *ros_args]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                            stdout=log, stderr=subprocess.STDOUT, text=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text()

    def check_alive(self) -> None:
        """Raise RuntimeError quoting the log's tail when the node has exited."""
        if not self.alive():
            tail = self.log().strip().splitlines()[-10:]
            raise RuntimeError(f"the vpr_localizer node exited with code {self.process.returncode}:\n"
                               + "\n".join(tail))

    def stop(self) -> int:
        """SIGINT; killed if it does not exit within 20 s. Returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _message_class(msgtype: str):
    """The rclpy message class of a bag type name such as 'sensor_msgs/msg/NavSatFix'."""
    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


class _Player:
    """The replay's own ROS node: publishes /clock and the bag's messages, collects the node's answers."""

    def __init__(self, context, process: NodeProcess, camera: str, camera_type: str, gps: str | None,
                 settings: LiveSettings, start_ns: int) -> None:
        """`gps`: the GPS topic played, None when none is."""
        self.process, self.settings = process, settings
        self.camera, self.camera_type, self.gps = camera, camera_type, gps
        self.node = rclpy.create_node("vpr_replay", context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.clock_pub = self.node.create_publisher(Clock, "/clock", 10)
        self.publishers = {}
        self.sent = {}            # camera frame stamp -> wall time published
        self.poses = {}           # stamp -> (easting, northing)
        self.covariances = {}     # stamp -> (2, 2) position covariance, m^2
        self.answer_wall = {}     # stamp -> wall time the pose arrived
        self.matches = {}         # stamp -> [(easting, northing)] in rank order
        self.diagnostics = []     # (stamp ns, {key: value}) of the node's pipeline status
        self.pose_sub = self.node.create_subscription(PoseWithCovarianceStamped, f"{NODE}/pose", self._on_pose, 100)
        self.node.create_subscription(MarkerArray, f"{NODE}/matches", self._on_matches, 100)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 100)
        self.sim_ns = start_ns    # the bag clock, ns, as last published
        self.anchor = (start_ns, time.monotonic())   # the bag clock runs at the rate from this (ns, wall) pair

    # ------------------------------------------------------------------ callbacks

    def _on_pose(self, msg: PoseWithCovarianceStamped) -> None:
        stamp = stamp_ns(msg.header)
        self.poses[stamp] = (msg.pose.pose.position.x, msg.pose.pose.position.y)
        self.covariances[stamp] = np.asarray(msg.pose.covariance, dtype=np.float64).reshape(6, 6)[:2, :2]
        self.answer_wall[stamp] = time.monotonic()

    def _on_matches(self, msg: MarkerArray) -> None:
        if msg.markers:
            ranked = sorted(msg.markers, key=lambda m: m.id)
            self.matches[stamp_ns(msg.markers[0].header)] = [(m.pose.position.x, m.pose.position.y) for m in ranked]

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == STATUS_NAME:
                self.diagnostics.append((stamp_ns(msg.header), {kv.key: kv.value for kv in status.values}))

    # ------------------------------------------------------------------ playback

    def _publisher(self, topic: str, msgtype: str):
        if topic not in self.publishers:
            self.publishers[topic] = self.node.create_publisher(_message_class(msgtype), topic, 10)
        return self.publishers[topic]

    def _tick(self, due_ns: int | None = None, hold_ns: int | None = None) -> None:
        """Spin for one clock period (less when the bag clock reaches `due_ns` sooner), then publish the bag
        clock. `hold_ns`: the clock stops there, and resumes from there once no longer held."""
        timeout = CLOCK_PERIOD_S
        if due_ns is not None:
            timeout = min(timeout, max(0.0, (due_ns - self.sim_ns) / (self.settings.rate * 1e9)))
        self.executor.spin_once(timeout_sec=timeout)
        now = time.monotonic()
        sim = self.anchor[0] + int((now - self.anchor[1]) * self.settings.rate * 1e9)
        if hold_ns is not None and sim > hold_ns:
            sim, self.anchor = hold_ns, (hold_ns, now)
        self.sim_ns = max(self.sim_ns, sim)
        clock = Clock()
        clock.clock.sec, clock.clock.nanosec = divmod(self.sim_ns, 1_000_000_000)
        self.clock_pub.publish(clock)
        self.process.check_alive()

    def wait_for_node(self, timeout_s: float) -> None:
        """Until the node subscribes to the camera, GPS (when played) and /clock topics and publishes its pose (it
        loads its map first), then half a second more for discovery to settle both ways."""
        waiting = [self._publisher(self.camera, self.camera_type), self.clock_pub]
        if self.gps is not None:
            waiting.append(self._publisher(self.gps, FIX_TYPE))
        deadline = time.monotonic() + timeout_s
        while min(p.get_subscription_count() for p in waiting) == 0 or self.pose_sub.get_publisher_count() == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vpr_localizer node did not subscribe within {timeout_s:.0f} s")
            self._tick(hold_ns=self.sim_ns)
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            self._tick(hold_ns=self.sim_ns)

    def play(self, messages) -> None:
        """Publish each message when the bag clock reaches its record time (holding for the node if asked)."""
        outstanding = None        # (stamp, wall deadline) of the last frame, with wait_for_node
        for topic, msgtype, t, raw in messages:
            while True:
                if outstanding and (outstanding[0] in self.poses or time.monotonic() > outstanding[1]):
                    outstanding = None
                if self.sim_ns >= t and outstanding is None:
                    break
                self._tick(due_ns=t, hold_ns=t - 1 if outstanding else None)
            self._publisher(topic, msgtype).publish(raw)
            if topic == self.camera:
                stamp = stamp_ns(TYPESTORE.deserialize_cdr(raw, msgtype).header)
                self.sent[stamp] = time.monotonic()
                if self.settings.wait_for_node:
                    outstanding = (stamp, time.monotonic() + self.settings.frame_timeout_s)
        if not self.sent:
            raise ValueError("the bag has no camera frames to play")
        for publisher in self.publishers.values():
            publisher.wait_for_all_acked(Duration(seconds=5))

    def finish(self) -> bool:
        """Run the clock on until the node reports, one diagnostics period after the last frame, that nothing is
        pending and all its poses have arrived: True; False when `frame_timeout_s` passed first."""
        after = self.sim_ns + round(DIAGNOSTICS_PERIOD_S * 1e9)
        deadline = time.monotonic() + self.settings.frame_timeout_s
        while time.monotonic() < deadline:
            self._tick()
            if self.diagnostics and self.diagnostics[-1][0] >= after:
                counts = self.node_counts()
                pending = counts["received"] - sum(counts[k] for k in ("processed", "dropped", "bad", "errors"))
                if pending == 0 and counts["processed"] <= len(self.poses):
                    return True
        return False

    # ------------------------------------------------------------------ results

    def node_counts(self) -> dict:
        if not self.diagnostics:
            return {}
        values = self.diagnostics[-1][1]
        return {k: int(values[k]) for k in COUNTERS}

    def frame_latency_ms(self) -> dict:
        """Stamp -> {stage: ms} of each answered frame: end_to_end, the wall time from publishing the frame to
        receiving its pose, and the node's stages for the frames its diagnostics reported. The node reports its
        last frame's latencies with the count of frames processed, n; its poses arrive in the order it processed
        them, so that frame is the n-th pose received."""
        answered = sorted(self.answer_wall, key=self.answer_wall.get)
        latency = {s: {"end_to_end": (self.answer_wall[s] - self.sent[s]) * 1e3} for s in answered if s in self.sent}
        for _, values in self.diagnostics:
            n = int(values["processed"])
            if 0 < n <= len(answered) and answered[n - 1] in latency:
                latency[answered[n - 1]].update({stage: float(values[f"latency_{stage}_ms"]) for stage in STAGES
                                                 if f"latency_{stage}_ms" in values})
        return latency
