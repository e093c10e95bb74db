"""sonic_voice: a real-time Amazon Nova Sonic voice for ROS 2 robots.

Layout (see DESIGN.md): ``audio``, ``sonic`` and ``kvs`` are pure asyncio/threads and
never import rclpy; ``nodes`` and ``tools`` are the only ROS-aware packages.
"""

__version__ = "0.1.0"
