"""smolora-serve: train, serve and operate SMoLoRA vision-language models.

The distribution maps its top-level folders onto one import namespace:
`smolora.adapters` (adapters/), `smolora.training` (training/), `smolora.server`
(server/) and `smolora.clients` (clients/). Imports flow one way: adapters is a pure
torch library; training and server import it and never each other.
"""

__version__ = "0.1.0"
