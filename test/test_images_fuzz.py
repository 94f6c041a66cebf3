"""Fuzzing the decoding the node applies to every incoming message: whatever the fields of a
sensor_msgs/Image or CompressedImage hold, the result is an RGB image or an ImageError, nothing else."""
import numpy as np
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
