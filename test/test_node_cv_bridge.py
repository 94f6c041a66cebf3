"""How the node converts frames: with cv_bridge when it imports and works on ROS 2 messages, else with NumPy.

A ROS 2 cv_bridge cannot be installed here (platform.md), so these tests inject a small stand-in module through
sys.modules: they show which path is chosen and that the bridge's errors become ImageError (a skipped frame),
not that the real cv_bridge converts correctly — that is exercised only on a ROS 2 installation."""
import sys
import types

import cv2
import numpy as np
import pytest

from vpr_rerank_ros.images import ImageError, decode_image_message, encode_jpeg

pytestmark = pytest.mark.ros


class FakeBridgeError(TypeError):
    """ROS 2's CvBridgeError is a TypeError too."""


class FakeBridge:
    """cv_bridge.CvBridge's two conversions, done with the NumPy decoder; records every call."""

    calls: list = []

    def imgmsg_to_cv2(self, img_msg, desired_encoding="passthrough"):
        return self._convert("imgmsg_to_cv2", img_msg, desired_encoding)

    def compressed_imgmsg_to_cv2(self, cmprs_img_msg, desired_encoding="passthrough"):
        return self._convert("compressed_imgmsg_to_cv2", cmprs_img_msg, desired_encoding)

    def _convert(self, method, msg, desired_encoding):
        self.calls.append((method, desired_encoding))
        try:
            return decode_image_message(msg)
        except ImageError as exc:
            raise FakeBridgeError(str(exc)) from exc


@pytest.fixture
def fake_cv_bridge(monkeypatch):
    module = types.ModuleType("cv_bridge")
    module.CvBridge, module.CvBridgeError = FakeBridge, FakeBridgeError
    monkeypatch.setitem(sys.modules, "cv_bridge", module)
    monkeypatch.setattr(FakeBridge, "calls", [])
    return FakeBridge


def raw_msg(rgb, encoding="rgb8"):
    from sensor_msgs.msg import Image

    return Image(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, step=rgb.shape[1] * 3,
                 data=rgb.tobytes())


RGB = np.random.default_rng(0).integers(0, 256, (6, 8, 3), np.uint8)


def test_numpy_conversion_without_cv_bridge(monkeypatch):
    from vpr_rerank_ros.node import image_decoder

    monkeypatch.setitem(sys.modules, "cv_bridge", None)    # import cv_bridge raises ImportError
    assert image_decoder() == ("numpy", decode_image_message)


def test_cv_bridge_converts_when_it_imports(fake_cv_bridge):
    from sensor_msgs.msg import CompressedImage

    from vpr_rerank_ros.node import image_decoder

    name, convert = image_decoder()
    assert name == "cv_bridge"
    assert np.array_equal(convert(raw_msg(RGB)), RGB)
    jpeg = CompressedImage(format="jpeg", data=encode_jpeg(RGB))
    assert convert(jpeg).shape == RGB.shape
    # the start-up probe, the raw frame, the JPEG: all through the bridge, all asked for rgb8
    assert fake_cv_bridge.calls == [("imgmsg_to_cv2", "rgb8")] * 2 + [("compressed_imgmsg_to_cv2", "rgb8")]


def test_cv_bridge_errors_become_image_errors(fake_cv_bridge, monkeypatch):
    from sensor_msgs.msg import CompressedImage

    from vpr_rerank_ros.node import image_decoder

    _, convert = image_decoder()
    with pytest.raises(ImageError, match="cv_bridge cannot convert it: unsupported encoding 'yuv422'"):
        convert(raw_msg(RGB, encoding="yuv422"))

    def assertion_failure(self, msg, desired_encoding="passthrough"):   # what ROS 2's bridge does on empty data
        return cv2.imdecode(np.frombuffer(msg.data, np.uint8), cv2.IMREAD_UNCHANGED)

    monkeypatch.setattr(FakeBridge, "compressed_imgmsg_to_cv2", assertion_failure)
    with pytest.raises(ImageError, match="cv_bridge cannot convert it"):
        convert(CompressedImage(format="jpeg", data=b""))
    monkeypatch.setattr(FakeBridge, "imgmsg_to_cv2", lambda self, msg, desired_encoding: RGB[..., 0])
    with pytest.raises(ImageError, match=r"cv_bridge returned no \(H, W, 3\) uint8 image but \(6, 8\)"):
        convert(raw_msg(RGB))


def test_unusable_cv_bridge_falls_back_to_numpy(fake_cv_bridge, monkeypatch):
    """ROS 1 builds of cv_bridge (Debian, PyPI) import, then fail on ROS 2 messages with other errors."""
    from vpr_rerank_ros.node import image_decoder

    def ros1_failure(self, msg, desired_encoding="passthrough"):
        raise AttributeError("'Image' object has no attribute '_type'")

    monkeypatch.setattr(FakeBridge, "imgmsg_to_cv2", ros1_failure)
    name, convert = image_decoder()
    assert name == "numpy (cv_bridge unusable: 'Image' object has no attribute '_type')"
    assert convert is decode_image_message
