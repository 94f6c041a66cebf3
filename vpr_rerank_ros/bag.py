"""ROS 2 bags of a drive, written and read with the pure-Python `rosbags` package (no ROS graph needed).

A drive bag holds camera frames (sensor_msgs/Image rgb8 or sensor_msgs/CompressedImage jpeg), GPS fixes
(sensor_msgs/NavSatFix, with NO_FIX messages and dropouts as real receivers have them) and the ground-truth
pose (geometry_msgs/PoseStamped in UTM: frame_id 'utm_<zone>', e.g. 'utm_33N', position = easting,
northing; orientation = REP-103 yaw in the grid). Storage is MCAP (.mcap) or SQLite (.db3).

Bags of other drives name their topics freely: `select_topics` finds the camera, GPS and ground-truth topics by
message type (or checks the names a user gave), the one place that decides which topic plays which role.
"""
from __future__ import annotations

import heapq
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
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
FIX_TYPE = "sensor_msgs/msg/NavSatFix"
POSE_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/PoseWithCovarianceStamped", "nav_msgs/msg/Odometry")
TRUTH_TYPES = (FIX_TYPE, *POSE_TYPES)


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


def compressed_message(data: bytes, image_format: str, stamp_ns: int, frame_id: str):
    """A sensor_msgs/CompressedImage holding already encoded bytes ('jpeg' or 'png'), as they are."""
    return TYPESTORE.types["sensor_msgs/msg/CompressedImage"](
        header=_header(stamp_ns, frame_id), format=image_format, data=np.frombuffer(data, np.uint8))


def image_message(rgb: np.ndarray, stamp_ns: int, frame_id: str, compressed: bool, jpeg_quality: int = 90):
    """A sensor_msgs/Image (rgb8) or sensor_msgs/CompressedImage (jpeg) for an RGB frame."""
    types = TYPESTORE.types
    if compressed:
        return compressed_message(encode_jpeg(rgb, jpeg_quality), "jpeg", stamp_ns, frame_id)
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
    """Write a drive bag directory at `path` (it must not exist); frames are (stamp_ns, RGB) pairs in time order.

    Messages are written in time order (at equal stamps GPS and truth before the image), record time = stamp.
    """
    image_topic = topics.compressed if compressed else topics.image
    image_type = IMAGE_TYPES[1] if compressed else IMAGE_TYPES[0]
    images = ((stamp, image_topic, image_message(rgb, stamp, topics.camera_frame, compressed, jpeg_quality))
              for stamp, rgb in frames)
    others = sorted([(f.stamp_ns, topics.gps, fix_message(f, topics.gps_frame)) for f in fixes]
                    + [(t.stamp_ns, topics.truth, truth_message(t)) for t in truth], key=lambda r: r[0])
    connections = {image_topic: image_type, topics.gps: FIX_TYPE, topics.truth: POSE_TYPES[0]}
    return write_messages(path, connections, heapq.merge(others, images, key=lambda r: r[0]), storage)


def write_messages(path: str | Path, connections: dict[str, str], messages: Iterable[tuple[int, str, object]],
                   storage: str = "mcap") -> Path:
    """Write a bag directory at `path` (it must not exist): `connections` maps topic -> message type, `messages`
    are (stamp_ns, topic, message) in time order, written with record time = stamp."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {tuple(STORAGES)}, got {storage!r}")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    with Writer(path, version=9, storage_plugin=STORAGES[storage]) as writer:
        added = {topic: writer.add_connection(topic, msgtype, typestore=TYPESTORE)
                 for topic, msgtype in connections.items()}
        for stamp, topic, msg in messages:
            conn = added[topic]
            writer.write(conn, stamp, TYPESTORE.serialize_cdr(msg, conn.msgtype))
    return path


def iter_bag(path: str | Path, topics: Iterable[str] | None = None) -> Iterator[tuple[str, str, int, bytes]]:
    """(topic, message type, record time ns, serialized CDR bytes) in time order, optionally only some topics."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such bag")
    with Reader(path) as reader:
        wanted = [c for c in reader.connections if topics is None or c.topic in set(topics)]
        for conn, stamp, raw in reader.messages(connections=wanted):
            yield conn.topic, conn.msgtype, int(stamp), bytes(raw)


def bag_topics(path: str | Path) -> dict[str, tuple[str, int]]:
    """A bag's topics: name -> (message type, message count)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such bag")
    with Reader(path) as reader:
        return {name: (info.msgtype, info.msgcount) for name, info in reader.topics.items()}


@dataclass(frozen=True)
class ReplayTopics:
    """The topics a replay reads: the camera, and the GPS and ground truth when the bag has them."""

    image: str
    image_type: str
    gps: str | None = None
    truth: str | None = None
    truth_type: str | None = None

    @property
    def compressed(self) -> bool:
        return self.image_type == IMAGE_TYPES[1]


def select_topics(path: str | Path, image: str | None = None, gps: str | None = None,
                  truth: str | None = None) -> ReplayTopics:
    """The camera, GPS and ground-truth topics of a bag: the names given, checked, else the one topic of the
    role's types. GPS: a NavSatFix topic; ground truth: a PoseStamped, PoseWithCovarianceStamped or Odometry
    topic, or a NavSatFix topic with 'truth' in its name (so a receiver's fix and an RTK truth, both NavSatFix,
    are told apart by name; other names need --gps-topic/--truth-topic). A ValueError in one line when a name
    is not in the bag, has a type the role cannot use, or when several topics qualify."""
    topics = bag_topics(path)
    fixes = [t for t, (msgtype, _) in topics.items() if msgtype == FIX_TYPE]
    camera = _pick(path, topics, "camera", "--image-topic", IMAGE_TYPES, image,
                   [t for t, (msgtype, _) in topics.items() if msgtype in IMAGE_TYPES])
    gps = _pick(path, topics, "GPS", "--gps-topic", (FIX_TYPE,), gps,
                [t for t in fixes if "truth" not in t and t != truth])
    truth = _pick(path, topics, "ground truth", "--truth-topic", TRUTH_TYPES, truth,
                  [t for t, (msgtype, _) in topics.items() if msgtype in POSE_TYPES]
                  + [t for t in fixes if "truth" in t and t != gps])
    if camera is None:
        raise ValueError(f"{path}: no camera topic ({' or '.join(IMAGE_TYPES)}); the bag has {_listing(topics)}")
    return ReplayTopics(camera, topics[camera][0], gps, truth, topics[truth][0] if truth else None)


def _pick(path, topics: dict, role: str, flag: str, types: tuple, name: str | None, candidates: list) -> str | None:
    """`name` when the bag has it with one of `types`, else the only candidate (None when there is none)."""
    if name is not None:
        if name not in topics:
            raise ValueError(f"{path}: no topic {name} ({flag}); the bag has {_listing(topics)}")
        if topics[name][0] not in types:
            raise ValueError(f"{path}: {flag} {name} is a {topics[name][0]}; the {role} must be one of "
                             f"{', '.join(types)}")
        return name
    if len(candidates) > 1:
        raise ValueError(f"{path}: several topics could be the {role}: "
                         f"{_listing({t: topics[t] for t in candidates})}; choose one with {flag}")
    return candidates[0] if candidates else None


def _listing(topics: dict) -> str:
    return ", ".join(f"{t} ({msgtype}, {count} messages)" for t, (msgtype, count) in sorted(topics.items())) \
        or "no topics"


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
