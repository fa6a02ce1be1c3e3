"""Tests of smolora.clients (client, CLI, load generator) against the HTTP layer."""
