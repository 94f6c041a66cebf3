"""ROS 2 drive bags: round trips in both storage formats, a synthetic drive, and image decoding."""
import math

import numpy as np
import pytest

from vpr_rerank_ros.bag import (STATUS_FIX, STATUS_NO_FIX, GpsFix, TruthPose, iter_bag, read_drive_bag,
                                write_drive_bag)
from vpr_rerank_ros.datasets.synth_town import BagConfig, SynthConfig, plan_bag_drive, plan_city, write_bag
from vpr_rerank_ros.datasets.town import TownConfig
from vpr_rerank_ros.geo import UtmZone, latlon_to_utm
from vpr_rerank_ros.images import ImageError, decode_raw

ZONE = UtmZone(19, south=True)


def sample_drive(n=5):
    yy, xx = np.mgrid[0:24, 0:32]
    frames = [(1_000_000_000 + i * 200_000_000,   # smooth gradients, which JPEG keeps well
               np.stack([xx * 8, yy * 10, (xx + yy + 20 * i) % 256], axis=-1).astype(np.uint8)) for i in range(n)]
    fixes = [GpsFix(1_000_000_000 + i * 1_000_000_000, -33.4 + 1e-5 * i, -70.6, 500.0, STATUS_FIX, 2.5)
             for i in range(2)] + [GpsFix(3_500_000_000, math.nan, math.nan, math.nan, STATUS_NO_FIX, 2.5)]
    truth = [TruthPose(t, 350000.0 + i, 6300000.0, 10.0 * i, ZONE) for i, (t, _) in enumerate(frames)]
    return frames, fixes, truth


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
@pytest.mark.parametrize("compressed", [False, True])
def test_round_trip(tmp_path, storage, compressed):
    frames, fixes, truth = sample_drive()
    path = write_drive_bag(tmp_path / "drive", frames, fixes, truth, compressed=compressed, storage=storage)
    assert list(path.glob("*.mcap" if storage == "mcap" else "*.db3"))
    drive = read_drive_bag(path)
    image_topic = "/camera/image_raw/compressed" if compressed else "/camera/image_raw"
    assert drive.counts == {image_topic: 5, "/gps/fix": 3, "/ground_truth/pose": 5}
    assert [im.stamp_ns for im in drive.images] == [t for t, _ in frames]
    for got, (_, rgb) in zip(drive.images, frames):
        if compressed:
            assert got.rgb.shape == rgb.shape and np.abs(got.rgb.astype(int) - rgb).mean() < 4
        else:
            assert np.array_equal(got.rgb, rgb)
    assert drive.fixes[0] == fixes[0] and drive.fixes[2].status == STATUS_NO_FIX and math.isnan(drive.fixes[2].lat)
    for got, want in zip(drive.truth, truth):
        assert got.zone == ZONE and got.stamp_ns == want.stamp_ns and got.easting == want.easting
        assert abs((got.heading_deg - want.heading_deg + 180) % 360 - 180) < 1e-9
    stamps = [stamp for _, _, stamp, _ in iter_bag(path)]
    assert stamps == sorted(stamps)                         # written in time order


def test_errors(tmp_path):
    frames, fixes, truth = sample_drive(1)
    write_drive_bag(tmp_path / "d", frames, fixes, truth)
    with pytest.raises(FileExistsError):
        write_drive_bag(tmp_path / "d", frames, fixes, truth)
    with pytest.raises(ValueError, match="storage"):
        write_drive_bag(tmp_path / "e", frames, fixes, truth, storage="rosbag1")
    with pytest.raises(FileNotFoundError):
        read_drive_bag(tmp_path / "missing")


def test_synthetic_drive_bag(tmp_path):
    config = SynthConfig(town=TownConfig(blocks_x=2, blocks_y=2), width=64, height=48)
    bag = BagConfig(length_m=80.0, fps=4.0, speed_mps=8.0, gps_noise_m=4.0, dropout_prob=0.0, no_fix_prob=0.2)
    plan = plan_city(config, 5, 0)
    shots, fixes, truth = plan_bag_drive(plan, config, bag, 5)
    assert len(shots) == len(truth) == 41                   # 80 m at 2 m per frame, both ends
    path = write_bag(tmp_path / "drive", plan, config, bag, 5)
    drive = read_drive_bag(path)
    assert len(drive.images) == len(drive.truth) == 41
    assert [im.stamp_ns for im in drive.images] == [t.stamp_ns for t in drive.truth]
    assert np.allclose(np.diff([im.stamp_ns for im in drive.images]), 250_000_000)
    assert len(drive.fixes) == 11 and any(f.status == STATUS_NO_FIX for f in drive.fixes)
    # Fixes scatter around the true track by about the configured noise.
    good = [f for f in drive.fixes if f.status == STATUS_FIX]
    e, n, _ = latlon_to_utm([f.lat for f in good], [f.lon for f in good], plan.zone)
    t = np.array([tr.stamp_ns for tr in drive.truth])
    err = np.hypot(e - np.interp([f.stamp_ns for f in good], t, [tr.easting for tr in drive.truth]),
                   n - np.interp([f.stamp_ns for f in good], t, [tr.northing for tr in drive.truth]))
    assert 0.5 < np.median(err) < 15.0


