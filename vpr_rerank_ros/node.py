"""`vpr_localizer`: the ROS 2 node. Camera frames and GPS fixes in; PoseWithCovarianceStamped, NavSatFix,
diagnostics and (optionally) match markers out. A thin edge over `Localizer`.

Latest frame wins: the image callback only stores the newest frame and wakes a pipeline thread that
localises it, so a slow model never builds a backlog. The pipeline runs outside the executor: a long
callback would keep a multi-threaded executor polling (and holding the GIL the model needs). Bad input is
logged (throttled) and skipped. Pacing, diagnostics and warning throttles use the steady clock, so under
`use_sim_time` a paused or slow /clock does not stall the pipeline; output stamps are the image stamps, and
GPS fixes are aged against the image stamp.

Reconfiguration never blocks the executor: a map reload (~/reload_map) or a new re-ranker (parameters) is
loaded on a reconfiguration thread, one job at a time, while the pipeline goes on with the old one, and
swapped in between two frames. The reload service answers once its swap is done: it is a coroutine in its
own callback group that awaits the job, so the executor goes on with frames, fixes, parameters and
diagnostics meanwhile.
"""
from __future__ import annotations

import difflib
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import cv2
import numpy as np
import rclpy
import torch
import yaml
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.event_handler import SubscriptionEventCallbacks, UnsupportedEventTypeError
from rclpy.exceptions import InvalidParameterTypeException, ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSPolicyKind, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.task import Future
from rclpy.utilities import remove_ros_args
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CompressedImage, Image, Imu, NavSatFix, NavSatStatus
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker, MarkerArray

from .descriptors.extract import pick_device
from .frames import (COUNTERS, DIAGNOSTICS_PERIOD_S, GPS_MAX_AGE_S, HEADING_MAX_AGE_S, ODOMETRY_MAX_AGE_S,
                     STATUS_NAME, fresh_fix)
from .geo import EnuFrame, heading_to_yaw, meridian_convergence_deg, quaternion_yaw, yaw_to_heading
from .geometric import GeometricSettings, geometric_settings
from .images import ImageError, decode_image_message
from .localizer import Localizer, LocalizerSettings, check_candidates, hint_from_fix
from .tracking import PoseFilter, body_velocity_to_map, track
from .mapbuild import map_model
from .mapdb import MapBundle, MapError
from .rerank import Reranker, available_rerankers, build_reranker

LARGE_VARIANCE = 1e6   # unobserved axes (z, roll, pitch): "unknown", never zero
CAMERA_FRAME = "camera"   # frame_id of ~/fix for images without one
WARN_PERIOD_S = 5.0    # at most one warning per period from each place that warns about bad input
POSITIVE = 1e-3        # the least value of a parameter that must be positive (rclpy's ranges include their ends)
INT_MAX = 2**63 - 1    # ROS integer parameters are int64

PARAMETERS = {  # name: (default, description); every one is documented in config/localize.yaml
    "map_path": ("", "map bundle directory (vpr-map build)"),
    "model_path": ("", "descriptor weights; empty = the model stored in the map"),
    "reranker": ("none", f"re-ranker name ({', '.join(available_rerankers())})"),
    "reranker_params": ("{}", "re-ranker parameters as a YAML mapping, e.g. '{P: 1, beta: 0.6}'"),
    "top_k": (100, "candidates retrieved and re-ranked per frame"),
    "pose_matches": (5, "top re-ranked matches that form the pose estimate"),
    "geometric": (False, "verify the re-ranked candidates geometrically (local features; the map needs them)"),
    "geometric_params": ("{}", "geometric verification's parameters as a YAML mapping, e.g. '{top_n: 20, "
                               "min_inliers: 30}'"),
    "compressed": (False, "subscribe to <image>/compressed (CompressedImage, image_transport's naming) instead "
                          "of image (Image)"),
    "image_qos_reliability": ("auto", "camera subscription reliability: auto (reliable when every publisher of the "
                                      "topic is, else best effort), reliable or best_effort"),
    "image_qos_depth": (5, "camera subscription history depth (frames held by the middleware for the node)"),
    "map_frame": ("map", "frame_id of ~/pose and ~/matches (~/fix carries the camera image's)"),
    "output": ("enu", "pose coordinates: 'enu' (metres from datum) or 'utm' (the map's zone)"),
    "datum_lat": (float("nan"), "ENU datum latitude; NaN = the map's centre"),
    "datum_lon": (float("nan"), "ENU datum longitude; NaN = the map's centre"),
    "gps_max_age_s": (GPS_MAX_AGE_S, "GPS fixes further than this from the image stamp (either way) are ignored"),
    "gps_radius_m": (50.0, "search radius around a GPS hint, plus 3 sigma of the fix"),
    "position_floor_m": (LocalizerSettings.position_floor_m, "least 1-sigma of a trusted position (metres): raise "
                                                             "it to the map images' own position error"),
    "rate_hz": (10.0, "how often the newest frame is processed, at most"),
    "device": ("auto", "auto, cpu, cuda or cuda:N"),
    "cpu_threads": (0, "torch's threads for work on the CPU (the descriptor, re-ranking); 0 = torch's default, "
                       "one per core. Set it below the core count when other processes share the CPU"),
    "filter": (False, "fuse consecutive estimates with the temporal filter (constant velocity, Mahalanobis gating, "
                      "restart after repeated rejections) and publish its position and covariance"),
    "fp16": (False, "float16 autocast for the descriptor on CUDA (backend torch); ignored on the CPU"),
    "backend": ("torch", "descriptor inference: torch or onnxruntime (docs/deployment.md)"),
    "onnx_model": ("", "with backend onnxruntime: an ONNX export of the map's model; empty = export it into the cache"),
    "onnx_providers": ("CPUExecutionProvider", "with backend onnxruntime: execution providers, comma-separated, or "
                                               "auto (TensorRT, CUDA, CPU: those available)"),
    "publish_matches": (False, "publish ~/matches markers at the top matches"),
    "allow_untrained": (False, "run a learned re-ranker without trained weights (warned at every diagnostics period)"),
    "heading_source": ("none", "where the camera's heading comes from: none, imu (sensor_msgs/Imu on 'heading') or "
                               "odometry (nav_msgs/Odometry on 'heading'); the orientation must be relative to ENU"),
    "camera_yaw_deg": (0.0, "yaw of the camera's optical axis in the vehicle's body frame, counter-clockwise "
                            "from its x axis (REP-103): 0 = looking forward, 90 = looking left"),
    "camera_x_m": (0.0, "the camera's position in the vehicle's body frame, forward of its origin (metres): ~/pose "
                        "is the vehicle's"),
    "camera_y_m": (0.0, "the camera's position in the vehicle's body frame, left of its origin (metres)"),
    "heading_max_age_s": (HEADING_MAX_AGE_S, "headings further than this from the image stamp are ignored"),
    "odometry": (False, "with filter: the velocity of nav_msgs/Odometry on 'odom' (twist in the vehicle's body frame), "
                        "rotated into the map by the frame's estimated heading, replaces the constant-velocity guess"),
    "odometry_max_age_s": (ODOMETRY_MAX_AGE_S, "odometry further than this from the image stamp is not used"),
}
HEADING_SOURCES = {"none": None, "imu": Imu, "odometry": Odometry}
RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
LARGE_FRAMES_PROFILE = "config/fastdds_large_frames.xml"   # in the package's share folder (docs/deployment.md)
TAKES = {bool: "true or false", int: "an integer", float: "a number with a decimal point (such as 10.0)",
         str: "a string"}   # what a parameter of each default's type takes, for the error naming a wrong one
