"""A 30 Hz camera flood into a node whose model is far slower than that: latest frame wins, so the node's
memory and the age of its poses stay bounded, and its diagnostics count the frames it dropped.

The slow model is the architecture the README recommends for serious work, VGG16-NetVLAD (hloc's layout,
32768-D without whitening), with random weights since no trained ones can be downloaded here: its cost per
frame is the real one; only its retrieval quality is meaningless, and this test does not look at it."""
import time

import cv2
import numpy as np
import pytest
import torch
from node_harness import diagnostics_values, image_msg, running_node, set_stamp, stamp_of, write_params

from vpr_rerank_ros.datasets import geotagged
from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.descriptors.model import DescriptorConfig, GlobalDescriptor, save_model
from vpr_rerank_ros.images import read_rgb
from vpr_rerank_ros.mapbuild import build_map

pytestmark = [pytest.mark.ros, pytest.mark.slow]

RATE_HZ = 30.0
FLOOD_S = 16.0
MAP_IMAGES = 8


@pytest.fixture(scope="module")
def slow_map(synthetic_map, tmp_path_factory):
    """A map of a few town images described with a random VGG16-NetVLAD, and that model's weights file."""
    root, _ = synthetic_map
    out = tmp_path_factory.mktemp("slow_map")
    torch.manual_seed(0)
    model = GlobalDescriptor(DescriptorConfig(whiten_dim=None, max_side=320))
    weights = save_model(model, out / "vgg16_netvlad_random.safetensors")
    images = geotagged.from_msls(root / "msls", ["synth0"])
    subset = geotagged.ImageSet(items=images.items[:MAP_IMAGES], table=images.table.take(np.arange(MAP_IMAGES)))
    build_map(out / "map", subset, model=model, device="cpu")
    return out / "map", weights


def test_flood_at_30_hz_keeps_memory_and_latency_bounded(slow_map, synthetic_map, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    map_path, weights = slow_map
    query, _ = load_city(synthetic_map[0] / "msls", "synth0")
    # 480x360 rgb8 camera frames, 518 kB each (larger ones need more than the default Fast DDS set-up delivers
    # best effort at 30 Hz); the model describes them at 320x240.
    frames = [image_msg(cv2.resize(read_rgb(query.image_path(i)), (480, 360)), 0) for i in range(4)]
    params = write_params(tmp_path / "params.yaml", map_path=str(map_path), model_path=str(weights),
                          top_k=MAP_IMAGES, pose_matches=3, device="cpu")
    with running_node(params, tmp_path) as (node, client):
        poses = []                      # as (receive time, message)
        client.node.create_subscription(PoseWithCovarianceStamped, "/vpr_localizer/pose",
                                        lambda msg: poses.append((time.time(), msg)), 100)
        diagnostics = client.collect(DiagnosticArray, "/diagnostics", 10)
        images = client.node.create_publisher(Image, "/image", qos_profile_sensor_data)
        sent, rss_mib = 0, []
        client.wait_for_subscriber(images, node)
        while not poses:    # warm-up: the first frame also pays for lazy initialisation
            assert node.alive(), node.log()
            images.publish(set_stamp(frames[0], time.time()))
            sent += 1
            client.spin_until(lambda: poses, timeout=10.0)
        idle_mib = node.rss_kib() / 1024
        warm_sent, warm_poses = sent, len(poses)
        start = time.monotonic()
        next_sample = start
        while (elapsed := time.monotonic() - start) < FLOOD_S:
            images.publish(set_stamp(frames[sent % len(frames)], time.time()))
            sent += 1
            if time.monotonic() >= next_sample:
                rss_mib.append((elapsed, node.rss_kib() / 1024))
                next_sample += 0.25
            client.spin_for(start + (sent - warm_sent) / RATE_HZ - time.monotonic())
        flood_sent, flood_s = sent - warm_sent, time.monotonic() - start
        client.spin_for(3.0)            # let the node finish its last frame and report
        client.next_message(diagnostics)
        assert node.alive(), node.log()
    assert flood_sent / flood_s > 0.8 * RATE_HZ, (flood_sent, flood_s)   # the test did flood
    values = diagnostics_values(diagnostics[-1])
    counts = {k: int(values[k]) for k in ("received", "lost", "processed", "dropped", "bad")}
    assert float(values["latency_total_ms"]) > 3 * 1000 / RATE_HZ, values    # the node is far slower than 30 Hz

    # Frames: received or reported lost by the middleware (DDS keeps the newest 5 per reader, so on a starved CPU
    # a few may also be overwritten unreported); every received frame processed or dropped; most were dropped.
    assert 0.7 * sent <= counts["received"] + counts["lost"] <= sent, (counts, sent)
    assert counts["bad"] == 0 and counts["received"] == counts["processed"] + counts["dropped"], counts
    assert counts["dropped"] >= 0.5 * flood_sent, (counts, flood_sent)

    # Latency: each pose is of a frame sent after the previous pose came out (no older frame waited in a queue)...
    flood = poses[warm_poses - 1:]
    assert len(flood) >= 5, (len(flood), values)
    for (previous, _), (received, pose) in zip(flood, flood[1:]):
        assert stamp_of(pose) > previous - 1.0, (stamp_of(pose) - previous, values)
    # ... and ages do not grow with the flood: a queue's grow linearly (18 s by its end in our runs), while a
    # latest-frame-wins node's stay near one processing time (0.3-0.4 s here, single stalls of ~3 s on a
    # loaded CPU).
    ages = [received - stamp_of(pose) for received, pose in flood[1:]]
    third = max(1, len(ages) // 3)
    assert np.median(ages[-third:]) < np.median(ages[:third]) + 1.0, (ages, values)
    assert max(ages) < FLOOD_S / 2, (ages, values)

    # Memory: the node's RSS stays within its working set (inference, messages, allocator slack; up to ~120 MB
    # above idle in our runs) of what it was when idle; a backlog of the flood's frames would add ~240 MB more.
    assert max(rss for _, rss in rss_mib) - idle_mib < 200, (idle_mib, rss_mib)