def test_a_drive_under_a_chosen_condition_keeps_its_route():
    """--bag-time/--bag-weather/--bag-season fix the drive's condition; the route, stamps and GPS stay the
    drawn drive's, so the same drive can be replayed at night and by day."""
    config = SynthConfig(town=TownConfig(blocks_x=2, blocks_y=2), width=64, height=48)
    plan = plan_city(config, 5, 0)
    drawn = plan_bag_drive(plan, config, BagConfig(length_m=40.0), 5)
    night = plan_bag_drive(plan, config, BagConfig(length_m=40.0, time="night", weather="fog"), 5)
    condition = night[0][0].condition
    assert (condition.time, condition.weather, condition.season) == ("night", "fog", drawn[0][0].condition.season)
    assert [(s.x, s.y, s.heading) for s in night[0]] == [(s.x, s.y, s.heading) for s in drawn[0]]
    assert repr(night[1:]) == repr(drawn[1:])             # GPS fixes (NaN when no fix) and truth
    with pytest.raises(ValueError, match="time must be one of"):
        plan_bag_drive(plan, config, BagConfig(time="noon"), 5)


def test_decode_raw_encodings_and_errors():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(decode_raw("rgb8", 2, 3, 9, rgb.tobytes()), rgb)
    assert np.array_equal(decode_raw("bgr8", 2, 3, 9, rgb[..., ::-1].tobytes()), rgb)
    padded = np.zeros((2, 12), np.uint8)
    padded[:, :9] = rgb.reshape(2, 9)
    assert np.array_equal(decode_raw("rgb8", 2, 3, 12, padded.tobytes()), rgb)   # row padding
    mono = decode_raw("mono8", 2, 3, 3, bytes(range(6)))
    assert mono.shape == (2, 3, 3) and (mono[..., 0] == mono[..., 2]).all()
    with pytest.raises(ImageError, match="unsupported encoding"):
        decode_raw("yuv422", 2, 3, 6, bytes(12))
    with pytest.raises(ImageError, match="bytes"):
        decode_raw("rgb8", 2, 3, 9, bytes(10))
    with pytest.raises(ImageError, match="step"):
        decode_raw("rgb8", 2, 3, 4, bytes(8))
    with pytest.raises(ImageError, match="empty"):
        decode_raw("rgb8", 0, 3, 9, b"")


def write_topics(path, connections):
    """A bag with the topics of `connections` (topic -> type) and no messages: enough for topic selection."""
    from vpr_rerank_ros.bag import write_messages

    return write_messages(path, connections, [])


def test_select_topics_by_type_and_name(tmp_path):
    from vpr_rerank_ros.bag import ReplayTopics, select_topics

    image, compressed, fix = "sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "sensor_msgs/msg/NavSatFix"
    one = write_topics(tmp_path / "one", {"/front/image": image, "/ublox/fix": fix, "/rtk/truth": fix,
                                          "/odom_other": "std_msgs/msg/String"})
    assert select_topics(one) == ReplayTopics("/front/image", image, "/ublox/fix", "/rtk/truth", fix)
    # Names given by the user override the rule: the receiver's fix as truth, no GPS left.
    assert select_topics(one, truth="/ublox/fix", gps="/rtk/truth").truth == "/ublox/fix"
    two = write_topics(tmp_path / "two", {"/a/image": image, "/b/compressed": compressed, "/fix1": fix,
                                          "/fix2": fix, "/odom": "nav_msgs/msg/Odometry"})
    with pytest.raises(ValueError, match=r"several topics could be the camera: /a/image \(sensor_msgs/msg/Image, 0 "
                                         r"messages\), /b/compressed .*; choose one with --image-topic"):
        select_topics(two)
    with pytest.raises(ValueError, match="several topics could be the GPS: /fix1 .*/fix2 .*--gps-topic"):
        select_topics(two, image="/b/compressed")
    chosen = select_topics(two, image="/b/compressed", gps="/fix2")
    assert chosen.compressed and chosen.truth == "/odom" and chosen.truth_type == "nav_msgs/msg/Odometry"
    with pytest.raises(ValueError, match=r"no topic /nope \(--image-topic\); the bag has /a/image "
                                         r"\(sensor_msgs/msg/Image, 0 messages\), /b/compressed"):
        select_topics(two, image="/nope")
    with pytest.raises(ValueError, match="--truth-topic /a/image is a sensor_msgs/msg/Image; the ground truth must be"):
        select_topics(two, image="/b/compressed", gps="/fix1", truth="/a/image")
    none = write_topics(tmp_path / "none", {"/fix": fix})
    with pytest.raises(ValueError, match=r"no camera topic .*; the bag has /fix \(sensor_msgs/msg/NavSatFix"):
        select_topics(none)


def test_synthetic_bag_topics_are_found_by_type(tmp_path):
    from vpr_rerank_ros.bag import select_topics

    frames, fixes, truth = sample_drive(2)
    path = write_drive_bag(tmp_path / "d", frames, fixes, truth)
    chosen = select_topics(path)
    assert (chosen.image, chosen.gps, chosen.truth) == ("/camera/image_raw/compressed", "/gps/fix",
                                                       "/ground_truth/pose")
