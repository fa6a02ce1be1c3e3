"""The operator console: `/console` (static page) and its two read-only JSON views."""
