"""Amazon Nova Sonic: events, the SDK transport and the session engine (no ROS here)."""
