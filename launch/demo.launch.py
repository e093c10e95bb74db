"""The whole stack with no AWS account: local stand-ins for Bedrock and KVS, a simulated base.

    ros2 launch sonic_voice demo.launch.py
    ros2 launch sonic_voice demo.launch.py enable_local_audio:=false scenario:=/path/turns.yaml

Starts, as processes:

- ``python -m sonic_voice.emulators.sonic``: the Nova Sonic stand-in (HTTP/2 + TLS with a
  throwaway CA, the real event-stream protocol), answering from a scenario YAML;
- ``python -m sonic_voice.emulators.kvs``: the KVS control plane and signaling stand-in
  (when ``enable_kvs``), so a browser viewer (web/) can connect on this machine;
- the nodes of sonic_voice.launch.py, pointed at the stand-ins (``endpoint_uri``,
  ``ca_bundle``, ``endpoint_url``) once both print that they listen;
- ``sim_base``: a simulated base serving ``navigate_to_pose`` and publishing ``odom``, so
  the demo tools (config/tools.yaml) drive somewhere.

The stand-ins accept only the throwaway keys set below, so real credentials in your
environment are neither needed nor sent anywhere. Where ``launch`` is not installed
(the venv), ``make run`` runs the same demo in one process.
"""

from __future__ import annotations

import os
import sys
import tempfile

from ament_index_python.packages import get_package_share_directory
from launch.actions import (
    DeclareLaunchArgument,
    ExecuteProcess,
    GroupAction,
    OpaqueFunction,
    RegisterEventHandler,
    SetEnvironmentVariable,
    UnsetEnvironmentVariable,
)
from launch.conditions import IfCondition
from launch.event_handlers import OnProcessIO
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node, SetParameter
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchContext, LaunchDescription

PACKAGE = "sonic_voice"
# Throwaway keys the Bedrock stand-in checks SigV4 signatures with (not AWS credentials).
STANDIN_ACCESS_KEY = "AKIDSONICSTANDIN"
STANDIN_SECRET_KEY = "sonic-standin-secret"


def share(*parts: str) -> str:
    return os.path.join(get_package_share_directory(PACKAGE), *parts)


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
    files = [share("config", f"{node}.yaml")]
    extra = LaunchConfiguration("params_file").perform(context)
    if extra:
        files.append(extra)
    return files