RUN_TIME = ("reranker", "reranker_params", "top_k", "pose_matches", "publish_matches")   # the rest are read-only
RANGES = {"top_k": (1, INT_MAX), "pose_matches": (1, INT_MAX), "rate_hz": (POSITIVE, math.inf),
          "gps_max_age_s": (0.0, math.inf), "gps_radius_m": (POSITIVE, math.inf),
          "position_floor_m": (POSITIVE, math.inf),
          "heading_max_age_s": (0.0, math.inf), "odometry_max_age_s": (0.0, math.inf), "image_qos_depth": (1, 100),
          "camera_yaw_deg": (-360.0, 360.0), "cpu_threads": (0, 1024),
          "camera_x_m": (-100.0, 100.0), "camera_y_m": (-100.0, 100.0)}


def parameter_descriptor(name: str) -> ParameterDescriptor:
    """How parameter `name` is declared: its description, read-only unless it can change at run time (RUN_TIME),
    and its range, which rclpy enforces at start-up and on every change."""
    default, text = PARAMETERS[name]
    descriptor = ParameterDescriptor(description=text, read_only=name not in RUN_TIME)
    if name in RANGES:
        low, high = RANGES[name]
        if isinstance(default, int):
            descriptor.integer_range = [IntegerRange(from_value=low, to_value=high, step=1)]
        else:
            descriptor.floating_point_range = [FloatingPointRange(from_value=low, to_value=high)]
    return descriptor


