"""Test harness: isolated ROS 2 graphs, a private PulseAudio server, and signal helpers."""
