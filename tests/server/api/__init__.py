"""HTTP-layer tests (server/api and the server/*.py modules around it), engine held by a double."""
