"""Session-wide isolation and shared fixtures.

- ROS: discovery limited to localhost, ROS_HOME and logs in a temp dir, a fresh
  ROS_DOMAIN_ID per graph (see harness.ros). As root, scripts/test.sh runs the whole
  session inside a private network namespace; ``test_isolation`` checks that it did.
- Audio: one private PulseAudio server per session (harness.pulse), exported through
  PULSE_SERVER before PortAudio opens any stream.
- Failing fast: the watchdog plugin (harness.watchdog, loaded by pyproject's addopts)
  kills what a test left running, ends a hung test and never lets the run hang at exit.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

_ros_home = tempfile.mkdtemp(prefix="sv-roshome-")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_HOME"] = _ros_home
os.environ["ROS_LOG_DIR"] = os.path.join(_ros_home, "log")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
# Never reach a real AWS endpoint from a test, whatever the developer's shell holds.
for var in (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
):
    os.environ.pop(var, None)
os.environ["AWS_CONFIG_FILE"] = os.path.join(_ros_home, "aws-config-none")
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(_ros_home, "aws-credentials-none")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


@pytest.fixture(scope="session")
def pulse() -> Iterator:
    from test.harness.pulse import PulseServer

    server = PulseServer()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    import sounddevice

    # PortAudio enumerated devices at import; look again now that the server is up.
    sounddevice._terminate()
    sounddevice._initialize()
    server.warm_up()
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.close()


@pytest.fixture
def ros_graph() -> Iterator:
    from test.harness.ros import RosGraph

    graph = RosGraph()
    try:
        yield graph
    finally:
        graph.close()


@pytest.fixture(scope="session", autouse=True)
def _process_bridge() -> Iterator[None]:
    """The process's one asyncio loop (sonic_voice.ros.bridge) is stopped when the session
    ends, with its worker threads, as the entry points do."""
    yield
    from sonic_voice.ros.bridge import Bridge

    Bridge.close_process_bridge(timeout=2.0)


@pytest.fixture(autouse=True)
def _our_loggers_enabled() -> Iterator[None]:
    """A library configured by another test (logging.config with disable_existing_loggers,
    as uvicorn and others do) disables loggers that already exist, and a soak quiets ours
    with a level (test_soak_session once left WARNING lines unseen); ours are reset so
    a test that reads our log lines does not depend on which tests ran before it."""
    import logging

    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("sonic_voice") and isinstance(logger, logging.Logger):
            logger.disabled = False
            logger.setLevel(logging.NOTSET)  # a level an earlier test (or bench) left set
    yield


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Domains where a test's graph met nodes that were not its own (then not reused)."""
    from test.harness.ros import tainted

    if tainted:
        terminalreporter.section("ROS domains with strangers (not reused)")
        for domain, (test, *nodes) in sorted(tainted.items()):
            terminalreporter.write_line(f"domain {domain}: {test}: {', '.join(nodes[:6])}")