def unknown_parameter(name: str) -> str:
    """The warning for a parameter the node does not take, suggesting the one it is close to (a typo)."""
    close = difflib.get_close_matches(name, PARAMETERS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"ignoring unknown parameter {name}{hint}; vpr_localizer --help lists the parameters"


def usage() -> str:
    """`vpr_localizer --help`: how to start the node and every parameter with its default and description."""
    lines = ["usage: vpr_localizer [--help] --ros-args --params-file PARAMS.yaml [-p NAME:=VALUE ...]", "",
             __doc__.split("\n\n")[0].replace("\n", " "), "",
             "parameters (NAME: default, description; * changes at run time; config/localize.yaml is an example):"]
    for name, (default, text) in PARAMETERS.items():
        lines.append(f"  {name}{' *' if name in RUN_TIME else ''}: {default!r}")
        lines.append(f"      {text}")
    return "\n".join(lines)


def yaml_mapping(name: str, text: str) -> dict:
    """Parameter `name`'s YAML mapping as a dict; a ValueError unless it is one."""
    try:
        params = yaml.safe_load(text or "{}")
    except yaml.YAMLError as exc:
        raise ValueError(f"parameter {name} is not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ValueError(f"parameter {name} must be a YAML mapping, got {text!r}")
    return params


def reranker_params(text: str) -> dict:
    """The reranker_params parameter as a dict; a ValueError unless it is a YAML mapping."""
    return yaml_mapping("reranker_params", text)


def geometric_from_parameters(p: dict) -> GeometricSettings | None:
    """Geometric verification's settings from the parameters geometric and geometric_params (None: off); a
    ValueError naming a bad one."""
    params = yaml_mapping("geometric_params", p["geometric_params"])
    try:
        settings = geometric_settings(params)
    except ValueError as exc:
        raise ValueError(f"parameter geometric_params: {exc}") from None
    return settings if p["geometric"] else None


def image_decoder() -> tuple[str, Callable[[Image | CompressedImage], np.ndarray]]:
    """(name, conversion) of frames to (H, W, 3) uint8 RGB: cv_bridge's when it imports and converts a ROS 2
    message (a real ROS install), else the NumPy one. Either raises ImageError for a frame it cannot convert."""
    try:
        from cv_bridge import CvBridge, CvBridgeError
    except ImportError:
        return "numpy", decode_image_message
    bridge = CvBridge()

    def convert(msg: Image | CompressedImage) -> np.ndarray:
        try:
            if isinstance(msg, CompressedImage):
                rgb = bridge.compressed_imgmsg_to_cv2(msg, desired_encoding="rgb8")
            else:
                rgb = bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8")
        except (CvBridgeError, TypeError, ValueError, cv2.error) as exc:
            raise ImageError(f"cv_bridge cannot convert it: {exc}") from exc
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
                and rgb.size > 0):
            raise ImageError(f"cv_bridge returned no (H, W, 3) uint8 image but {getattr(rgb, 'shape', rgb)}")
        return rgb

    try:   # ROS 1 builds of cv_bridge (Debian, PyPI) import fine but fail on ROS 2 messages
        convert(Image(height=1, width=1, encoding="rgb8", step=3, data=bytes(3)))
    except Exception as exc:
        return f"numpy (cv_bridge unusable: {exc})", decode_image_message
    return "cv_bridge", convert


def loss_warning(lost: int, received: int, seconds: float, reliability: ReliabilityPolicy) -> str | None:
    """The warning when the middleware lost `lost` camera frames in the last `seconds` (while `received` arrived),
    naming the likely cause and the setting that helps; None when it lost none. Lost frames are the gaps in the
    publisher's sequence numbers: frames that were sent but never arrived whole."""
    if lost <= 0:
        return None
    text = f"{lost} camera frames lost in transport in the last {seconds:.0f} s ({received} received)"
    if reliability == ReliabilityPolicy.BEST_EFFORT:
        return (f"{text}: frames sent best effort that are larger than the sender's Fast DDS shared-memory segment "
                f"(512 KB by default) are lost; start the camera driver with FASTDDS_DEFAULT_PROFILES_FILE set to "
                f"this package's {LARGE_FRAMES_PROFILE}, or publish the camera reliable (docs/deployment.md)")
    return (f"{text}: the publisher's history overwrote them before they were delivered (a slow link or CPU); "
            "raise the publisher's history depth or lower its rate (docs/deployment.md)")


class LocalizerCore:
    """The localiser both node variants are, in the steps of a managed node's life: `configure` (read and check
    the parameters, load and verify the map and model, create the publishers and ~/reload_map), `activate`
    (subscribe, start the pipeline thread and diagnostics), `deactivate` (stop them: frames are ignored, no pose
    is published) and `cleanup` (release the map and model). Mixed into a Node or a LifecycleNode, whose
    constructor calls `_prepare` first."""

    def _prepare(self) -> None:
        """Declare the parameters and set up what lives as long as the node; no map, topics or threads yet."""
        self._declare_parameters()
        self.p = {name: self.get_parameter(name).value for name in PARAMETERS}
        self.steady = Clock(clock_type=ClockType.STEADY_TIME)
        # rclpy throttles each place that logs separately, on this clock (its default is the system clock)
        self.throttled = {"throttle_duration_sec": WARN_PERIOD_S, "throttle_time_source_type": self.steady}
        self.conversion, self.decode = image_decoder()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)   # a frame arrived, or the node stops
        self.pipeline = threading.Lock()             # held while localising: what it uses is swapped between frames
        self.localizer = self.enu = self.tracker = None
        self.jobs = None            # the reconfiguration thread, while configured
        self.worker = None          # the pipeline thread, while active
        self.running = False
        self.latest = None          # the newest frame not yet processed
        self.fix = None             # (lat, lon, sigma, stamp seconds)
        self.heading = None         # (compass degrees of the camera, stamp seconds)
        self.odometry = None        # (forward m/s, left m/s, 2x2 covariance, stamp seconds)
        self.stats = {**dict.fromkeys(COUNTERS, 0), "last_latency": {}, "gps": "no frame yet",
                      "heading": "no frame yet", "velocity": "no frame yet"}
        self.lost_before = 0        # frames lost by earlier camera subscriptions (each counts from 0)
        self.publishers_made, self.reload_service = [], None       # made by configure
        self.image_sub, self.inputs, self.diag_timer = None, [], None   # made by activate
        self.add_on_set_parameters_callback(self._on_parameters)

    def configure(self) -> None:
        """Read and check the parameters, load and verify the map and model, create the publishers and
        ~/reload_map. A bad parameter, map or model raises ValueError (MapError) or OSError naming it, and then
        nothing is kept."""
        p = {name: self.get_parameter(name).value for name in PARAMETERS}
        self._validate(p)
        self.p = p
        if p["cpu_threads"]:
            torch.set_num_threads(p["cpu_threads"])   # for the whole process: the node owns it
        self.localizer, self.enu = self._load_localizer()
        self.tracker = PoseFilter() if self.p["filter"] else None
        # The reconfiguration thread: map reloads and re-ranker swaps in the order asked for, so a re-ranker is
        # always prepared for the localizer it is swapped into.
        self.jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vpr_localizer reconfigure")
        self.pose_pub = self.create_publisher(PoseWithCovarianceStamped, "~/pose", 10)
        self.fix_pub = self.create_publisher(NavSatFix, "~/fix", 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.match_pub = self.create_publisher(MarkerArray, "~/matches", 10)
        self.publishers_made = [self.pose_pub, self.fix_pub, self.diag_pub, self.match_pub]
        self.reload_service = self.create_service(Trigger, "~/reload_map", self._on_reload,
                                                  callback_group=MutuallyExclusiveCallbackGroup())
        verifier = self.localizer.verifier
        verified = f" + geometric verification of the top {verifier.settings.top_n}" if verifier else ""
        self.get_logger().info(f"loaded {len(self.localizer.bundle)} map images with {self.p['reranker']}{verified} on "
                               f"{self.localizer.device} (torch CPU threads: {torch.get_num_threads()}), descriptor with "
                               f"{self.p['backend']}; images converted "
                               f"with {self.conversion}; temporal filter {'on' if self.tracker else 'off'}"
                               f"{' with odometry' if self.p['odometry'] else ''}")

    def activate(self) -> None:
        """Subscribe to the camera, GPS, heading and odometry topics (those configured) and start the pipeline
        thread and diagnostics."""
        self._subscribe_images(self._image_reliability())
        self.inputs = [self.create_subscription(NavSatFix, "gps/fix", self._on_fix, qos_profile_sensor_data)]
        if HEADING_SOURCES[self.p["heading_source"]] is not None:
            self.inputs.append(self.create_subscription(HEADING_SOURCES[self.p["heading_source"]], "heading",
                                                        self._on_heading, qos_profile_sensor_data))
        if self.p["odometry"]:
            self.inputs.append(self.create_subscription(Odometry, "odom", self._on_odometry, qos_profile_sensor_data))
        self.diag_timer = self.create_timer(DIAGNOSTICS_PERIOD_S, self._diagnostics, clock=self.steady)
        with self.lock:
            self._rate_base = (time.monotonic(), self.stats["received"], self.stats["processed"], self.stats["lost"])
        self.running = True
        self.worker = threading.Thread(target=self._work, name="vpr_localizer pipeline", daemon=True)
        self.worker.start()
        self.get_logger().info(f"localising frames from {self.resolve_topic_name(self._image_topic()[1])}")

    def deactivate(self) -> None:
        """Stop the pipeline thread (after the frame in hand) and unsubscribe: frames are ignored and no pose is
        published until `activate`. Nothing to do when not active."""
        if self.worker is None:
            return
        with self.wake:
            self.running = False
            self.wake.notify()
        self.worker.join()
        self.worker = None
        self.destroy_timer(self.diag_timer)
        for subscription in [self.image_sub, *self.inputs]:
            self.destroy_subscription(subscription)
        self.image_sub, self.inputs, self.diag_timer = None, [], None
        with self.lock:
            self.latest = None

    def cleanup(self) -> None:
        """Deactivate, end the reconfiguration thread (after the job in hand; queued ones are dropped) and
        release the map, model, publishers and ~/reload_map. Nothing to do when not configured."""
        self.deactivate()
        if self.jobs is None:
            return
        self.jobs.shutdown(cancel_futures=True)
        self.jobs = None
        self.destroy_service(self.reload_service)
        for publisher in self.publishers_made:
            self.destroy_publisher(publisher)
        self.publishers_made, self.reload_service = [], None
        self.localizer = self.enu = self.tracker = None

    # ------------------------------------------------------------------ set-up

    def _declare_parameters(self) -> None:
        """Declare PARAMETERS with the values the node was started with (params files, -p). A value of the wrong
        type is a ValueError naming the parameter, the type it takes and the value; a name the node does not know
        is logged as a warning (with the parameter it is close to), since rclpy would ignore it silently."""
        given = self._parameter_overrides   # rclpy keeps the start-up values here, with no public way to list them
        for name in given:
            if name not in PARAMETERS and not self.has_parameter(name):   # rclpy declares use_sim_time itself
                self.get_logger().warning(unknown_parameter(name))
        for name, (default, _) in PARAMETERS.items():
            try:
                self.declare_parameter(name, default, parameter_descriptor(name))
            except InvalidParameterTypeException:
                value = given[name]
                raise ValueError(f"parameter {name} takes {TAKES[type(default)]}, got {value.value!r} "
                                 f"({value.type_.name.lower().replace('_', ' ')})") from None

    @staticmethod
    def _validate(p: dict) -> None:
        """What the parameters' ranges cannot say (rclpy enforces those)."""
        pick_device(p["device"])
        if not p["map_path"]:
            raise ValueError("parameter map_path is required (a map directory built with vpr-map build)")
        if p["output"] not in ("enu", "utm"):
            raise ValueError(f"parameter output must be 'enu' or 'utm', got {p['output']!r}")
        if p["heading_source"] not in HEADING_SOURCES:
            raise ValueError(f"parameter heading_source must be one of {', '.join(HEADING_SOURCES)}, got "
                             f"{p['heading_source']!r}")
        if p["pose_matches"] > p["top_k"]:
            raise ValueError(f"need pose_matches <= top_k, got pose_matches {p['pose_matches']}, top_k {p['top_k']}")
        if p["image_qos_reliability"] not in ("auto", *RELIABILITY):
            raise ValueError(f"parameter image_qos_reliability must be auto, {' or '.join(RELIABILITY)}, got "
                             f"{p['image_qos_reliability']!r}")
        if p["odometry"] and not p["filter"]:
            raise ValueError("parameter odometry: true feeds the temporal filter: it needs filter: true")
        reranker_params(p["reranker_params"])
        geometric_from_parameters(p)

    @staticmethod
    def _settings(p: dict, map_size: int) -> LocalizerSettings:
        return LocalizerSettings(top_k=min(p["top_k"], map_size), pose_matches=min(p["pose_matches"], map_size),
                                 gps_radius_m=p["gps_radius_m"], position_floor_m=p["position_floor_m"],
                                 device=p["device"], fp16=p["fp16"], backend=p["backend"],
                                 onnx_model=p["onnx_model"], onnx_providers=p["onnx_providers"])

    def _load_localizer(self) -> tuple[Localizer, EnuFrame]:
        """The localizer of the configured map and model, and the ENU frame of the output datum."""
        bundle = MapBundle.load(self.p["map_path"])
        model = map_model(bundle, self.p["model_path"] or None)
        localizer = Localizer(bundle, model, self.p["reranker"], self._settings(self.p, len(bundle)),
                              reranker_params(self.p["reranker_params"]), geometric_from_parameters(self.p))
        self._check_trained(localizer.reranker)
        lat, lon = self.p["datum_lat"], self.p["datum_lon"]
        if not (math.isfinite(lat) and math.isfinite(lon)):
            lat, lon = float(np.mean(bundle.table.lat)), float(np.mean(bundle.table.lon))
        return localizer, EnuFrame(lat, lon)

    def _check_trained(self, reranker: Reranker) -> None:
        """Refuse a learned re-ranker without trained weights (its ranking is meaningless) unless allow_untrained
        says otherwise; then it is logged as an error."""
        warning = reranker.untrained_warning()
        if warning and not self.p["allow_untrained"]:
            raise ValueError(f"{warning}; set the parameter allow_untrained: true to run it anyway")
        if warning:
            self.get_logger().error(warning)

    # ------------------------------------------------------------------ callbacks

    def _on_image(self, msg) -> None:
        with self.lock:
            if self.latest is not None:
                self.stats["dropped"] += 1          # replaced before it was processed: latest frame wins
            self.latest = msg
            self.stats["received"] += 1
            self.wake.notify()

    def _on_lost(self, info) -> None:
        with self.lock:   # frames the middleware lost before they reached the node, since the first subscription
            self.stats["lost"] = self.lost_before + info.total_count

    def _on_matched(self, info) -> None:
        """A camera publisher came or went: with image_qos_reliability auto, follow it now."""
        self._follow_publishers()

    def _on_incompatible(self, info) -> None:
        if self.p["image_qos_reliability"] == "auto":
            return self._follow_publishers()
        policy = QoSPolicyKind(int(info.last_policy_kind)).name.lower()
        self.get_logger().warning(
            f"a publisher of {self.image_sub.topic_name} is not matched: its {policy} QoS "
            f"is incompatible with this {self.image_qos.reliability.name.lower()} subscription's, so none of its "
            f"frames arrive; set image_qos_reliability: auto", **self.throttled)

    def _on_fix(self, msg: NavSatFix) -> None:
        hint = hint_from_fix(msg)
        if hint is None:
            with self.lock:
                self.stats["bad_fixes"] += 1
            self.get_logger().warning(f"ignoring GPS fix with status {msg.status.status} at latitude "
                                      f"{msg.latitude}, longitude {msg.longitude}: a hint needs status >= 0 and "
                                      "a finite position within ±90° / ±180°", **self.throttled)
            return
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        with self.lock:
            self.fix = (*hint, stamp)
            self.stats["fixes"] += 1

    def _on_heading(self, msg: Imu | Odometry) -> None:
        """The camera's compass heading from the orientation of an Imu or Odometry message (relative to ENU)."""
        if isinstance(msg, Imu):
            orientation, unknown = msg.orientation, msg.orientation_covariance[0] == -1.0   # REP-145: no orientation
        else:
            orientation, unknown = msg.pose.pose.orientation, False
        try:
            if unknown:
                raise ValueError("its orientation covariance says it has no orientation (-1)")
            yaw = quaternion_yaw(orientation.x, orientation.y, orientation.z, orientation.w)
        except ValueError as exc:
            with self.lock:
                self.stats["bad_headings"] += 1
            self.get_logger().warning(f"ignoring heading message: {exc}", **self.throttled)
            return
        compass = float(yaw_to_heading(yaw + math.radians(self.p["camera_yaw_deg"])))
        with self.lock:
            self.heading = (compass, msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)
            self.stats["headings"] += 1

    def _on_odometry(self, msg: Odometry) -> None:
        """The vehicle's velocity in its body frame (the twist is in child_frame_id, REP-105) and its covariance."""
        twist = msg.twist.twist.linear
        covariance = np.asarray(msg.twist.covariance, dtype=np.float64).reshape(6, 6)[:2, :2]
        if not (math.isfinite(twist.x) and math.isfinite(twist.y) and np.isfinite(covariance).all()
                and covariance[0, 0] >= 0 and covariance[1, 1] >= 0):
            with self.lock:
                self.stats["bad_odometry"] += 1
            self.get_logger().warning(f"ignoring odometry: its linear velocity ({twist.x}, {twist.y}) or the "
                                      "covariance of it is not finite, or a variance is negative", **self.throttled)
            return
        with self.lock:
            self.odometry = (twist.x, twist.y, covariance, msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)
            self.stats["odometry"] += 1

    def _work(self) -> None:
        """The pipeline thread: wait for a frame, localise the newest one; at most `rate_hz` frames a second
        (steady clock: a compute budget, not ROS time)."""
        period = 1.0 / self.p["rate_hz"]
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.latest is not None or not self.running)
                if not self.running:
                    return
            started = time.monotonic()
            with self.pipeline:
                self._process()
            time.sleep(max(0.0, period - (time.monotonic() - started)))

    def _process(self) -> None:
        with self.lock:
            msg, self.latest = self.latest, None
            fix, heading, odometry = self.fix, self.heading, self.odometry
        if msg is None:
            return
        start = time.perf_counter()
        try:
            rgb = self.decode(msg)
        except ImageError as exc:
            with self.lock:
                self.stats["bad"] += 1
            self.get_logger().warning(f"skipping frame: {exc}", **self.throttled)
            return
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        hint, gps_note = None, "no GPS fix received"
        if fix is not None and fresh_fix(fix[3], stamp, self.p["gps_max_age_s"]):
            hint = fix[:3]
        elif fix is not None:
            gps_note = f"newest GPS fix is {abs(stamp - fix[3]):.1f} s from the image stamp: not used"
        heading_hint, heading_note = self._heading_hint(heading, stamp)
        try:
            result = self.localizer.localize(rgb, gps_hint=hint, heading_hint=heading_hint, stamp=stamp)
        except ValueError as exc:
            with self.lock:
                self.stats["bad"] += 1
            self.get_logger().warning(f"skipping frame: {exc}", **self.throttled)
            return
        except Exception as exc:   # e.g. out of device memory: a running node reports it and goes on
            with self.lock:
                self.stats["errors"] += 1
            self.get_logger().warning(f"skipping frame: {type(exc).__name__} while localising: {exc}",
                                      **self.throttled)
            return
        zone, rejected, weak = self.localizer.bundle.table.zone, False, False
        vehicle = result.of_vehicle(self.p["camera_x_m"], self.p["camera_y_m"], self.p["camera_yaw_deg"], zone)
        velocity, velocity_note = self._velocity(odometry, stamp, vehicle.heading, vehicle.heading_variance)
        if self.tracker is not None:
            vehicle, filtered = track(self.tracker, vehicle, zone, velocity)
            rejected, weak = not (filtered.accepted or filtered.weak), filtered.weak
        self._publish(msg.header, vehicle, result)
        with self.lock:
            self.stats["processed"] += 1
            self.stats["filter_rejected"] += rejected
            self.stats["filter_weak"] += weak
            if result.verification is not None:
                self.stats["verification_fired"] += result.verification.fired
                self.stats["verification_changed"] += result.verification.changed_top1
            self.stats["last_latency"] = {**result.timings, "total": time.perf_counter() - start}
            self.stats["gps"] = result.gps_note if hint is not None else gps_note
            self.stats["heading"] = heading_note
            self.stats["velocity"] = velocity_note

    def _image_topic(self) -> tuple[type, str]:
        """The camera subscription, by image_transport's naming: `image`, or with `compressed` its sibling
        `<image>/compressed`, so that remapping `image:=/camera/image_raw` reaches /camera/image_raw/compressed;
        a remapping of `image/compressed` itself wins."""
        if not self.p["compressed"]:
            return Image, "image"
        explicit = self.resolve_topic_name("image/compressed")
        if explicit != self.resolve_topic_name("image/compressed", only_expand=True):
            return CompressedImage, explicit
        return CompressedImage, self.resolve_topic_name("image") + "/compressed"

    def _image_reliability(self) -> ReliabilityPolicy:
        """The camera subscription's reliability: image_qos_reliability's, or with auto reliable when every publisher
        now on the topic is (retransmissions deliver large frames that best effort loses), else best effort (which
        matches any publisher)."""
        if self.p["image_qos_reliability"] != "auto":
            return RELIABILITY[self.p["image_qos_reliability"]]
        offered = [info.qos_profile.reliability
                   for info in self.get_publishers_info_by_topic(self.resolve_topic_name(self._image_topic()[1]))]
        reliable = offered and all(r == ReliabilityPolicy.RELIABLE for r in offered)
        return ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT

    def _subscribe_images(self, reliability: ReliabilityPolicy) -> None:
        """(Re)create the camera subscription: keep-last image_qos_depth frames, volatile, `reliability`."""
        if self.image_sub is not None:
            self.destroy_subscription(self.image_sub)
        with self.lock:
            self.lost_before = self.stats["lost"]
        self.image_qos = QoSProfile(depth=self.p["image_qos_depth"], reliability=reliability)
        image_type, topic = self._image_topic()
        events = SubscriptionEventCallbacks(message_lost=self._on_lost, incompatible_qos=self._on_incompatible,
                                            matched=self._on_matched)
        try:
            self.image_sub = self.create_subscription(image_type, topic, self._on_image, self.image_qos,
                                                      event_callbacks=events)
        except UnsupportedEventTypeError:   # a middleware that cannot report lost messages: "lost" stays 0
            self.image_sub = self.create_subscription(image_type, topic, self._on_image, self.image_qos)

    def _follow_publishers(self) -> None:
        """With image_qos_reliability auto, re-subscribe when the camera's publishers call for the other
        reliability (checked when one is matched or found incompatible, and at every diagnostics period)."""
        if self.p["image_qos_reliability"] != "auto":
            return
        reliability = self._image_reliability()
        if reliability != self.image_qos.reliability:
            self._subscribe_images(reliability)
            self.get_logger().info(f"camera subscription to {self.image_sub.topic_name} now "
                                   f"{reliability.name.lower()}, as its publishers offer")

    def _velocity(self, odometry: tuple | None, stamp: float, heading: float,
                  heading_variance: float) -> tuple[tuple | None, str]:
        """The velocity the filter takes for a frame stamped `stamp` whose vehicle heading is estimated as
        `heading` (grid compass degrees, `heading_variance` deg^2): the newest odometry's, rotated into the map
        (None when there is none fit to use), and why."""
        if not self.p["odometry"]:
            return None, "not used (odometry false)"
        if odometry is None:
            return None, "no odometry received"
        if not fresh_fix(odometry[3], stamp, self.p["odometry_max_age_s"]):
            return None, f"newest odometry is {abs(stamp - odometry[3]):.2f} s from the image stamp: not used"
        if not math.isfinite(heading_variance):
            return None, "the frame's heading is unknown, so odometry cannot be rotated into the map: not used"
        velocity = body_velocity_to_map(*odometry[:3], heading, heading_variance)
        return velocity, (f"{float(np.hypot(*velocity[0])):.2f} m/s from odometry, rotated by the estimated "
                          f"heading {heading:.1f} deg (grid)")

    def _heading_hint(self, heading: tuple[float, float] | None, stamp: float) -> tuple[float | None, str]:
        """The compass heading hint for a frame stamped `stamp` (None when there is none), and why."""
        if self.p["heading_source"] == "none":
            return None, "not used (heading_source none)"
        if heading is None:
            return None, f"no {self.p['heading_source']} heading received"
        if not fresh_fix(heading[1], stamp, self.p["heading_max_age_s"]):
            return None, f"newest heading is {abs(stamp - heading[1]):.2f} s from the image stamp: not used"
        return heading[0], f"{heading[0]:.1f} deg (compass) from {self.p['heading_source']}"

    def _publish(self, header, result, camera) -> None:
        """~/pose: the vehicle's pose `result` in the map frame; ~/fix: this frame's `camera` position in the
        camera's frame (a consumer with TF applies the camera's offset itself)."""
        stamp, table = header.stamp, self.localizer.bundle.table
        pose = PoseWithCovarianceStamped()
        pose.header.stamp, pose.header.frame_id = stamp, self.p["map_frame"]
        compass = result.heading + float(meridian_convergence_deg(result.lat, result.lon, table.zone))
        if self.p["output"] == "enu":
            east, north, _ = self.enu.to_enu(result.lat, result.lon)
            x, y, yaw = float(east), float(north), float(heading_to_yaw(compass))
        else:
            x, y, yaw = result.easting, result.northing, float(heading_to_yaw(result.heading))
        pose.pose.pose.position.x, pose.pose.pose.position.y = x, y
        pose.pose.pose.orientation.z, pose.pose.pose.orientation.w = math.sin(yaw / 2), math.cos(yaw / 2)
        cov = np.zeros((6, 6))
        cov[:2, :2] = result.position_covariance
        cov[2, 2] = cov[3, 3] = cov[4, 4] = LARGE_VARIANCE
        cov[5, 5] = math.radians(math.sqrt(result.heading_variance)) ** 2
        pose.pose.covariance = cov.reshape(-1).tolist()
        self.pose_pub.publish(pose)
        fix = NavSatFix()
        fix.header.stamp, fix.header.frame_id = stamp, header.frame_id or CAMERA_FRAME
        fix.status.status, fix.status.service = NavSatStatus.STATUS_FIX, NavSatStatus.SERVICE_GPS
        fix.latitude, fix.longitude, fix.altitude = camera.lat, camera.lon, float("nan")
        enu_cov = np.zeros((3, 3))
        enu_cov[:2, :2] = camera.position_covariance
        enu_cov[2, 2] = LARGE_VARIANCE
        fix.position_covariance = enu_cov.reshape(-1).tolist()
        fix.position_covariance_type = NavSatFix.COVARIANCE_TYPE_KNOWN
        self.fix_pub.publish(fix)
        if self.p["publish_matches"]:
            self.match_pub.publish(self._markers(stamp, result))

    def _markers(self, stamp, result) -> MarkerArray:
        markers = MarkerArray()
        for rank, match in enumerate(result.matches[:10]):
            m = Marker()
            m.header.stamp, m.header.frame_id = stamp, self.p["map_frame"]
            m.ns, m.id, m.type, m.action = "matches", rank, Marker.SPHERE, Marker.ADD
            if self.p["output"] == "enu":
                table = self.localizer.bundle.table
                east, north, _ = self.enu.to_enu(float(table.lat[match.index]), float(table.lon[match.index]))
                m.pose.position.x, m.pose.position.y = float(east), float(north)
            else:
                m.pose.position.x, m.pose.position.y = match.easting, match.northing
            m.pose.orientation.w = 1.0
            m.scale.x = m.scale.y = m.scale.z = 3.0 if rank == 0 else 1.5
            m.color.r, m.color.g, m.color.a = (1.0, 0.2, 1.0) if rank == 0 else (0.2, 0.6, 0.8)
            markers.markers.append(m)
        return markers

    def _diagnostics(self) -> None:
        """The diagnostics period: follow the camera's publishers (image_qos_reliability auto), then report."""
        self._follow_publishers()
        with self.lock:
            stats = dict(self.stats)
        localizer = self.localizer
        now = time.monotonic()
        since, received, processed, lost = self._rate_base
        self._rate_base = (now, stats["received"], stats["processed"], stats["lost"])
        status = DiagnosticStatus(name=STATUS_NAME, hardware_id=str(localizer.device))
        status.level = DiagnosticStatus.OK if stats["processed"] else DiagnosticStatus.WARN
        status.message = "localising" if stats["processed"] else "waiting for images"
        loss = loss_warning(stats["lost"] - lost, stats["received"] - received, now - since,
                            self.image_qos.reliability)
        if loss:
            status.level, status.message = DiagnosticStatus.WARN, loss
            self.get_logger().warning(loss, **self.throttled)
        untrained = localizer.reranker.untrained_warning()
        if untrained:   # only with allow_untrained: loud at every period
            status.level, status.message = DiagnosticStatus.WARN, untrained
            self.get_logger().warning(untrained)
        values = {"map_images": len(localizer.bundle), "reranker": localizer.reranker.name,
                  "image_conversion": self.conversion, **{k: stats[k] for k in COUNTERS},
                  "received_hz": f"{(stats['received'] - received) / (now - since):.2f}",
                  "processed_hz": f"{(stats['processed'] - processed) / (now - since):.2f}",
                  "gps": stats["gps"], "heading": stats["heading"], "velocity": stats["velocity"],
                  "image_qos": f"{self.image_qos.reliability.name.lower()}, depth {self.image_qos.depth}",
                  **{f"latency_{k}_ms": f"{v * 1e3:.1f}" for k, v in stats["last_latency"].items()}}
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()   # ROS time: /clock under use_sim_time
        self.diag_pub.publish(array)

    async def _on_reload(self, request, response):
        """~/reload_map, a coroutine in its own callback group: while the reconfiguration thread loads the map and
        swaps it in, the executor goes on with every other callback. It answers when the swap is done, or why
        the reload failed (the node then keeps the map it has)."""
        answer = Future()

        def finished(job) -> None:   # on the reconfiguration thread
            answer.set_result(job)
            self.executor.wake()     # resume this coroutine now rather than at the executor's next event

        try:
            self.jobs.submit(self._reload).add_done_callback(finished)
            response.message = (await answer).result()
            response.success = True
        except Exception as exc:   # a bad map, or e.g. out of memory: a running node reports it and goes on
            response.success = False
            response.message = f"map not reloaded, still localising with the old one: {type(exc).__name__}: {exc}"
            self.get_logger().error(response.message)
        return response

    def _reload(self) -> str:
        """Reconfiguration thread: a new localizer of the configured map, swapped in between two frames."""
        localizer, enu = self._load_localizer()
        with self.pipeline:
            self.localizer, self.enu = localizer, enu
        message = f"reloaded {len(localizer.bundle)} map images"
        self.get_logger().info(message)
        return message

    def _on_parameters(self, params) -> SetParametersResult:
        """Check a run-time change (rclpy has refused read-only parameters and values out of range) and queue it
        on the reconfiguration thread. A new re-ranker is built and checked against the map here (for a learned
        one that loads its weights), so a bad name, parameter or model is refused with the reason. A managed node
        not configured yet takes any value rclpy allows: `configure` reads and checks them all."""
        if self.localizer is None:
            return SetParametersResult(successful=True)
        changed = {p.name: p.value for p in params if p.name in PARAMETERS and p.value != self.p[p.name]}
        if "reranker" in changed and "reranker_params" not in changed:
            changed["reranker_params"] = "{}"    # another re-ranker alone: its own defaults, not the old one's
        new = {**self.p, **changed}
        reranker = None
        try:
            self._validate(new)
            if changed.keys() & {"reranker", "reranker_params"}:
                reranker = build_reranker(new["reranker"], **reranker_params(new["reranker_params"]))
                self.localizer.bundle.check_reranker(reranker)
                self._check_trained(reranker)
            if changed.keys() & {"reranker", "reranker_params", "top_k"}:
                check_candidates(reranker or self.localizer.reranker, new["top_k"], len(self.localizer.bundle))
        except ValueError as exc:
            self.get_logger().warning(f"parameter change refused: {exc}")
            return SetParametersResult(successful=False, reason=str(exc))
        self.p = new
        if changed:
            self.get_logger().info("parameters changed: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()))
        if "reranker_params" in changed and not any(p.name == "reranker_params" for p in params):
            # Shown by `ros2 param get` too; the callback sees no change then, so nothing is rebuilt twice.
            self.jobs.submit(self.set_parameters, [Parameter("reranker_params", value="{}")])
        if changed.keys() & {"top_k", "pose_matches"}:          # first: the new re-ranker is checked against them
            self.jobs.submit(self._apply_settings)
        if reranker is not None:
            self.jobs.submit(self._swap_reranker, reranker)
        return SetParametersResult(successful=True)

    def _swap_reranker(self, reranker: Reranker) -> None:
        """Reconfiguration thread: prepare `reranker` (slow for learned ones) beside the pipeline, then swap it in
        between two frames; on failure the node goes on with the re-ranker it has."""
        localizer = self.localizer   # reloads run on this thread too: it stays the one in use
        try:
            prepared = localizer.prepare_reranker(reranker)
        except Exception as exc:   # e.g. out of device memory
            self.get_logger().error(f"re-ranker {reranker.name} not swapped in, still using "
                                    f"{localizer.reranker.name}: {type(exc).__name__}: {exc}")
            return
        with self.pipeline:
            localizer.use_reranker(prepared)
        self.get_logger().info(f"re-ranker {prepared.name} swapped in")

    def _apply_settings(self) -> None:
        """Reconfiguration thread: the current top_k and pose_matches, from the next frame on."""
        with self.pipeline:
            self.localizer.settings = self._settings(self.p, len(self.localizer.bundle))


class LocalizerNode(LocalizerCore, Node):
    """vpr_localizer for simple use: configured and active from its construction (which raises on a bad
    parameter, map or model) until `cleanup`."""

    def __init__(self, **kwargs) -> None:
        super().__init__("vpr_localizer", **kwargs)
        self._prepare()
        self.configure()
        self.activate()


class ManagedLocalizerNode(LocalizerCore, LifecycleNode):
    """vpr_localizer as a managed (lifecycle) node, driven through ~/change_state as nav2's lifecycle manager
    does: configure loads and verifies the map and model (a failure is logged and leaves it unconfigured),
    activate starts localising, deactivate stops, cleanup releases the map and model, shutdown works from any
    state."""

    def __init__(self, **kwargs) -> None:
        super().__init__("vpr_localizer", **kwargs)
        self._prepare()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.configure()
        except (OSError, ValueError) as exc:   # MapError is a ValueError
            self.get_logger().error(f"configure failed, the node stays unconfigured: {exc}")
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.activate()
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.deactivate()
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.cleanup()   # also on shutdown and on error: back to unconfigured
        return TransitionCallbackReturn.SUCCESS

    on_shutdown = on_error = on_cleanup


def main(args: list[str] | None = None) -> int:
    """`vpr_localizer`: run the node until Ctrl-C or shutdown. Exit codes as the CLIs': 0 (also for --help), 1 a
    bad parameter, map or model (one line naming it), 2 bad usage (malformed ROS arguments, arguments the node
    does not take)."""
    return run(LocalizerNode, args)


def main_managed(args: list[str] | None = None) -> int:
    """`vpr_localizer_managed`: the managed node, unconfigured until its lifecycle is driven; exit codes as
    `main`'s (1 only for a parameter of the wrong type: a bad map or model fails the configure transition)."""
    return run(ManagedLocalizerNode, args)


def run(node_type: type[LocalizerNode] | type[ManagedLocalizerNode], args: list[str] | None) -> int:
    """Start a `node_type` with the command line `args` (sys.argv when None) and spin it until Ctrl-C or
    shutdown."""
    args = sys.argv if args is None else args
    try:
        rclpy.init(args=args)
        own = remove_ros_args(args)[1:]
    except Exception as exc:  # rcl reports malformed --ros-args with its own exception type
        print(f"vpr_localizer: cannot start ROS: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if own:
        rclpy.try_shutdown()
        if own in (["-h"], ["--help"]):
            print(usage())
            return 0
        print(f"vpr_localizer: unknown argument(s) {' '.join(own)}: parameters go after --ros-args "
              "(vpr_localizer --help lists them)", file=sys.stderr)
        return 2
    try:
        node = node_type()
    except (MapError, OSError, ValueError, ParameterException) as exc:
        print(f"vpr_localizer: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    # Every callback is short: the pipeline and reconfiguration have their own threads, ~/reload_map awaits its
    # job (a managed node's configure, which loads the map, is the exception).
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.cleanup()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
