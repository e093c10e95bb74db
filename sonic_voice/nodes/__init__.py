"""rclpy nodes: thin wiring of the pure parts (audio, sonic, kvs) to ROS 2."""
