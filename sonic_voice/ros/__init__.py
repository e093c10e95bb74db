"""The ROS 2 side shared by every node: the process's one rclpy<->asyncio bridge
(:mod:`.bridge`), the lifecycle node base class (:mod:`.node`), the process runtime and
entry point (:mod:`.runtime`), topics by contract (:mod:`.topics`) and the rclpy
work-arounds (:mod:`.compat`). See docs/architecture.md."""
