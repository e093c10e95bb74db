"""ament_python packaging for sonic_voice (colcon on a robot, pip -e in the venv)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "sonic_voice"

# Executables: console scripts for pip, and the same entry points under lib/<package>/
# (via setup.cfg's script_dir for colcon) so `ros2 run` and launch_ros find them.
CONSOLE_SCRIPTS = [
    "audio_io = sonic_voice.nodes.audio_io:main",
    "kvs_webrtc = sonic_voice.nodes.kvs_webrtc:main",
    "sim_base = sonic_voice.nodes.sim_base:main",
    "sonic_session = sonic_voice.nodes.sonic_session:main",
    # The all-in-one runner (README's main job): `sonic-voice`, `ros2 run sonic_voice bringup`.
    "sonic-voice = sonic_voice.app.cli:cli",
    "bringup = sonic_voice.app.cli:cli",
]

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "bench"]),
    package_data={PACKAGE: ["py.typed"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/config/scenarios", glob("config/scenarios/*.yaml")),
        (f"share/{PACKAGE}/web", glob("web/*.*")),
        # Also under lib/<package>/ so `ros2 run` and launch_ros find them even when the
        # installer ignores setup.cfg's script_dir (pip does).
        (f"lib/{PACKAGE}", glob("bin/*")),
    ],
    python_requires=">=3.12",
    install_requires=[
        "numpy",
        "pyyaml",
        "jsonschema",
        "fastjsonschema",  # contracts.check's fast path (jsonschema words the errors)
        "webrtcvad-wheels",
        "soxr",
        "sounddevice",
        "boto3",
        "aiortc",
        "uvloop",  # the bridge's event loop (libuv): ros/bridge.py new_event_loop
        "aiohttp",
        "websockets",
        "h2",
        "cryptography",
        "aws-sdk-bedrock-runtime",
        "awscrt",
        "livekit",  # WebRTC AudioProcessingModule (echo cancellation)
        "opuslib",  # libopus with in-band FEC decode + PLC (loss-resilient receive path)
        "mcp",  # tools: MCP servers (stdio, streamable HTTP)
        "strands-agents",  # tools: the agent kind
        "bm25s",  # tools: knowledge, BM25 over sparse numpy matrices
        "PyStemmer",  # tools: knowledge, Snowball stemmers (es, en, ...)
        "segno",  # QR codes of guest invite links (pure Python, no Pillow)
    ],
    extras_require={
        "test": ["pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "ruff"],
    },
    zip_safe=False,
    maintainer="sonic_voice maintainers",
    maintainer_email="maintainers@sonic-voice.invalid",
    description="Amazon Nova Sonic voice for ROS 2 robots, local audio and KVS WebRTC.",
    license="Apache-2.0",
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
