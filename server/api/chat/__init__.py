"""POST /v1/chat/completions: protocol (pydantic), serving (logic), router (FastAPI)."""
