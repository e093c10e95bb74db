"""The whole stack with no AWS account: local stand-ins for Bedrock and KVS, a simulated base.

    ros2 launch sonic_voice demo.launch.py
    ros2 launch sonic_voice demo.launch.py enable_local_audio:=false scenario:=/path/turns.yaml

Starts, as processes:

- ``python -m sonic_voice.emulators.sonic``: the Nova Sonic stand-in (HTTP/2 + TLS with a
  throwaway CA, the real event-stream protocol), answering from a scenario YAML;
- ``python -m sonic_voice.emulators.kvs``: the KVS control plane and signaling stand-in
  (when ``enable_kvs``), so a browser viewer (web/) can connect on this machine;
- ``sonic_voice.launch.py`` itself (included, not copied), pointed at the stand-ins
  (``endpoint_uri``, ``ca_bundle``, ``kvs_endpoint``) once both print that they listen;
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
    EmitEvent,
    ExecuteProcess,
    GroupAction,
    IncludeLaunchDescription,
    OpaqueFunction,
    RegisterEventHandler,
    SetEnvironmentVariable,
    UnsetEnvironmentVariable,
)
from launch.conditions import IfCondition
from launch.event_handlers import OnProcessIO
from launch.events import matches_action
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, SetParameter
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.parameter_descriptions import ParameterValue
from lifecycle_msgs.msg import Transition

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


def managed(node: LifecycleNode) -> list:
    """The node, configured as it starts and activated once inactive."""
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
            )
        ),
        EmitEvent(
            event=ChangeState(
                lifecycle_node_matcher=matches_action(node),
                transition_id=Transition.TRANSITION_CONFIGURE,
            )
        ),
    ]


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

    sim_base = LifecycleNode(
        package=PACKAGE,
        executable="sim_base",
        name="sim_base",
        namespace=namespace,
        parameters=[
            *params_files(context, "sim_base"),
            {"autostart": False},
            given(context, {"locations_file": LaunchConfiguration("locations_file")}),
        ],
        arguments=ros_args,
        output="screen",
        emulate_tty=True,
    )

    # The robot's own launch file, pointed at the stand-ins, once every stand-in has said
    # where it listens (no sleeping). An argument given on the command line wins.
    voice = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(share("launch", "sonic_voice.launch.py")),
        launch_arguments=[
            ("namespace", LaunchConfiguration("namespace")),
            ("params_file", LaunchConfiguration("params_file")),
            ("tools_file", LaunchConfiguration("tools_file")),
            ("locations_file", LaunchConfiguration("locations_file")),
            ("region", LaunchConfiguration("region")),
            ("model", LaunchConfiguration("model")),
            ("voice", LaunchConfiguration("voice")),
            ("language", LaunchConfiguration("language")),
            ("channel", LaunchConfiguration("channel")),
            ("use_sim_time", LaunchConfiguration("use_sim_time")),
            ("enable_kvs", LaunchConfiguration("enable_kvs")),
            ("enable_local_audio", LaunchConfiguration("enable_local_audio")),
            ("log_level", LaunchConfiguration("log_level")),
            (
                "endpoint_uri",
                (
                    LaunchConfiguration("endpoint_uri").perform(context)
                    or f"https://127.0.0.1:{sonic_port}"
                ),
            ),
            (
                "ca_bundle",
                (
                    LaunchConfiguration("ca_bundle").perform(context)
                    or os.path.join(cert_dir, "ca.pem")
                ),
            ),
            # Sent when a viewer joins or ~/engage is called (greet_on); a visitor who
            # speaks first engages the idle robot and is answered (conversation lifecycle).
            (
                "greeting",
                (
                    LaunchConfiguration("greeting").perform(context)
                    or "A visitor has just walked up to you. Greet them."
                ),
            ),
            (
                "kvs_endpoint",
                (
                    LaunchConfiguration("kvs_endpoint").perform(context)
                    or f"http://127.0.0.1:{kvs_port}"
                ),
            ),
            # Host candidates only: nothing is asked of a public STUN server.
            ("ice_servers", (LaunchConfiguration("ice_servers").perform(context) or "[]")),
            ("create_channel", (LaunchConfiguration("create_channel").perform(context) or "true")),
        ],
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
                *managed(sim_base),
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
                "default is the offline demo's: hello, a Spanish request, navigate_to).",
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
                "endpoint_uri",
                default_value="",
                description="Bedrock endpoint; '' = the stand-in this file starts.",
            ),
            DeclareLaunchArgument(
                "ca_bundle",
                default_value="",
                description="CA of the Bedrock endpoint; '' = the stand-in's throwaway CA.",
            ),
            DeclareLaunchArgument(
                "greeting",
                default_value="",
                description="Greeting text (a viewer joining, ~/engage); '' = the demo's.",
            ),
            DeclareLaunchArgument(
                "kvs_endpoint",
                default_value="",
                description="KVS control-plane endpoint; '' = the stand-in this file starts.",
            ),
            DeclareLaunchArgument(
                "ice_servers",
                default_value="",
                description="JSON list of ICE servers; '' = '[]' (host candidates only).",
            ),
            DeclareLaunchArgument(
                "create_channel",
                default_value="",
                choices=["", "true", "false"],
                description="Create the KVS channel if missing; '' = true (on the stand-in).",
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
