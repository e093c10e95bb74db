"""The offline demo's graph check (``app/demo.check_graph``) on a real ROS graph: a shared
domain with other nodes is refused, and a navigation server is named as such even when its
node is discovered before its services."""

from __future__ import annotations

import threading
import time

import pytest

from sonic_voice.app.demo import Graph, StartupError, check_graph

from test.harness.servers import navigate_server


def test_a_navigation_server_seen_after_its_node_is_named(ros_graph) -> None:
    checker = ros_graph.node("demo_monitor")
    robot = ros_graph.node("real_robot", start_parameter_services=False)
    # The node shows first; its action server 0.3 s later (as discovery may order them).
    timer = threading.Timer(0.3, navigate_server, args=(robot,))
    timer.start()
    try:
        with pytest.raises(StartupError) as err:
            check_graph(checker, Graph("ROS domain x", ros_graph.domain_id), 3.0)
    finally:
        timer.join()
    assert "another navigate_to_pose server answers" in str(err.value)
    assert "/navigate_to_pose" in str(err.value)


def test_other_nodes_without_navigation_are_refused_after_the_settle_time(ros_graph) -> None:
    checker = ros_graph.node("demo_monitor")
    ros_graph.node("someone_else", start_parameter_services=False)
    t0 = time.monotonic()
    with pytest.raises(StartupError) as err:
        check_graph(checker, Graph("ROS domain x", ros_graph.domain_id), 3.0, settle_s=0.5)
    took = time.monotonic() - t0
    assert "is not empty: /someone_else" in str(err.value)
    assert 0.45 <= took < 2.5, took  # waited for services to settle, not for the deadline


def test_an_empty_domain_passes_and_a_namespace_ignores_plain_nodes(ros_graph) -> None:
    checker = ros_graph.node("demo_monitor")
    check_graph(checker, Graph("ROS domain x", ros_graph.domain_id), 0.3)
    ros_graph.node("someone_else", start_parameter_services=False)
    # In its own network namespace, only a navigation server is a reason to refuse.
    check_graph(checker, Graph("its own network namespace"), 0.3)
