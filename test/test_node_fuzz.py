"""Fuzzing the running vpr_localizer over DDS: hypothesis draws batches of Image / CompressedImage / NavSatFix
messages with arbitrary fields (encodings, sizes, steps, truncated or corrupted JPEG/PNG bytes, format strings,
NaN/inf/out-of-range positions, odd status and covariance values, odd stamps), each batch followed by a good
frame. One node serves the whole run; it must localise every good frame, count the bad ones in its diagnostics,
warn about them (throttled) naming the problem, and exit cleanly afterwards."""
import re
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from node_harness import diagnostics_values, image_msg, running_node, set_stamp, stamp_of, write_params

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.images import RAW_ENCODINGS, ImageError, decode_image_message, encode_jpeg, read_rgb
from vpr_rerank_ros.localizer import hint_from_fix

pytestmark = [pytest.mark.ros, pytest.mark.slow]

UINT32 = 2**32 - 1
GOOD_STAMPS = 2_000_000         # good frames are stamped from here on; fuzzed stamps stay below
SEND_SPACING_S = 0.03           # longer than the node's processing period (rate_hz 50), so most bad frames get decoded
TEXT = st.text(st.characters(codec="utf-8"), max_size=24)
STAMPS = st.tuples(st.integers(-2**31, GOOD_STAMPS - 1), st.integers(0, UINT32))


def random_bytes(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, np.uint8).tobytes()


def stamped(msg, stamp: tuple[int, int]):
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    return msg


@st.composite
def raw_images(draw):
    """sensor_msgs/Image whose encoding, height, width, step and data may or may not agree."""
    from sensor_msgs.msg import Image

    encoding = draw(st.one_of(st.sampled_from([*RAW_ENCODINGS, "rgb16", "mono16", "yuv422", "bayer_rggb8", "32FC1"]),
                              TEXT))
    channels = RAW_ENCODINGS.get(encoding, (3, None))[0]
    height = draw(st.one_of(st.integers(0, 40), st.integers(0, UINT32)))
    width = draw(st.one_of(st.integers(0, 40), st.integers(0, UINT32)))
    row = min(width * channels, UINT32)
    step = draw(st.one_of(st.just(row), st.integers(max(0, row - 2), min(row + 4, UINT32)), st.integers(0, UINT32)))
    consistent = step * height if step * height <= 20_000 else 0
    size = draw(st.one_of(st.just(consistent), st.integers(max(0, consistent - 3), consistent + 3),
                          st.integers(0, 4000)))
    msg = Image(encoding=encoding, height=height, width=width, step=step, is_bigendian=draw(st.integers(0, 255)))
    msg.header.frame_id, msg.data = draw(TEXT), random_bytes(draw(st.integers(0, UINT32)), size)
    return stamped(msg, draw(STAMPS))


@st.composite
def compressed_images(draw, sources: dict[str, bytes]):
    """sensor_msgs/CompressedImage: real JPEG/PNG bytes, truncated, with bytes overwritten and garbage appended,
    or garbage alone, under any format string."""
    from sensor_msgs.msg import CompressedImage

    data = bytearray(sources[draw(st.sampled_from(sorted(sources)))])
    data = data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    for position, value in draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4)):
        if data:
            data[position % len(data)] = value
    data += draw(st.binary(max_size=200))
    fmt = draw(st.one_of(st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8", "16UC1; compressedDepth png"]),
                         TEXT))
    msg = CompressedImage(format=fmt, data=bytes(data))
    msg.header.frame_id = draw(TEXT)
    return stamped(msg, draw(STAMPS))


@st.composite
def fixes(draw):
    """sensor_msgs/NavSatFix with any status, service, position, covariance and covariance type."""
    from sensor_msgs.msg import NavSatFix

    msg = NavSatFix(latitude=draw(st.floats()), longitude=draw(st.floats()), altitude=draw(st.floats()),
                    position_covariance=draw(st.lists(st.floats(), min_size=9, max_size=9)),
                    position_covariance_type=draw(st.integers(0, 255)))
    msg.status.status, msg.status.service = draw(st.integers(-128, 127)), draw(st.integers(0, 65535))
    return stamped(msg, draw(STAMPS))


def decodable(msg) -> bool:
    try:
        decode_image_message(msg)
    except ImageError:
        return False
    return True


