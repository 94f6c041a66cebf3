"""Offline bag replay: a query drive through the shared synthetic town, localised and scored; drives of any
shape (other topic names, each ground-truth type and frame, truth at another rate, no truth) and photos made
into a bag."""
import csv
import math

import numpy as np
import pytest

from conftest import SYNTH_SEED, synth_config, write_photos_csv
from vpr_rerank_ros.bag import (FIX_TYPE, IMAGE_TYPES, STATUS_FIX, TYPESTORE, GpsFix, fix_message, image_message,
                                write_messages)
from vpr_rerank_ros.cli import replay_main
from vpr_rerank_ros.datasets.synth_town import BagConfig, plan_city, write_bag
from vpr_rerank_ros.geo import EnuFrame, UtmZone, latlon_to_utm, utm_to_latlon
from vpr_rerank_ros.truth import TruthFrame, read_truth


def test_replay_scores_a_drive(synthetic_map, tmp_path, capsys):
    _, report = synthetic_map
    config = synth_config()
    bag = write_bag(tmp_path / "drive", plan_city(config, SYNTH_SEED, 0), config,
                    BagConfig(length_m=60.0, fps=2.0, gps_noise_m=4.0, no_fix_prob=0.2, storage="sqlite3"), SYNTH_SEED)
    rows_csv = tmp_path / "frames.csv"
    assert replay_main([str(bag), "--map", str(report.bundle.root), "--top-k", "20", "--csv", str(rows_csv)]) == 0
    out = capsys.readouterr().out
    assert "frames localised: 16" in out and "recall (25 m): recall@1" in out and "latency (median ms)" in out
    rows = list(csv.DictReader(open(rows_csv)))
    assert len(rows) == 16
    errors = sorted(float(r["error_m"]) for r in rows)
    assert errors[len(errors) // 2] < 25.0                        # median error with the offline descriptor
    assert sum(r["gps_used"] == "True" for r in rows) >= 8        # most frames had a fresh fix
    frames_csv, filtered_csv = tmp_path / "frames.csv", tmp_path / "filtered.csv"
    assert replay_main([str(bag), "--map", str(report.bundle.root), "--no-gps", "--top-k", "20",
                        "--csv", str(frames_csv)]) == 0
    out = capsys.readouterr().out
    assert "GPS hint used 0" in out and "calibration: " in out and "mean NEES" in out
    # The temporal filter: every frame still scored, with its own estimates (the first one is the frame's own).
    assert replay_main([str(bag), "--map", str(report.bundle.root), "--no-gps", "--top-k", "20", "--filter",
                        "--csv", str(filtered_csv)]) == 0
    filtered = capsys.readouterr().out
    assert "frames localised: 16 of 16" in filtered and "calibration: " in filtered
    plain, smoothed = (list(csv.DictReader(open(path))) for path in (frames_csv, filtered_csv))
    assert plain[0]["easting"] == smoothed[0]["easting"]
    assert any(p["easting"] != s["easting"] for p, s in zip(plain[1:], smoothed[1:]))
    assert replay_main([str(tmp_path / "nope"), "--map", str(report.bundle.root)]) == 1
    assert "no such bag" in capsys.readouterr().err


# --------------------------------------------------------------------------- drives of any shape

ZONE = UtmZone(33, south=False)
DATUM = (48.2, 16.37, 0.0)
CAMERA_NS = [1_000_000_000 + i * 200_000_000 for i in range(8)]   # 5 Hz, 1.0 s .. 2.4 s
TRUTH_NS = [1_300_000_000 + i * 500_000_000 for i in range(4)]     # 2 Hz, 1.3 s .. 2.8 s: 2 frames before it


def truth_track_xy(zone=ZONE):
    """Truth positions (map-zone UTM) at TRUTH_NS: a zigzag, so linear interpolation is really tested."""
    e0, n0, _ = latlon_to_utm(DATUM[0], DATUM[1], zone)
    return np.array([(float(e0) + 7.0 * i, float(n0) + (5.0 if i % 2 else -3.0)) for i in range(len(TRUTH_NS))])


def truth_message(msgtype, frame, stamp, east, north):
    """A ground-truth message of `msgtype` for a map-zone UTM position, written in `frame` (utm_33N, map, enu)."""
    types = TYPESTORE.types
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](
        sec=stamp // 1_000_000_000, nanosec=stamp % 1_000_000_000), frame_id="utm_33N" if frame == "utm_33N" else "map")
    if msgtype == FIX_TYPE:
        lat, lon = utm_to_latlon(east, north, ZONE)
        return fix_message(GpsFix(stamp, float(lat), float(lon), 0.0, STATUS_FIX, 0.02), "rtk")
    x, y = east, north
    if frame == "enu":
        x, y, _ = (float(v) for v in EnuFrame(*DATUM).to_enu(*utm_to_latlon(east, north, ZONE)))
    orientation = types["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)
    pose = types["geometry_msgs/msg/Pose"](position=types["geometry_msgs/msg/Point"](x=x, y=y, z=0.0),
                                           orientation=orientation)
    if msgtype == "geometry_msgs/msg/PoseStamped":
        return types[msgtype](header=header, pose=pose)
    with_cov = types["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36))
    if msgtype == "geometry_msgs/msg/PoseWithCovarianceStamped":
        return types[msgtype](header=header, pose=with_cov)
    twist = types["geometry_msgs/msg/TwistWithCovariance"](
        twist=types["geometry_msgs/msg/Twist"](linear=types["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
                                               angular=types["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)),
        covariance=np.zeros(36))
    return types[msgtype](header=header, child_frame_id="base_link", pose=with_cov, twist=twist)


def write_drive(path, truth_type=None, frame="utm_33N", truth_ns=TRUTH_NS, gps=True, center=None):
    """Camera (tiny raw images) on /front/image, GPS on /ublox/fix, truth of `truth_type` on /vehicle/truth."""
    xy = truth_track_xy()
    yy, xx = np.mgrid[0:48, 0:64]
    messages = [(t, "/front/image", image_message(np.stack([xx * 4, yy * 5, (xx + yy + 30 * i) % 256], -1)
                                                  .astype(np.uint8), t, "cam", compressed=False))
                for i, t in enumerate(CAMERA_NS)]
    connections = {"/front/image": IMAGE_TYPES[0]}
    if gps:
        lat, lon = center or DATUM[:2]
        messages += [(t, "/ublox/fix", fix_message(GpsFix(t, lat, lon, 0.0, STATUS_FIX, 3.0), "gps"))
                     for t in CAMERA_NS]
        connections["/ublox/fix"] = FIX_TYPE
    if truth_type:
        messages += [(t, "/vehicle/truth", truth_message(truth_type, frame, t, *p)) for t, p in zip(truth_ns, xy)]
        connections["/vehicle/truth"] = truth_type
    return write_messages(path, connections, sorted(messages, key=lambda m: m[0]))


POSE_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/PoseWithCovarianceStamped", "nav_msgs/msg/Odometry")
TRUTH_CASES = [(FIX_TYPE, "utm_33N", TruthFrame())] + [
    (msgtype, frame, truth_frame) for msgtype in POSE_TYPES
    for frame, truth_frame in (("utm_33N", TruthFrame()), ("map", TruthFrame("utm")),
                               ("enu", TruthFrame("enu", DATUM)))]


@pytest.mark.parametrize("msgtype,frame,truth_frame", TRUTH_CASES)
def test_truth_of_each_type_interpolated_to_camera_stamps(tmp_path, msgtype, frame, truth_frame):
    path = write_drive(tmp_path / "drive", msgtype, frame)
    track = read_truth(path, "/vehicle/truth", msgtype, ZONE, truth_frame)
    xy = truth_track_xy()
    assert np.allclose(track.xy, xy, atol=1e-3) and list(track.stamps) == TRUTH_NS
    assert [track.covers(t) for t in CAMERA_NS] == [False, False] + [True] * 6
    # Camera frame at 1.8 s: 1.3 s + 0.5 s, exactly the second truth sample; at 2.0 s: 40 % of the way to the third.
    assert np.allclose(track.at(1_800_000_000), xy[1], atol=1e-3)
    assert np.allclose(track.at(2_000_000_000), xy[1] + 0.4 * (xy[2] - xy[1]), atol=1e-3)
    assert np.allclose(track.at(1_400_000_000), xy[0] + 0.2 * (xy[1] - xy[0]), atol=1e-3)


def test_truth_frames_that_cannot_be_read(tmp_path):
    path = write_drive(tmp_path / "drive", "nav_msgs/msg/Odometry", "map")
    with pytest.raises(ValueError, match="in frame 'map', not 'utm_<zone>': give --truth-frame utm"):
        read_truth(path, "/vehicle/truth", "nav_msgs/msg/Odometry", ZONE)
    with pytest.raises(ValueError, match="needs a datum"):
        TruthFrame("enu")
    with pytest.raises(ValueError, match="ground truth /front/image is a sensor_msgs/msg/Image; usable types"):
        read_truth(path, "/front/image", IMAGE_TYPES[0], ZONE)


def map_center(report):
    table = report.bundle.table
    return float(np.mean(table.lat)), float(np.mean(table.lon))


def test_replay_any_drive_with_interpolated_truth(synthetic_map, tmp_path, capsys):
    """Other topic names, Odometry in ENU at another rate: frames before the truth skipped, the rest scored
    against the truth interpolated to their stamps (converted into the map's zone)."""
    _, report = synthetic_map
    zone = report.bundle.table.zone
    center = map_center(report)
    path = write_drive(tmp_path / "drive", "nav_msgs/msg/Odometry", "enu", center=center)
    rows_csv = tmp_path / "rows.csv"
    datum = f"{DATUM[0]},{DATUM[1]}"
    assert replay_main([str(path), "--map", str(report.bundle.root), "--top-k", "5", "--truth-frame", "enu",
                        "--datum", datum, "--csv", str(rows_csv)]) == 0
    out = capsys.readouterr().out
    assert "frames localised: 6 of 6 (skipped 2, GPS hint used" in out and "error (m)" in out, out
    rows = list(csv.DictReader(open(rows_csv)))
    track = read_truth(path, "/vehicle/truth", "nav_msgs/msg/Odometry", zone, TruthFrame("enu", DATUM))
    for row in rows:
        assert np.allclose([float(row["true_easting"]), float(row["true_northing"])], track.at(int(row["stamp"])))
    assert [int(r["stamp"]) for r in rows] == CAMERA_NS[2:]


def test_replay_without_truth_reports_consistency(synthetic_map, tmp_path, capsys):
    _, report = synthetic_map
    path = write_drive(tmp_path / "drive", center=map_center(report))
    rows_csv = tmp_path / "rows.csv"
    assert replay_main([str(path), "--map", str(report.bundle.root), "--top-k", "5", "--csv", str(rows_csv)]) == 0
    out = capsys.readouterr().out
    assert "frames localised: 8 of 8" in out and "no ground truth: consistency only" in out, out
    assert "estimate to GPS fix (m): median" in out and "(8 frames with a fresh fix)" in out, out
    assert "jump between frames (m): median" in out and "(7 pairs)" in out and "recall" not in out, out
    rows = list(csv.DictReader(open(rows_csv)))
    assert len(rows) == 8 and all(math.isnan(float(r["error_m"])) for r in rows)
    assert max(float(r["gps_distance_m"]) for r in rows) < 1000.0       # the GPS hint keeps estimates near


@pytest.mark.parametrize("extra,message", [
    (["--image-topic", "/nope"], "no topic /nope (--image-topic); the bag has /front/image (sensor_msgs/msg/Image, "
                                 "8 messages), /ublox/fix (sensor_msgs/msg/NavSatFix, 8 messages), /vehicle/truth"),
    (["--truth-topic", "/front/image"], "--truth-topic /front/image is a sensor_msgs/msg/Image; the ground truth "
                                        "must be one of sensor_msgs/msg/NavSatFix, geometry_msgs/msg/PoseStamped"),
    (["--truth-frame", "utm"], "no overlap in time between the ground truth (10.000 s to 11.500 s) and the camera "
                               "(1.000 s to 2.400 s)"),
    ([], "in frame 'map', not 'utm_<zone>'"),
    (["--truth-frame", "enu"], "needs a datum"),
])
def test_replay_bad_input_is_one_line(synthetic_map, tmp_path, capsys, extra, message):
    _, report = synthetic_map
    path = write_drive(tmp_path / "drive", "geometry_msgs/msg/PoseStamped", "map",
                       truth_ns=[10_000_000_000 + i * 500_000_000 for i in range(4)])
    assert replay_main([str(path), "--map", str(report.bundle.root), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_photos_to_bag_round_trip(synthetic_map, tmp_path, capsys):
    """Query photos of the synthetic town, as the CSV the map builder reads, become a bag that replays."""
    from vpr_rerank_ros.bag import select_topics
    from vpr_rerank_ros.datasets.msls import load_side

    root, report = synthetic_map
    query = load_side(root / "msls", "synth0", "query")
    photos = write_photos_csv(query, tmp_path / "photos.csv", 8)
    bag = tmp_path / "photos_bag"
    assert replay_main(["make-bag", "--csv", str(photos), "--out", str(bag), "--rate", "2", "--gps-noise", "3"]) == 0
    assert f"8 photos written to {bag}" in capsys.readouterr().out
    chosen = select_topics(bag)
    assert (chosen.image, chosen.gps, chosen.truth) == ("/camera/image_raw/compressed", "/gps/fix", "/ground_truth/fix")
    rows_csv = tmp_path / "rows.csv"
    assert replay_main([str(bag), "--map", str(report.bundle.root), "--top-k", "20", "--csv", str(rows_csv)]) == 0
    out = capsys.readouterr().out
    assert "frames localised: 8 of 8 (skipped 0, GPS hint used 8" in out and "estimate to GPS fix" in out, out
    rows = list(csv.DictReader(open(rows_csv)))
    errors = sorted(float(r["error_m"]) for r in rows)
    assert errors[len(errors) // 2] < 25.0, errors
    assert replay_main(["make-bag", "--csv", str(photos), "--out", str(bag)]) == 1
    assert "already exists" in capsys.readouterr().err
