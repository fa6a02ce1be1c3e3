"""GET /v1/models: the served model and each resident checkpoint version."""
