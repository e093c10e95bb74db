"""Bring up sonic_voice on a robot: audio_io, kvs_webrtc and sonic_session.

    ros2 launch sonic_voice sonic_voice.launch.py
    ros2 launch sonic_voice sonic_voice.launch.py namespace:=robot1 region:=eu-north-1 \
        tools_file:=$HOME/robot/tools.yaml locations_file:=$HOME/robot/locations.yaml
    ros2 launch sonic_voice sonic_voice.launch.py --show-args

Each node is a managed (lifecycle) node: this file configures it as it starts and
activates it once it is inactive, as nav2's lifecycle manager would (the nodes never
activate themselves). Each node reads its own commented params file from the package's
share directory (config/<node>.yaml, namespace-agnostic ``/**`` form), then
``params_file`` when given (one file for all nodes: ``/**/<node>:`` keys), then the
arguments below that are not empty. Empty arguments leave the params files' values
alone, so a setting lives in one place.

Where ``launch`` is not installed (the venv), the all-in-one runner (``sonic-voice``,
``ros2 run sonic_voice bringup``) runs the same nodes with the same YAML files.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    GroupAction,
    OpaqueFunction,
    RegisterEventHandler,
)
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, SetParameter
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.parameter_descriptions import ParameterValue
from lifecycle_msgs.msg import Transition

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


def flag(context: LaunchContext, param: str, config: LaunchConfiguration) -> dict:
    """A boolean parameter from a launch argument ('' = as in the params files)."""
    value = config.perform(context)
    return {param: value == "true"} if value else {}


def params_files(context: LaunchContext, node: str) -> list:
    """config/<node>.yaml from the share directory, then params_file when given."""
    files = [os.path.join(get_package_share_directory(PACKAGE), "config", f"{node}.yaml")]
    extra = LaunchConfiguration("params_file").perform(context)
    if extra:
        files.append(extra)
    return files


def managed(node: LifecycleNode) -> list:
    """The node, configured as it starts and activated once inactive (same condition)."""
    condition = node.condition
    return [
        node,
        RegisterEventHandler(
            OnStateTransition(
                target_lifecycle_node=node,
                goal_state="inactive",
                entities=[
                    EmitEvent(
                        event=ChangeState(
                            lifecycle_node_matcher=matches_action(node),
                            transition_id=Transition.TRANSITION_ACTIVATE,
                        )
                    )
                ],
            ),
            condition=condition,
        ),
        EmitEvent(
            event=ChangeState(
                lifecycle_node_matcher=matches_action(node),
                transition_id=Transition.TRANSITION_CONFIGURE,
            ),
            condition=condition,
        ),
    ]


# The launch file drives the transitions (see managed()), not the node's entry point.
MANAGED = {"autostart": False}


def launch_setup(context: LaunchContext) -> list:
    namespace = LaunchConfiguration("namespace")
    ros_args = ["--ros-args", "--log-level", LaunchConfiguration("log_level")]
    audio_io = LifecycleNode(
        package=PACKAGE,
        executable="audio_io",
        name="audio_io",
        namespace=namespace,
        parameters=[*params_files(context, "audio_io"), MANAGED],
        arguments=ros_args,
        condition=IfCondition(LaunchConfiguration("enable_local_audio")),
        output="screen",
        emulate_tty=True,
    )
    kvs_webrtc = LifecycleNode(
        package=PACKAGE,
        executable="kvs_webrtc",
        name="kvs_webrtc",
        namespace=namespace,
        parameters=[
            *params_files(context, "kvs_webrtc"),
            MANAGED,
            given(
                context,
                {
                    "region": LaunchConfiguration("region"),
                    "channel_name": LaunchConfiguration("channel"),
                    "endpoint_url": LaunchConfiguration("kvs_endpoint"),
                    "ice_servers": LaunchConfiguration("ice_servers"),
                },
            ),
            flag(context, "create_channel", LaunchConfiguration("create_channel")),
        ],
        arguments=ros_args,
        condition=IfCondition(LaunchConfiguration("enable_kvs")),
        output="screen",
        emulate_tty=True,
    )
    sonic_session = LifecycleNode(
        package=PACKAGE,
        executable="sonic_session",
        name="sonic_session",
        namespace=namespace,
        parameters=[
            *params_files(context, "sonic_session"),
            MANAGED,
            given(
                context,
                {
                    "region": LaunchConfiguration("region"),
                    "model_id": LaunchConfiguration("model"),
                    "voice_id": LaunchConfiguration("voice"),
                    "language": LaunchConfiguration("language"),
                    "tools_file": LaunchConfiguration("tools_file"),
                    "locations_file": LaunchConfiguration("locations_file"),
                    "endpoint_uri": LaunchConfiguration("endpoint_uri"),
                    "ca_bundle": LaunchConfiguration("ca_bundle"),
                    "greeting": LaunchConfiguration("greeting"),
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
                *managed(audio_io),
                *managed(kvs_webrtc),
                *managed(sonic_session),
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
                "endpoint_uri",
                default_value="",
                description="Bedrock runtime endpoint (a stand-in's https://127.0.0.1:PORT); '' "
                "= as in the params file (the region's public endpoint).",
            ),
            DeclareLaunchArgument(
                "ca_bundle",
                default_value="",
                description="PEM file of extra CAs for the Bedrock endpoint; '' = as in the params "
                "file.",
            ),
            DeclareLaunchArgument(
                "greeting",
                default_value="",
                description="Greeting (Nova 2) when a conversation starts by a trigger in "
                "greet_on; '' = as in the params file.",
            ),
            DeclareLaunchArgument(
                "kvs_endpoint",
                default_value="",
                description="KVS control-plane endpoint (a stand-in's URL); '' = as in the "
                "params file (AWS).",
            ),
            DeclareLaunchArgument(
                "ice_servers",
                default_value="",
                description="JSON list of ICE servers for kvs_webrtc ('[]' = host candidates "
                "only); '' = as in the params file.",
            ),
            DeclareLaunchArgument(
                "create_channel",
                default_value="",
                choices=["", "true", "false"],
                description="Create the KVS channel if missing; '' = as in the params file.",
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
