"""Start the vpr_localizer node with config/localize.yaml.

    ros2 launch vpr_rerank_ros localize.launch.py map:=/path/to/map image_topic:=/camera/image_raw
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
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
]


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(name, default_value=default, description=text) if default is not None
                else DeclareLaunchArgument(name, description=text) for name, default, text in ARGUMENTS]
    image_topic = LaunchConfiguration("image_topic")
    node = Node(
        package="vpr_rerank_ros",
        executable="vpr_localizer",
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
    return LaunchDescription([*declared, node])
