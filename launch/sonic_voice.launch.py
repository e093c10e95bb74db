"""Bring up sonic_voice on a robot: audio_io, kvs_webrtc and sonic_session.

    ros2 launch sonic_voice sonic_voice.launch.py
    ros2 launch sonic_voice sonic_voice.launch.py namespace:=robot1 region:=eu-north-1 \
        tools_file:=$HOME/robot/tools.yaml locations_file:=$HOME/robot/locations.yaml
    ros2 launch sonic_voice sonic_voice.launch.py --show-args

Each node reads its own commented params file from the package's share directory
(config/<node>.yaml, namespace-agnostic ``/**`` form), then ``params_file`` when given
(one file for all nodes: ``/**/<node>:`` keys), then the arguments below that are not
empty. Empty arguments leave the params files' values alone, so a setting lives in one
place.

Where ``launch`` is not installed (the venv), the all-in-one runner (``sonic-voice``,
``ros2 run sonic_voice bringup``) runs the same nodes with the same YAML files.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, GroupAction, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node, SetParameter
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchContext, LaunchDescription

PACKAGE = "sonic_voice"


def given(context: LaunchContext, values: dict) -> dict:
    """The entries whose launch configuration is not empty, as strings (launch_ros would
    otherwise read them as YAML: a channel named 123 would become an integer)."""
    out = {}
    for param, config in values.items():
        value = config.perform(context)
        if value:
            out[param] = ParameterValue(value, value_type=str)
    return out


def params_files(context: LaunchContext, node: str) -> list:
    """config/<node>.yaml from the share directory, then params_file when given."""
    files = [os.path.join(get_package_share_directory(PACKAGE), "config", f"{node}.yaml")]
    extra = LaunchConfiguration("params_file").perform(context)
    if extra:
        files.append(extra)
    return files


def launch_setup(context: LaunchContext) -> list:
    namespace = LaunchConfiguration("namespace")
    ros_args = ["--ros-args", "--log-level", LaunchConfiguration("log_level")]
    audio_io = Node(
        package=PACKAGE,
        executable="audio_io",
        name="audio_io",
        namespace=namespace,
        parameters=params_files(context, "audio_io"),
        arguments=ros_args,
        condition=IfCondition(LaunchConfiguration("enable_local_audio")),
        output="screen",
        emulate_tty=True,
    )
    kvs_webrtc = Node(
        package=PACKAGE,
        executable="kvs_webrtc",
        name="kvs_webrtc",
        namespace=namespace,
        parameters=[
            *params_files(context, "kvs_webrtc"),
            given(
                context,
                {
                    "region": LaunchConfiguration("region"),
                    "channel_name": LaunchConfiguration("channel"),
                },
            ),
        ],
        arguments=ros_args,
        condition=IfCondition(LaunchConfiguration("enable_kvs")),
        output="screen",
        emulate_tty=True,
    )
    sonic_session = Node(
        package=PACKAGE,
        executable="sonic_session",
        name="sonic_session",
        namespace=namespace,
        parameters=[
            *params_files(context, "sonic_session"),
            given(
                context,
                {
                    "region": LaunchConfiguration("region"),
                    "model_id": LaunchConfiguration("model"),
                    "voice_id": LaunchConfiguration("voice"),
                    "language": LaunchConfiguration("language"),
                    "tools_file": LaunchConfiguration("tools_file"),
                    "locations_file": LaunchConfiguration("locations_file"),
                },
            ),
        ],
        arguments=ros_args,
        output="screen",
        emulate_tty=True,
    )
    # use_sim_time for every node of the group, as nav2_bringup does.
    return [
        GroupAction(
            [
                SetParameter(name="use_sim_time", value=LaunchConfiguration("use_sim_time")),
                audio_io,
                kvs_webrtc,
                sonic_session,
            ]
        )
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "namespace", default_value="", description="ROS namespace of every node; '' = none."
            ),
            DeclareLaunchArgument(
                "params_file",
                default_value="",
                description="Extra ROS params file for every node, applied after "
                "config/<node>.yaml (keys '/**/<node>:'); '' = none.",
            ),
            DeclareLaunchArgument(
                "tools_file",
                default_value="",
                description="Tool declarations YAML for sonic_session; '' = as in its params file.",
            ),
            DeclareLaunchArgument(
                "locations_file",
                default_value="",
                description="Named locations YAML for navigation tools; '' = as in the params "
                "file.",
            ),
            DeclareLaunchArgument(
                "region",
                default_value="",
                description="AWS region of Bedrock and KVS, e.g. us-east-1; '' = as in the params "
                "files.",
            ),
            DeclareLaunchArgument(
                "model",
                default_value="",
                description="Bedrock model id, e.g. amazon.nova-2-sonic-v1:0; '' = as in the "
                "params file.",
            ),
            DeclareLaunchArgument(
                "voice",
                default_value="",
                description="Nova Sonic voice id, e.g. tiffany or matthew; '' = as in the params "
                "file.",
            ),
            DeclareLaunchArgument(
                "language",
                default_value="",
                description="Default locale until the person speaks, e.g. en-US; '' = as in the "
                "params file.",
            ),
            DeclareLaunchArgument(
                "channel",
                default_value="",
                description="KVS signaling channel name of this robot; '' = as in "
                "config/kvs_webrtc.yaml.",
            ),
            DeclareLaunchArgument(
                "use_sim_time",
                default_value="false",
                choices=["true", "false"],
                description="Use the /clock topic (simulation time) in every node.",
            ),
            DeclareLaunchArgument(
                "enable_kvs",
                default_value="true",
                choices=["true", "false"],
                description="Start kvs_webrtc: remote visitors over KVS WebRTC (needs a channel).",
            ),
            DeclareLaunchArgument(
                "enable_local_audio",
                default_value="true",
                choices=["true", "false"],
                description="Start audio_io: the robot's microphone and speaker.",
            ),
            DeclareLaunchArgument(
                "log_level",
                default_value="info",
                choices=["debug", "info", "warn", "error", "fatal"],
                description="Log level of every node.",
            ),
            OpaqueFunction(function=launch_setup),
        ]
    )
