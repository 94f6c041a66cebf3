"""The installed package: ament index, share files, console scripts, and a working rclpy over DDS."""
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO


def test_share_directory_found_through_ament_index():
    from ament_index_python.packages import get_package_share_directory

    share = Path(get_package_share_directory("vpr_rerank_ros"))
    installed = ET.parse(share / "package.xml").getroot()
    assert installed.findtext("name") == "vpr_rerank_ros"
    assert installed.findtext("version") == ET.parse(REPO / "package.xml").getroot().findtext("version")
    assert (share / "config" / "localize.yaml").read_text() == (REPO / "config" / "localize.yaml").read_text()


def test_package_xml_is_format3_ament_python():
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.find("export/build_type").text == "ament_python"
    deps = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "geometry_msgs", "diagnostic_msgs", "std_srvs"} <= deps


def test_rclpy_not_in_install_requires():
    text = (REPO / "setup.py").read_text()
    start = text.index("install_requires=[")
    requires = text[start:text.index("]", start)]
    assert "rclpy" not in requires and "ros-" not in requires


def test_console_script_installed():
    for name in ("vpr-map", "vpr-synth", "vpr-weights", "vpr-eval", "vpr-demo", "vpr_localizer"):
        script = Path(sys.prefix) / "bin" / name
        assert script.exists() or shutil.which(name), f"{name} was not installed (run make setup)"


@pytest.mark.ros
def test_rclpy_pub_sub_over_dds():
    """The ROS wheels make setup installs carry a NavSatFix from one node to another over DDS."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import NavSatFix

    context = rclpy.Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    try:
        talker = rclpy.create_node("talker", context=context)
        listener = rclpy.create_node("listener", context=context)
        received = []
        listener.create_subscription(NavSatFix, "fix", received.append, 10)
        pub = talker.create_publisher(NavSatFix, "fix", 10)
        executor.add_node(talker)
        executor.add_node(listener)
        msg = NavSatFix(latitude=55.7, longitude=13.19)
        for _ in range(100):
            pub.publish(msg)
            executor.spin_once(timeout_sec=0.05)
            if received:
                break
        assert received and received[0].latitude == pytest.approx(55.7)
    finally:
        executor.shutdown()
        rclpy.shutdown(context=context)
