"""A drive bag from geotagged photos (a folder with EXIF GPS, or the map builder's CSV), so a user's own image
sequence can be replayed and scored like a drive (`vpr-replay make-bag`, docs/replay.md).

The photos become sensor_msgs/CompressedImage messages holding their file bytes as they are, one every
1/rate seconds in the source's order; their positions become the ground truth as sensor_msgs/NavSatFix on
/ground_truth/fix (found by `bag.select_topics` by its name), and optionally a simulated receiver's fixes on
/gps/fix: the same positions plus Gaussian noise of `gps_noise_m` metres per axis.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bag import FIX_TYPE, IMAGE_TYPES, STATUS_FIX, DriveTopics, GpsFix, compressed_message, fix_message, \
    write_messages
from .datasets.geotagged import ImageSet
from .geo import utm_to_latlon

TOPICS = DriveTopics(truth="/ground_truth/fix")
FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}   # CompressedImage.format by file suffix
START_NS = 1_000_000_000        # stamp of the first photo
TRUTH_SIGMA_M = 0.05            # the truth's stated 1-sigma (RTK-like)


def photos_to_bag(images: ImageSet, out: str | Path, rate_hz: float = 5.0, gps_noise_m: float | None = None,
                  seed: int = 0, storage: str = "mcap") -> Path:
    """Write the photos of `images` (`geotagged.from_folder` / `from_csv`) as a bag at `out` (must not exist)."""
    if not rate_hz > 0:
        raise ValueError(f"rate must be positive, got {rate_hz}")
    if gps_noise_m is not None and not gps_noise_m >= 0:
        raise ValueError(f"GPS noise must be 0 or more metres, got {gps_noise_m}")
    paths = [Path(p) for _, p in images.items]
    for path in paths:
        if path.suffix.lower() not in FORMATS:
            raise ValueError(f"{path}: not a .jpg/.jpeg/.png photo")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such photo")
    table = images.table
    stamps = START_NS + np.round(np.arange(len(paths)) * 1e9 / rate_hz).astype(np.int64)
    truth = list(zip(table.lat, table.lon))
    gps = None
    if gps_noise_m is not None:
        noise = np.random.default_rng(seed).normal(0.0, gps_noise_m, (len(paths), 2))
        gps = list(zip(*utm_to_latlon(table.easting + noise[:, 0], table.northing + noise[:, 1], table.zone)))

    def messages():
        for i, (stamp, path) in enumerate(zip(stamps.tolist(), paths)):
            lat, lon = truth[i]
            yield stamp, TOPICS.truth, fix_message(GpsFix(stamp, lat, lon, 0.0, STATUS_FIX, TRUTH_SIGMA_M),
                                                   "ground_truth")
            if gps is not None:
                yield stamp, TOPICS.gps, fix_message(GpsFix(stamp, *gps[i]), TOPICS.gps_frame)
            yield stamp, TOPICS.compressed, compressed_message(path.read_bytes(), FORMATS[path.suffix.lower()],
                                                               stamp, TOPICS.camera_frame)

    connections = {TOPICS.compressed: IMAGE_TYPES[1], TOPICS.truth: FIX_TYPE}
    if gps is not None:
        connections[TOPICS.gps] = FIX_TYPE
    return write_messages(out, connections, messages(), storage)
