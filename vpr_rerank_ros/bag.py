"""ROS 2 bags of a drive, written and read with the pure-Python `rosbags` package (no ROS graph needed).

A drive bag holds camera frames (sensor_msgs/Image rgb8 or sensor_msgs/CompressedImage jpeg), GPS fixes
(sensor_msgs/NavSatFix, with NO_FIX messages and dropouts as real receivers have them) and the ground-truth
pose (geometry_msgs/PoseStamped in UTM: frame_id 'utm_<zone>', e.g. 'utm_33N', position = easting,
northing; orientation = REP-103 yaw in the grid). Storage is MCAP (.mcap) or SQLite (.db3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from .geo import UtmZone, heading_to_yaw, yaw_to_heading
from .images import decode_image_message, encode_jpeg

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
STATUS_NO_FIX, STATUS_FIX = -1, 0


@dataclass(frozen=True)
class DriveTopics:
    """Topic names of a drive bag."""

    image: str = "/camera/image_raw"
    compressed: str = "/camera/image_raw/compressed"
    gps: str = "/gps/fix"
    truth: str = "/ground_truth/pose"
    camera_frame: str = "camera"
    gps_frame: str = "gps"


@dataclass(frozen=True)
class GpsFix:
    stamp_ns: int
    lat: float
    lon: float
    alt: float = 0.0
    status: int = STATUS_FIX
    sigma_m: float = 3.0


@dataclass(frozen=True)
class TruthPose:
    stamp_ns: int
    easting: float
    northing: float
    heading_deg: float        # degrees clockwise from UTM grid north
    zone: UtmZone


@dataclass
class BagImage:
    stamp_ns: int
    rgb: np.ndarray
    frame_id: str


@dataclass
class DriveBag:
    """What `read_drive_bag` found: images, fixes and ground truth in bag order, plus counts per topic."""

    images: list = field(default_factory=list)
    fixes: list = field(default_factory=list)
    truth: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)


def _stamp(ns: int):
    return TYPESTORE.types["builtin_interfaces/msg/Time"](sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def _header(ns: int, frame_id: str):
    return TYPESTORE.types["std_msgs/msg/Header"](stamp=_stamp(ns), frame_id=frame_id)


def stamp_ns(header) -> int:
    """A std_msgs/Header's stamp in integer nanoseconds (rclpy or rosbags message)."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def image_message(rgb: np.ndarray, stamp_ns: int, frame_id: str, compressed: bool, jpeg_quality: int = 90):
    """A sensor_msgs/Image (rgb8) or sensor_msgs/CompressedImage (jpeg) for an RGB frame."""
    types = TYPESTORE.types
    if compressed:
        return types["sensor_msgs/msg/CompressedImage"](
            header=_header(stamp_ns, frame_id), format="jpeg",
            data=np.frombuffer(encode_jpeg(rgb, jpeg_quality), np.uint8))
    h, w = rgb.shape[:2]
    return types["sensor_msgs/msg/Image"](header=_header(stamp_ns, frame_id), height=h, width=w, encoding="rgb8",
                                          is_bigendian=0, step=3 * w, data=np.ascontiguousarray(rgb).reshape(-1))


def fix_message(fix: GpsFix, frame_id: str):
    types = TYPESTORE.types
    status = types["sensor_msgs/msg/NavSatStatus"](status=fix.status, service=1)
    var = fix.sigma_m ** 2
    return types["sensor_msgs/msg/NavSatFix"](
        header=_header(fix.stamp_ns, frame_id), status=status, latitude=fix.lat, longitude=fix.lon,
        altitude=fix.alt, position_covariance=np.array([var, 0, 0, 0, var, 0, 0, 0, 4 * var], np.float64),
        position_covariance_type=2)


