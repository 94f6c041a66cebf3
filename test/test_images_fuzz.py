"""Fuzzing the decoding the node applies to every incoming message: whatever the fields of a
sensor_msgs/Image or CompressedImage hold, the result is an RGB image or an ImageError, nothing else."""
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpr_rerank_ros.images import RAW_ENCODINGS, ImageError, decode_compressed, decode_raw, encode_jpeg

ENCODINGS = st.one_of(st.sampled_from(sorted(RAW_ENCODINGS)), st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(encoding=ENCODINGS, height=st.integers(-3, 40), width=st.integers(-3, 40), step=st.integers(-5, 200),
       data=st.binary(max_size=4000))
def test_raw_image_fields(encoding, height, width, step, data):
    try:
        rgb = decode_raw(encoding, height, width, step, data)
    except ImageError:
        return
    assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), cut=st.integers(0, 2000))
def test_compressed_bytes(data, cut):
    # Random bytes, and the head of a real JPEG followed by random bytes (a truncated or corrupted frame).
    jpeg = encode_jpeg(np.full((24, 32, 3), 120, np.uint8))
    for payload in (data, jpeg[:cut] + data):
        try:
            rgb = decode_compressed(payload)
        except ImageError:
            continue
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


def test_compressed_images_declaring_huge_sizes_are_refused_before_decoding():
    """A few hundred bytes of JPEG or PNG can declare 30000 x 30000 pixels (seconds and gigabytes to decode)."""

    jpeg = bytearray(encode_jpeg(np.zeros((16, 16, 3), np.uint8)))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = (30000).to_bytes(2, "big") * 2                 # SOF0: height, width
    png = bytearray(cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    png[16:24] = (9000).to_bytes(4, "big") * 2                             # IHDR: width, height
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")          # and its CRC
    for data in (jpeg, png):
        with pytest.raises(ImageError, match="declares"):
            decode_compressed(bytes(data))
    assert decode_compressed(encode_jpeg(np.zeros((48, 64, 3), np.uint8))).shape == (48, 64, 3)