def usable_fix(msg) -> bool:
    hint = hint_from_fix(msg)
    return hint is not None and abs(hint[0]) <= 90 and abs(hint[1]) <= 180


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "compressed"])
def test_node_survives_fuzzed_messages(synthetic_map, tmp_path, compressed):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, NavSatFix

    root, report = synthetic_map
    query, _ = load_city(root / "msls", "synth0")
    rgb = read_rgb(query.image_path(0))
    if compressed:
        import cv2

        good_msg = CompressedImage(format="jpeg", data=encode_jpeg(rgb))
        small = np.ascontiguousarray(rgb[::5, ::5])
        sources = {"jpeg": encode_jpeg(small), "png": cv2.imencode(".png", small)[1].tobytes(),
                   "garbage": random_bytes(0, 600), "empty": b""}
        frames = compressed_images(sources)
    else:
        good_msg, frames = image_msg(rgb, 0), raw_images()
    params = write_params(tmp_path / "params.yaml", map_path=str(report.bundle.root), top_k=20, rate_hz=50.0,
                          compressed=compressed)
    with running_node(params, tmp_path) as (node, client):
        poses = client.collect(PoseWithCovarianceStamped, "/vpr_localizer/pose", 100)
        diagnostics = client.collect(DiagnosticArray, "/diagnostics", 10)
        images = client.node.create_publisher(type(good_msg), "/image/compressed" if compressed else "/image",
                                              qos_profile_sensor_data)
        gps = client.node.create_publisher(NavSatFix, "/gps/fix", qos_profile_sensor_data)
        sent = {"images": 0, "undecodable": 0, "fixes": 0, "unusable_fixes": 0, "good": 0}

        def localise_good_frame(context: str) -> None:
            """Publish a good frame and wait for its pose (re-sent every 2 s: delivery is best effort)."""
            stamp = GOOD_STAMPS + sent["good"]
            sent["good"] += 1
            set_stamp(good_msg, stamp)
            for _ in range(8):
                images.publish(good_msg)
                sent["images"] += 1
                if client.spin_until(lambda: any(stamp_of(p) == stamp for p in poses), timeout=2.0):
                    return
                assert node.alive(), f"the node died after {context}:\n{node.log()}"
            pytest.fail(f"no pose for a good frame after {context}:\n{node.log()}")

        @settings(max_examples=50, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(batch=st.lists(st.one_of(frames, fixes()), min_size=1, max_size=8))
        def send_batch(batch):
            for msg in batch:
                if isinstance(msg, NavSatFix):
                    gps.publish(msg)
                    sent["fixes"] += 1
                    sent["unusable_fixes"] += not usable_fix(msg)
                else:
                    images.publish(msg)
                    sent["images"] += 1
                    sent["undecodable"] += not decodable(msg)
                client.spin_for(SEND_SPACING_S)
            localise_good_frame(f"the batch {batch!r}"[:2000])

        start = time.monotonic()
        client.wait_for_subscriber(images, node)
        localise_good_frame("start-up")
        send_batch()
        client.next_message(diagnostics)
        assert node.alive(), node.log()
    duration = time.monotonic() - start
    log = node.log()
    values = {k: int(v) for k, v in diagnostics_values(diagnostics[-1]).items() if k in (
        "received", "processed", "dropped", "bad", "fixes", "bad_fixes")}
    assert sent["undecodable"] >= 10 and sent["unusable_fixes"] >= 10, sent      # the fuzz did send bad input
    assert values["received"] <= sent["images"]
    assert values["received"] == values["processed"] + values["dropped"] + values["bad"], values
    assert sent["undecodable"] * 0.3 <= values["bad"] <= sent["undecodable"], (values, sent)
    assert values["processed"] >= sent["good"]
    assert 1 <= values["bad_fixes"] <= sent["unusable_fixes"], (values, sent)
    # Throttled: at most one warning of a kind per 5 s, each naming the problem.
    frame_warnings = re.findall(r"skipping frame: (.*)", log)
    fix_warnings = re.findall(r"ignoring GPS fix with status (.*)", log)
    assert 1 <= len(frame_warnings) <= duration / 5 + 1, frame_warnings
    assert 1 <= len(fix_warnings) <= duration / 5 + 1, fix_warnings
    problems = ("unsupported encoding", "data has", "step", "empty image", "not a decodable image")
    assert all(any(p in w for p in problems) for w in frame_warnings), frame_warnings
    assert "Traceback" not in log, log