def truth_message(pose: TruthPose):
    types = TYPESTORE.types
    yaw = float(heading_to_yaw(pose.heading_deg))
    orientation = types["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2))
    position = types["geometry_msgs/msg/Point"](x=pose.easting, y=pose.northing, z=0.0)
    return types["geometry_msgs/msg/PoseStamped"](
        header=_header(pose.stamp_ns, f"utm_{pose.zone}"),
        pose=types["geometry_msgs/msg/Pose"](position=position, orientation=orientation))


def write_drive_bag(path: str | Path, frames: Iterable[tuple[int, np.ndarray]], fixes: Iterable[GpsFix],
                    truth: Iterable[TruthPose], compressed: bool = True, storage: str = "mcap",
                    topics: DriveTopics = DriveTopics(), jpeg_quality: int = 90) -> Path:
    """Write a drive bag directory at `path` (it must not exist); frames are (stamp_ns, RGB) pairs.

    Messages are written in time order, with record time = header stamp.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {tuple(STORAGES)}, got {storage!r}")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    records = []  # (stamp, order, topic, message); messages other than images are small
    for fix in fixes:
        records.append((fix.stamp_ns, 1, "gps", fix_message(fix, topics.gps_frame)))
    for pose in truth:
        records.append((pose.stamp_ns, 2, "truth", truth_message(pose)))
    image_topic = topics.compressed if compressed else topics.image
    image_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    others = sorted(records, key=lambda r: (r[0], r[1]))
    with Writer(path, version=9, storage_plugin=STORAGES[storage]) as writer:
        connections = {
            "image": writer.add_connection(image_topic, image_type, typestore=TYPESTORE),
            "gps": writer.add_connection(topics.gps, "sensor_msgs/msg/NavSatFix", typestore=TYPESTORE),
            "truth": writer.add_connection(topics.truth, "geometry_msgs/msg/PoseStamped", typestore=TYPESTORE),
        }
        i = 0
        for stamp, rgb in frames:
            while i < len(others) and others[i][0] <= stamp:
                _write(writer, connections, others[i])
                i += 1
            msg = image_message(rgb, stamp, topics.camera_frame, compressed, jpeg_quality)
            _write(writer, connections, (stamp, 0, "image", msg))
        for record in others[i:]:
            _write(writer, connections, record)
    return path


def _write(writer, connections, record) -> None:
    stamp, _, kind, msg = record
    conn = connections[kind]
    writer.write(conn, stamp, TYPESTORE.serialize_cdr(msg, conn.msgtype))


def iter_bag(path: str | Path, topics: Iterable[str] | None = None) -> Iterator[tuple[str, str, int, bytes]]:
    """(topic, message type, record time ns, serialized CDR bytes) in time order, optionally only some topics."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such bag")
    with Reader(path) as reader:
        wanted = [c for c in reader.connections if topics is None or c.topic in set(topics)]
        for conn, stamp, raw in reader.messages(connections=wanted):
            yield conn.topic, conn.msgtype, int(stamp), bytes(raw)


def read_drive_bag(path: str | Path, topics: DriveTopics = DriveTopics(), decode_images: bool = True) -> DriveBag:
    """Everything on a drive bag's camera, GPS and ground-truth topics (images decoded to RGB)."""
    drive = DriveBag()
    names = {topics.image, topics.compressed, topics.gps, topics.truth}
    for topic, msgtype, _, raw in iter_bag(path, names):
        drive.counts[topic] = drive.counts.get(topic, 0) + 1
        msg = TYPESTORE.deserialize_cdr(raw, msgtype)
        if topic in (topics.image, topics.compressed):
            rgb = decode_image_message(msg) if decode_images else None
            drive.images.append(BagImage(stamp_ns(msg.header), rgb, msg.header.frame_id))
        elif topic == topics.gps:
            cov = float(msg.position_covariance[0])
            drive.fixes.append(GpsFix(stamp_ns(msg.header), float(msg.latitude), float(msg.longitude),
                                      float(msg.altitude), int(msg.status.status),
                                      math.sqrt(cov) if cov > 0 else float("nan")))
        else:
            q = msg.pose.orientation
            yaw = 2 * math.atan2(q.z, q.w)
            zone = UtmZone.parse(msg.header.frame_id.removeprefix("utm_"))
            drive.truth.append(TruthPose(stamp_ns(msg.header), float(msg.pose.position.x), float(msg.pose.position.y),
                                         float(yaw_to_heading(yaw)), zone))
    return drive
