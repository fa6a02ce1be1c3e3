"""smolora.clients: a Python client on the openai SDK, a CLI and a local load generator.

`SmoloraClient` (client.py) wraps `openai.OpenAI` with image helpers, the SMoLoRA request
extension, routing-trace access and checkpoint admin; `loadgen.py` measures a local
server; `cli.py` puts both on the command line (`python -m smolora.clients`).
"""

from smolora.clients.client import (
    ChatResult,
    SmoloraAPIError,
    SmoloraClient,
    image_to_data_url,
    routing_trace,
)

__all__ = ["ChatResult", "SmoloraAPIError", "SmoloraClient", "image_to_data_url", "routing_trace"]
