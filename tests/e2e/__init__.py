"""End-to-end tests: the real server (subprocess) with the real engine on the tiny model."""