def launch_setup(context: LaunchContext) -> list:
    namespace = LaunchConfiguration("namespace")
    ros_args = ["--ros-args", "--log-level", LaunchConfiguration("log_level")]
    enable_kvs = IfCondition(LaunchConfiguration("enable_kvs")).evaluate(context)
    cert_dir = LaunchConfiguration("cert_dir").perform(context) or tempfile.mkdtemp(
        prefix="sonic-voice-demo-"
    )
    sonic_port = LaunchConfiguration("sonic_port").perform(context)
    kvs_port = LaunchConfiguration("kvs_port").perform(context)

    sonic_standin = ExecuteProcess(
        cmd=[
            sys.executable,
            "-m",
            "sonic_voice.emulators.sonic",
            "--port",
            LaunchConfiguration("sonic_port"),
            "--region",
            LaunchConfiguration("region"),
            "--scenario",
            LaunchConfiguration("scenario"),
            "--cert-dir",
            cert_dir,
            "--access-key",
            STANDIN_ACCESS_KEY,
            "--secret-key",
            STANDIN_SECRET_KEY,
        ],
        name="sonic_standin",
        output="screen",
    )
    kvs_standin = ExecuteProcess(
        cmd=[
            sys.executable,
            "-m",
            "sonic_voice.emulators.kvs",
            "--port",
            LaunchConfiguration("kvs_port"),
            "--region",
            LaunchConfiguration("region"),
            "--channel",
            LaunchConfiguration("channel"),
        ],
        name="kvs_standin",
        output="screen",
        condition=IfCondition(LaunchConfiguration("enable_kvs")),
    )

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
            {
                "endpoint_url": f"http://127.0.0.1:{kvs_port}",
                "create_channel": True,
                # Host candidates only: nothing is asked of a public STUN server.
                "ice_servers": ParameterValue("[]", value_type=str),
            },
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
            {
                "endpoint_uri": f"https://127.0.0.1:{sonic_port}",
                "ca_bundle": os.path.join(cert_dir, "ca.pem"),
                # The scenario's first turn answers this text: the robot speaks first.
                "greeting": "A visitor has just walked up to you. Greet them.",
            },
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
    sim_base = Node(
        package=PACKAGE,
        executable="sim_base",
        name="sim_base",
        namespace=namespace,
        parameters=[
            *params_files(context, "sim_base"),
            given(context, {"locations_file": LaunchConfiguration("locations_file")}),
        ],
        arguments=ros_args,
        output="screen",
        emulate_tty=True,
    )

    # Start the voice nodes once every stand-in has said where it listens (no sleeping).
    voice = GroupAction(
        [
            SetParameter(name="use_sim_time", value=LaunchConfiguration("use_sim_time")),
            audio_io,
            kvs_webrtc,
            sonic_session,
        ]
    )
    waiting = {"sonic"} | ({"kvs"} if enable_kvs else set())

    def when_ready(name: str, marker: str):
        def on_stdout(event) -> list:
            if name in waiting and marker in event.text.decode(errors="replace"):
                waiting.discard(name)
                if not waiting:
                    return [voice]
            return []

        return on_stdout

    return [
        # Only the stand-ins' throwaway keys; a profile or real keys are not used.
        UnsetEnvironmentVariable("AWS_PROFILE"),
        UnsetEnvironmentVariable("AWS_SESSION_TOKEN"),
        SetEnvironmentVariable("AWS_ACCESS_KEY_ID", STANDIN_ACCESS_KEY),
        SetEnvironmentVariable("AWS_SECRET_ACCESS_KEY", STANDIN_SECRET_KEY),
        RegisterEventHandler(
            OnProcessIO(target_action=sonic_standin, on_stdout=when_ready("sonic", "endpoint_uri"))
        ),
        RegisterEventHandler(
            OnProcessIO(target_action=kvs_standin, on_stdout=when_ready("kvs", "endpoint_url"))
        ),
        sonic_standin,
        kvs_standin,
        GroupAction(
            [
                SetParameter(name="use_sim_time", value=LaunchConfiguration("use_sim_time")),
                sim_base,
            ]
        ),
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
                default_value=share("config", "tools.yaml"),
                description="Tool declarations YAML for sonic_session (the demo tools drive "
                "sim_base).",
            ),
            DeclareLaunchArgument(
                "locations_file",
                default_value=share("config", "locations.yaml"),
                description="Named locations YAML for the navigation tools and sim_base.",
            ),
            DeclareLaunchArgument(
                "scenario",
                default_value=share("config", "scenarios", "offline_demo.yaml"),
                description="Conversation script the Nova Sonic stand-in answers from (the "
                "default is the offline demo's: greeting, a Spanish request, navigate_to).",
            ),
            DeclareLaunchArgument(
                "region",
                default_value="us-east-1",
                description="Region the stand-ins claim and the nodes sign requests for.",
            ),
            DeclareLaunchArgument(
                "model",
                default_value="",
                description="Bedrock model id the session asks for; '' = as in the params file.",
            ),
            DeclareLaunchArgument(
                "voice",
                default_value="",
                description="Nova Sonic voice id; '' = as in the params file.",
            ),
            DeclareLaunchArgument(
                "language",
                default_value="",
                description="Default locale until the person speaks, e.g. en-US; '' = as in the "
                "params file.",
            ),
            DeclareLaunchArgument(
                "sonic_port",
                default_value="18443",
                description="TCP port of the Nova Sonic stand-in on 127.0.0.1.",
            ),
            DeclareLaunchArgument(
                "kvs_port",
                default_value="18444",
                description="TCP port of the KVS stand-in on 127.0.0.1.",
            ),
            DeclareLaunchArgument(
                "channel",
                default_value="sonic-voice-demo",
                description="KVS signaling channel name (created on the stand-in).",
            ),
            DeclareLaunchArgument(
                "cert_dir",
                default_value="",
                description="Where the Bedrock stand-in writes its throwaway CA; '' = a new "
                "temporary directory.",
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
                description="Start the KVS stand-in and kvs_webrtc (browser viewer on this "
                "machine).",
            ),
            DeclareLaunchArgument(
                "enable_local_audio",
                default_value="true",
                choices=["true", "false"],
                description="Start audio_io: this computer's microphone and speaker.",
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
