"""launch/localize.launch.py. `launch` and `launch_ros` cannot be installed here, so the launch description
is evaluated against small stand-ins that record what it builds; the recorded node is then started as the
equivalent `vpr_localizer --ros-args ...` command. `ros2 launch` itself is exercised only on a real ROS 2
install."""
import os
import runpy
import subprocess
import sys
import types

import pytest

from conftest import REPO


class Recorder:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Recorder):
    pass


class PathJoinSubstitution(Recorder):
    pass


class FindPackageShare(Recorder):
    pass


class IfCondition(Recorder):
    pass


class UnlessCondition(Recorder):
    pass


@pytest.fixture
def launch_description(monkeypatch):
    modules = {
        "launch": types.SimpleNamespace(LaunchDescription=Recorder),
        "launch.actions": types.SimpleNamespace(DeclareLaunchArgument=Recorder),
        "launch.conditions": types.SimpleNamespace(IfCondition=IfCondition, UnlessCondition=UnlessCondition),
        "launch.substitutions": types.SimpleNamespace(LaunchConfiguration=LaunchConfiguration,
                                                      PathJoinSubstitution=PathJoinSubstitution),
        "launch_ros": types.SimpleNamespace(),
        "launch_ros.actions": types.SimpleNamespace(Node=Recorder, LifecycleNode=Recorder),
        "launch_ros.substitutions": types.SimpleNamespace(FindPackageShare=FindPackageShare),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    from ament_index_python.packages import get_package_share_directory

    share = get_package_share_directory("vpr_rerank_ros")
    namespace = runpy.run_path(os.path.join(share, "launch", "localize.launch.py"))
    return namespace["generate_launch_description"]().args[0]


def resolve(value, arguments):
    """Evaluate a recorded substitution with the given launch arguments."""
    from ament_index_python.packages import get_package_share_directory

    if isinstance(value, LaunchConfiguration):
        return resolve(arguments[value.args[0]], arguments)
    if isinstance(value, FindPackageShare):
        return get_package_share_directory(value.args[0])
    if isinstance(value, PathJoinSubstitution):
        return os.path.join(*(resolve(v, arguments) for v in value.args[0]))
    if isinstance(value, list):
        return "".join(resolve(v, arguments) for v in value)
    return value


def test_launch_file_is_installed_and_declares_its_arguments(launch_description):
    assert (REPO / "launch" / "localize.launch.py").exists()
    declared = {a.args[0]: a.kwargs for a in launch_description if "package" not in a.kwargs}
    assert set(declared) == {"map", "model", "config", "namespace", "image_topic", "gps_topic", "compressed",
                             "reranker", "use_sim_time", "managed"}
    assert "default_value" not in declared["map"] and all(d["description"] for d in declared.values())
    plain, managed = (a.kwargs for a in launch_description if "package" in a.kwargs)   # managed:=true: the second
    assert (plain["package"], plain["executable"], plain["name"]) == ("vpr_rerank_ros", "vpr_localizer", "vpr_localizer")
    assert isinstance(plain["condition"], UnlessCondition) and isinstance(managed["condition"], IfCondition)
    assert plain["condition"].args[0].args[0] == managed["condition"].args[0].args[0] == "managed"
    assert managed["executable"] == "vpr_localizer_managed"
    assert {k: v for k, v in managed.items() if k not in ("executable", "condition")} == \
        {k: v for k, v in plain.items() if k not in ("executable", "condition")}


def test_equivalent_command_starts_the_node(launch_description, tmp_path):
    declared = {a.args[0]: a.kwargs.get("default_value") for a in launch_description if "package" not in a.kwargs}
    arguments = {**declared, "map": str(tmp_path / "missing_map"), "image_topic": "/cam/rgb", "compressed": "true"}
    node = next(a for a in launch_description if "package" in a.kwargs).kwargs
    config_file, overrides = node["parameters"]
    command = [os.path.join(sys.prefix, "bin", node["executable"]), "--ros-args", "-r", f"__node:={node['name']}",
               "--params-file", resolve(config_file, arguments)]
    for key, value in overrides.items():
        command += ["-p", f"{key}:={resolve(value, arguments) or chr(39) * 2}"]   # '' for an empty string
    for source, target in node["remappings"]:
        command += ["-r", f"{source}:={resolve(target, arguments)}"]
    assert "image/compressed:=/cam/rgb/compressed" in command and "compressed:=true" in command
    assert resolve(config_file, arguments).endswith(os.path.join("vpr_rerank_ros", "config", "localize.yaml"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ROS_HOME": str(tmp_path / "ros_home")})
    assert done.returncode == 1                               # the parameters reached the node: it looked for the map
    assert f"vpr_localizer: {tmp_path / 'missing_map'}: no such map directory" in done.stderr


def test_malformed_ros_arguments_give_a_clear_error(tmp_path):
    done = subprocess.run([os.path.join(sys.prefix, "bin", "vpr_localizer"), "--ros-args", "-p", "model_path:="],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ROS_HOME": str(tmp_path / "ros_home")})
    assert done.returncode == 2 and "vpr_localizer: cannot start ROS" in done.stderr
    assert "Traceback" not in done.stderr
