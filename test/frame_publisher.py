"""A camera driver in its own process, for the node's QoS tests: publishes 1920x1080 rgb8 sensor_msgs/Image frames
(6.2 MB) on /image with the given reliability (keep last 5, as camera drivers do) at up to `rate` Hz for
`seconds` once the node has subscribed. Prints its progress, one line each: `subscribed` (or `no subscriber`, and
exits 1), then `sent N` once the last frame is out.

    python frame_publisher.py reliable|best_effort SECONDS RATE IMAGE
"""
import sys
import time

import cv2
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from vpr_rerank_ros.images import read_rgb

WIDTH, HEIGHT = 1920, 1080


def main(reliability: str, seconds: float, rate: float, image_path: str) -> None:
    rclpy.init()
    node = rclpy.create_node("frame_publisher")
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable"
                     else ReliabilityPolicy.BEST_EFFORT)
    publisher = node.create_publisher(Image, "/image", qos)
    rgb = cv2.resize(read_rgb(image_path), (WIDTH, HEIGHT))   # a town frame at full size
    msg = Image(height=HEIGHT, width=WIDTH, encoding="rgb8", step=WIDTH * 3, data=rgb.tobytes())
    end = time.monotonic() + 60
    while publisher.get_subscription_count() == 0 and time.monotonic() < end:
        time.sleep(0.1)
    if publisher.get_subscription_count() == 0:
        print("no subscriber", flush=True)
        sys.exit(1)
    print("subscribed", flush=True)
    time.sleep(0.5)   # discovery of the node's reader completes
    start, sent = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        msg.header.stamp.sec, msg.header.stamp.nanosec = 1000 + sent // 1000, (sent % 1000) * 1000
        publisher.publish(msg)
        sent += 1
        time.sleep(max(0.0, start + sent / rate - time.monotonic()))
    print(f"sent {sent}", flush=True)
    time.sleep(1.0)   # retransmissions complete before the writer goes
    node.destroy_node()
    rclpy.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
