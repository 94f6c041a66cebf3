"""Image decoding shared by the dataset readers, the bag reader and the node: files, raw
sensor_msgs/Image fields and compressed bytes to RGB arrays, with errors that name the problem."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image as PilImage

# Compressed images declaring more pixels are refused before decoding: a few hundred bytes of JPEG can
# declare 30000 x 30000 pixels, which takes seconds and gigabytes to decode.
MAX_PIXELS = 64_000_000

# Raw encodings we accept -> (channels, conversion to RGB or None).
RAW_ENCODINGS = {
    "rgb8": (3, None),
    "bgr8": (3, cv2.COLOR_BGR2RGB),
    "rgba8": (4, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, cv2.COLOR_BGRA2RGB),
    "mono8": (1, cv2.COLOR_GRAY2RGB),
}


class ImageError(ValueError):
    """An image cannot be decoded; the message says why."""


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an image file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        return decode_compressed(data)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from exc


def decode_compressed(data: bytes | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB from JPEG/PNG bytes."""
    buffer = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.astype(np.uint8, copy=False)
    if buffer.size == 0:
        raise ImageError("empty image data")
    _check_declared_size(buffer)
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"not a decodable image ({buffer.size} bytes)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _check_declared_size(buffer: np.ndarray) -> None:
    """Refuse an image whose header declares more than MAX_PIXELS (Pillow reads only the header to tell);
    a format Pillow does not recognise is left to OpenCV."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PilImage.DecompressionBombWarning)
            with PilImage.open(io.BytesIO(buffer.tobytes())) as image:
                width, height = image.size
    except PilImage.DecompressionBombError as exc:
        raise ImageError(f"declares too many pixels: {exc}") from exc
    except Exception:   # Pillow raises many types for headers it cannot read; OpenCV gives the verdict then
        return
    if width * height > MAX_PIXELS:
        raise ImageError(f"declares {width}x{height} pixels, more than the {MAX_PIXELS / 1e6:.0f} MP accepted")


def decode_raw(encoding: str, height: int, width: int, step: int, data) -> np.ndarray:
    """(H, W, 3) uint8 RGB from the fields of a sensor_msgs/Image (zero-copy view where possible)."""
    if encoding not in RAW_ENCODINGS:
        raise ImageError(f"unsupported encoding {encoding!r} (supported: {', '.join(RAW_ENCODINGS)})")
    if height <= 0 or width <= 0:
        raise ImageError(f"empty image ({width}x{height})")
    channels, conversion = RAW_ENCODINGS[encoding]
    buffer = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if step < width * channels:
        raise ImageError(f"step {step} is smaller than width {width} x {channels} bytes per pixel")
    if buffer.size != step * height:
        raise ImageError(f"data has {buffer.size} bytes, step x height = {step * height}")
    image = buffer.reshape(height, step)[:, :width * channels].reshape(height, width, channels)
    if conversion is None:
        return image
    return cv2.cvtColor(np.ascontiguousarray(image), conversion)


def decode_image_message(msg) -> np.ndarray:
    """RGB array of a sensor_msgs/Image or CompressedImage (rclpy or rosbags message: only the fields are read)."""
    if hasattr(msg, "format"):
        return decode_compressed(msg.data)
    return decode_raw(msg.encoding, msg.height, msg.width, msg.step, msg.data)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB array."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return data.tobytes()
