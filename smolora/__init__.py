"""smolora-serve: train, serve and operate SMoLoRA vision-language models.

This folder is the entry-point package (`python -m smolora quickstart`); the code lives in
the other top-level folders, which the distribution maps onto this namespace
(`[tool.setuptools.package-dir]` in pyproject.toml): `smolora.adapters` (adapters/),
`smolora.training` (training/), `smolora.server` (server/) and `smolora.clients`
(clients/). Imports flow one way: adapters is a pure torch library; training and server
import it and never each other; clients imports none of them.
"""

__version__ = "0.1.0"
