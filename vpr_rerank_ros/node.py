"""`vpr_localizer`: the ROS 2 node. Camera frames and GPS fixes in; PoseWithCovarianceStamped, NavSatFix,
diagnostics and (optionally) match markers out. A thin edge over `Localizer`.

Latest frame wins: the image callback only stores the newest frame and wakes a pipeline thread that
localises it, so a slow model never builds a backlog. The pipeline runs outside the executor: a long
callback would keep a multi-threaded executor polling (and holding the GIL the model needs). Bad input is
logged (throttled) and skipped. Pacing and diagnostics use the steady clock, so under `use_sim_time` a
paused or slow /clock does not stall the pipeline; output stamps are the image stamps, and GPS fixes are
aged against the image stamp.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from typing import Callable

import cv2
import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.event_handler import SubscriptionEventCallbacks, UnsupportedEventTypeError
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, NavSatFix, NavSatStatus
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker, MarkerArray

from .geo import EnuFrame, heading_to_yaw, meridian_convergence_deg
from .images import ImageError, decode_image_message
from .localizer import Localizer, LocalizerSettings, hint_from_fix
from .mapbuild import map_model
from .mapdb import MapBundle, MapError

LARGE_VARIANCE = 1e6   # unobserved axes (z, roll, pitch): "unknown", never zero
COUNTERS = ("received", "lost", "processed", "dropped", "bad", "errors", "fixes", "bad_fixes")

PARAMETERS = {  # name: (default, description); every one is documented in config/localize.yaml
    "map_path": ("", "map bundle directory (vpr-map build)"),
    "model_path": ("", "descriptor weights; empty = the model stored in the map"),
    "reranker": ("none", "re-ranker name (none, aqe, alpha_qe, superglobal, k_reciprocal, gnn_knn, gnn, fc, csa)"),
    "reranker_params": ("{}", "re-ranker parameters as a YAML mapping, e.g. '{P: 1, beta: 0.6}'"),
    "top_k": (100, "candidates retrieved and re-ranked per frame"),
    "pose_matches": (5, "top re-ranked matches that form the pose estimate"),
    "compressed": (False, "subscribe to image/compressed (CompressedImage) instead of image (Image)"),
    "map_frame": ("map", "frame_id of the published pose"),
    "output": ("enu", "pose coordinates: 'enu' (metres from datum) or 'utm' (the map's zone)"),
    "datum_lat": (float("nan"), "ENU datum latitude; NaN = the map's centre"),
    "datum_lon": (float("nan"), "ENU datum longitude; NaN = the map's centre"),
    "gps_max_age_s": (2.0, "GPS fixes older than this (relative to the image stamp) are ignored"),
    "gps_radius_m": (50.0, "search radius around a GPS hint, plus 3 sigma of the fix"),
    "rate_hz": (10.0, "how often the newest frame is processed, at most"),
    "device": ("auto", "cuda, cpu or auto"),
    "publish_matches": (False, "publish ~/matches markers at the top matches"),
}


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


class LocalizerNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("vpr_localizer", **kwargs)
        for name, (default, text) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=text))
        self.p = {name: self.get_parameter(name).value for name in PARAMETERS}
        self._validate(self.p)
        self.localizer, self.enu = self._load_localizer()
        self.conversion, self.decode = image_decoder()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)   # a frame arrived, or the node stops
        self.pipeline = threading.Lock()             # held while localising: the localizer is swapped between frames
        self.running = True
        self.latest = None          # the newest frame not yet processed
        self.fix = None             # (lat, lon, sigma, stamp seconds)
        self.stats = {**dict.fromkeys(COUNTERS, 0), "last_latency": {}, "gps": "no frame yet"}
        self._rate_base = (time.monotonic(), 0, 0)   # (time, received, processed) at the last diagnostics
        self._warned = {}
        image_type, topic = (CompressedImage, "image/compressed") if self.p["compressed"] else (Image, "image")
        try:
            self.create_subscription(image_type, topic, self._on_image, qos_profile_sensor_data,
                                     event_callbacks=SubscriptionEventCallbacks(message_lost=self._on_lost))
        except UnsupportedEventTypeError:   # a middleware that cannot report lost messages: "lost" stays 0
            self.create_subscription(image_type, topic, self._on_image, qos_profile_sensor_data)
        self.create_subscription(NavSatFix, "gps/fix", self._on_fix, qos_profile_sensor_data)
        self.pose_pub = self.create_publisher(PoseWithCovarianceStamped, "~/pose", 10)
        self.fix_pub = self.create_publisher(NavSatFix, "~/fix", 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.match_pub = self.create_publisher(MarkerArray, "~/matches", 10)
        self.create_service(Trigger, "~/reload_map", self._on_reload)
        self.add_on_set_parameters_callback(self._on_parameters)
        self.create_timer(1.0, self._diagnostics, clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.worker = threading.Thread(target=self._work, name="vpr_localizer pipeline", daemon=True)
        self.worker.start()
        self.get_logger().info(f"localising against {len(self.localizer.bundle)} map images with "
                               f"{self.p['reranker']} on {self.localizer.device}; images converted with "
                               f"{self.conversion}")

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _validate(p: dict) -> None:
        if not p["map_path"]:
            raise ValueError("parameter map_path is required (a map directory built with vpr-map build)")
        if p["output"] not in ("enu", "utm"):
            raise ValueError(f"parameter output must be 'enu' or 'utm', got {p['output']!r}")
        if not p["rate_hz"] > 0 or p["top_k"] < 1 or not 1 <= p["pose_matches"] <= p["top_k"]:
            raise ValueError("need rate_hz > 0, top_k >= 1 and 1 <= pose_matches <= top_k")
        params = yaml.safe_load(p["reranker_params"] or "{}")
        if not isinstance(params, dict):
            raise ValueError(f"parameter reranker_params must be a YAML mapping, got {p['reranker_params']!r}")

    @staticmethod
    def _settings(p: dict, map_size: int) -> LocalizerSettings:
        return LocalizerSettings(top_k=min(p["top_k"], map_size), pose_matches=min(p["pose_matches"], map_size),
                                 gps_radius_m=p["gps_radius_m"], device=p["device"])

    def _load_localizer(self) -> tuple[Localizer, EnuFrame]:
        """The localizer of the configured map and model, and the ENU frame of the output datum."""
        bundle = MapBundle.load(self.p["map_path"])
        model = map_model(bundle, self.p["model_path"] or None)
        localizer = Localizer(bundle, model, self.p["reranker"], self._settings(self.p, len(bundle)),
                              yaml.safe_load(self.p["reranker_params"]))
        if localizer.reranker.learned and not localizer.reranker.trained:
            self.get_logger().error(f"re-ranker {self.p['reranker']} has NO TRAINED WEIGHTS: its ranking is random")
        lat, lon = self.p["datum_lat"], self.p["datum_lon"]
        if not (math.isfinite(lat) and math.isfinite(lon)):
            lat, lon = float(np.mean(bundle.table.lat)), float(np.mean(bundle.table.lon))
        return localizer, EnuFrame(lat, lon)

    # ------------------------------------------------------------------ callbacks

    def _on_image(self, msg) -> None:
        with self.lock:
            if self.latest is not None:
                self.stats["dropped"] += 1          # replaced before it was processed: latest frame wins
            self.latest = msg
            self.stats["received"] += 1
            self.wake.notify()

    def _on_lost(self, info) -> None:
        with self.lock:
            self.stats["lost"] = info.total_count   # frames the middleware lost before they reached the node

    def _on_fix(self, msg: NavSatFix) -> None:
        hint = hint_from_fix(msg)
        if hint is None:
            with self.lock:
                self.stats["bad_fixes"] += 1
            self._warn("fix", f"ignoring GPS fix with status {msg.status.status} at latitude {msg.latitude}, "
                              f"longitude {msg.longitude}: a hint needs status >= 0 and a finite "
                              "position within ±90° / ±180°")
            return
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        with self.lock:
            self.fix = (*hint, stamp)
            self.stats["fixes"] += 1

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

    def stop(self) -> None:
        """End the pipeline thread (after the frame in hand)."""
        with self.wake:
            self.running = False
            self.wake.notify()
        self.worker.join()

    def _process(self) -> None:
        with self.lock:
            msg, self.latest = self.latest, None
            fix = self.fix
        if msg is None:
            return
        start = time.perf_counter()
        try:
            rgb = self.decode(msg)
        except ImageError as exc:
            with self.lock:
                self.stats["bad"] += 1
            self._warn("image", f"skipping frame: {exc}")
            return
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        hint, gps_note = None, "no GPS fix received"
        if fix is not None and abs(stamp - fix[3]) <= self.p["gps_max_age_s"]:
            hint = fix[:3]
        elif fix is not None:
            gps_note = f"newest GPS fix is {abs(stamp - fix[3]):.1f} s from the image stamp: not used"
        try:
            result = self.localizer.localize(rgb, gps_hint=hint, stamp=stamp)
        except ValueError as exc:
            with self.lock:
                self.stats["bad"] += 1
            self._warn("localize", f"skipping frame: {exc}")
            return
        except Exception as exc:   # e.g. out of device memory: a running node reports it and goes on
            with self.lock:
                self.stats["errors"] += 1
            self._warn("error", f"skipping frame: {type(exc).__name__} while localising: {exc}")
            return
        self._publish(msg.header.stamp, result)
        with self.lock:
            self.stats["processed"] += 1
            self.stats["last_latency"] = {**result.timings, "total": time.perf_counter() - start}
            self.stats["gps"] = result.gps_note if hint is not None else gps_note

    def _publish(self, stamp, result) -> None:
        table = self.localizer.bundle.table
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
        fix.header.stamp, fix.header.frame_id = stamp, self.p["map_frame"]
        fix.status.status, fix.status.service = NavSatStatus.STATUS_FIX, NavSatStatus.SERVICE_GPS
        fix.latitude, fix.longitude, fix.altitude = result.lat, result.lon, float("nan")
        enu_cov = np.zeros((3, 3))
        enu_cov[:2, :2] = result.position_covariance
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
        with self.lock:
            stats = dict(self.stats)
        now = time.monotonic()
        since, received, processed = self._rate_base
        self._rate_base = (now, stats["received"], stats["processed"])
        status = DiagnosticStatus(name="vpr_localizer: pipeline", hardware_id=str(self.localizer.device))
        status.level = DiagnosticStatus.OK if stats["processed"] else DiagnosticStatus.WARN
        status.message = "localising" if stats["processed"] else "waiting for images"
        values = {"map_images": len(self.localizer.bundle), "reranker": self.p["reranker"],
                  "image_conversion": self.conversion, **{k: stats[k] for k in COUNTERS},
                  "received_hz": f"{(stats['received'] - received) / (now - since):.2f}",
                  "processed_hz": f"{(stats['processed'] - processed) / (now - since):.2f}",
                  "gps": stats["gps"],
                  **{f"latency_{k}_ms": f"{v * 1e3:.1f}" for k, v in stats["last_latency"].items()}}
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()   # ROS time: /clock under use_sim_time
        self.diag_pub.publish(array)

    def _on_reload(self, request, response):
        try:
            localizer, enu = self._load_localizer()
        except (MapError, OSError, ValueError) as exc:
            response.success, response.message = False, str(exc)
            return response
        with self.pipeline:
            self.localizer, self.enu = localizer, enu
        response.success, response.message = True, f"reloaded {len(localizer.bundle)} map images"
        return response

    def _on_parameters(self, params) -> SetParametersResult:
        changed = {p.name: p.value for p in params}
        static = set(changed) - {"reranker", "reranker_params", "top_k", "pose_matches", "publish_matches"}
        if static:
            return SetParametersResult(successful=False, reason=f"{sorted(static)} can only be set at start-up")
        new = {**self.p, **changed}
        try:
            self._validate(new)
            with self.pipeline:
                self.localizer.set_reranker(new["reranker"], **yaml.safe_load(new["reranker_params"]))
                self.localizer.settings = self._settings(new, len(self.localizer.bundle))
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        self.p = new
        return SetParametersResult(successful=True)

    def _warn(self, kind: str, text: str, period_s: float = 5.0) -> None:
        now = time.monotonic()
        if now - self._warned.get(kind, -1e9) >= period_s:
            self._warned[kind] = now
            self.get_logger().warning(text)


def main(args: list[str] | None = None) -> int:
    try:
        rclpy.init(args=args)
    except Exception as exc:  # rcl reports malformed --ros-args with its own exception type
        print(f"vpr_localizer: cannot start ROS: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        node = LocalizerNode()
    except (MapError, OSError, ValueError) as exc:
        print(f"vpr_localizer: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    executor = SingleThreadedExecutor()   # every callback is short: the pipeline has its own thread
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
