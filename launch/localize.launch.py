"""Start the vpr_localizer node with config/localize.yaml; with managed:=true the managed (lifecycle) node,
vpr_localizer_managed, which waits unconfigured for a lifecycle manager (nav2_lifecycle_manager, or
`ros2 lifecycle set /vpr_localizer configure` then `activate`).

    ros2 launch vpr_rerank_ros localize.launch.py map:=/path/to/map image_topic:=/camera/image_raw
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = [
    ("map", None, "map bundle directory (vpr-map build); required"),
    ("model", "", "descriptor weights; empty = the model stored in the map"),
    ("config", PathJoinSubstitution([FindPackageShare("vpr_rerank_ros"), "config", "localize.yaml"]),
     "parameter file"),
    ("namespace", "", "namespace of the node"),
    ("image_topic", "/camera/image_raw", "camera topic; with compressed:=true its /compressed sibling is used"),
    ("gps_topic", "/gps/fix", "sensor_msgs/NavSatFix topic used as a hint"),
    ("compressed", "false", "subscribe to sensor_msgs/CompressedImage"),
    ("reranker", "none", "re-ranker name"),
    ("use_sim_time", "false", "use /clock (bag replay)"),
    ("managed", "false", "start the managed (lifecycle) node, configured and activated by a lifecycle manager"),
]


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(name, default_value=default, description=text) if default is not None
                else DeclareLaunchArgument(name, description=text) for name, default, text in ARGUMENTS]
    image_topic = LaunchConfiguration("image_topic")
    managed = LaunchConfiguration("managed")
    common = dict(
        package="vpr_rerank_ros",
        name="vpr_localizer",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[
            LaunchConfiguration("config"),
            {
                "map_path": LaunchConfiguration("map"),
                "model_path": LaunchConfiguration("model"),
                "compressed": LaunchConfiguration("compressed"),
                "reranker": LaunchConfiguration("reranker"),
                "use_sim_time": LaunchConfiguration("use_sim_time"),
            },
        ],
        remappings=[
            ("image", image_topic),
            ("image/compressed", [image_topic, "/compressed"]),
            ("gps/fix", LaunchConfiguration("gps_topic")),
        ],
    )
    return LaunchDescription([*declared, Node(executable="vpr_localizer", condition=UnlessCondition(managed), **common),
                              LifecycleNode(executable="vpr_localizer_managed", condition=IfCondition(managed),
                                            **common)])
