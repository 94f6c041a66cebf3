"""`use_sim_time`: the node follows /clock for the stamps it makes itself (diagnostics), gives its poses the
image stamps, ages GPS fixes against the image stamp (both in sim time), and keeps processing frames,
reporting and warning while /clock stands still (a stalled replayer): its timers and warning throttles run on
the steady clock, not on ROS time."""
import re
import time

import pytest
from node_harness import diagnostics_values, image_msg, running_node, set_stamp, stamp_of, time_msg, write_params

from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.images import read_rgb
from vpr_rerank_ros.node import WARN_PERIOD_S

pytestmark = pytest.mark.ros

SIM_START = 1000.0      # far from wall-clock time, so a stamp taken from the wrong clock shows


def test_node_under_sim_time(synthetic_map, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.qos import qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image, NavSatFix, NavSatStatus

    root, report = synthetic_map
    query, _ = load_city(root / "msls", "synth0")
    params = write_params(tmp_path / "params.yaml", map_path=str(report.bundle.root), top_k=20, rate_hz=4.0,
                          use_sim_time=True)
    with running_node(params, tmp_path) as (node, client):
        poses = client.collect(PoseWithCovarianceStamped, "/vpr_localizer/pose", 100)
        diagnostics = client.collect(DiagnosticArray, "/diagnostics", 100)
        clock = client.node.create_publisher(Clock, "/clock", 10)
        images = client.node.create_publisher(Image, "/image", qos_profile_sensor_data)
        fixes = client.node.create_publisher(NavSatFix, "/gps/fix", qos_profile_sensor_data)
        ticks = 0               # /clock is SIM_START + ticks / 20

        def run_clock(seconds: float, advance: bool) -> float:
            """Publish /clock at 20 Hz for `seconds` of wall time, advancing it in step or holding it; returns
            the sim time."""
            nonlocal ticks
            for _ in range(round(seconds * 20)):
                ticks += advance
                clock.publish(Clock(clock=time_msg(SIM_START + ticks / 20)))
                client.spin_for(0.05)
            return SIM_START + ticks / 20

        def send_frame(i: int, stamp: float) -> float:
            """Frame i of the query drive and a GPS fix at its position, both stamped `stamp`."""
            fix = NavSatFix(latitude=float(query.lat[i]), longitude=float(query.lon[i]))
            fix.status.status = NavSatStatus.STATUS_FIX
            fixes.publish(set_stamp(fix, stamp))
            image = image_msg(read_rgb(query.image_path(i)), stamp)
            images.publish(image)
            return stamp_of(image)

        def send_bad_fixes() -> None:
            """Two unusable fixes in a row (best effort: one may be lost); the node warns about the first it gets."""
            for _ in range(2):
                fixes.publish(set_stamp(NavSatFix(latitude=float("nan")), SIM_START + ticks / 20))

        client.wait_for_subscriber(images, node)
        run_clock(1.0, advance=True)
        running, stalled = [], []
        for i in range(6):
            running.append(send_frame(i, run_clock(1.0, advance=True)))
        held = SIM_START + ticks / 20
        send_bad_fixes()
        first_warning = time.monotonic()
        for i in range(6, 9):           # /clock stands still; the frames' own stamps move on
            run_clock(1.0, advance=False)
            stalled.append(send_frame(i, held + i - 5))
        run_clock(first_warning + WARN_PERIOD_S + 0.5 - time.monotonic(), advance=False)
        send_bad_fixes()                # warned about again: the throttle period passed in steady time
        run_clock(1.0, advance=False)
        assert node.alive(), node.log()
    stamps = [stamp_of(p) for p in poses]
    assert set(stamps) <= set(running + stalled), (stamps, running, stalled)     # the image stamps, exactly
    assert len(set(stamps) & set(running)) >= len(running) - 2, (stamps, running)
    assert len(set(stamps) & set(stalled)) >= len(stalled) - 1, (stamps, stalled)  # processed while /clock stood
    # Diagnostics are stamped in sim time (and still come while /clock stands), with wall-clock latency and rates;
    # the fixes, stamped in sim time, were used.
    after_start = [d for d in diagnostics if stamp_of(d) > SIM_START]
    assert after_start and all(stamp_of(d) <= held + 1e-6 for d in after_start), [stamp_of(d) for d in diagnostics]
    assert sum(abs(stamp_of(d) - held) < 1e-6 for d in after_start) >= 3, [stamp_of(d) for d in diagnostics]
    localising = [diagnostics_values(d) for d in after_start if int(diagnostics_values(d)["processed"]) > 0]
    assert localising, [diagnostics_values(d) for d in diagnostics]
    assert all(float(v["latency_total_ms"]) > 0 for v in localising)
    assert any(float(v["processed_hz"]) > 0 for v in localising)
    assert any(v["gps"] == "GPS hint used" for v in localising), [(v["gps"], v["fixes"], v["bad_fixes"]) for v in localising]
    assert len(re.findall("ignoring GPS fix with status", node.log())) == 2, node.log()
