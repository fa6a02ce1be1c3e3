"""Session-wide fixtures: the tiny LLaVA model folder and the MiniLM encoder, built once."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built `tiny` preset LLaVA folder (random weights, seed 0)."""
    from smolora.adapters.tiny_llava import build_tiny_llava, get_preset

    return build_tiny_llava(get_preset("tiny"), tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="session")
def instruction_encoder():
    """The packaged all-MiniLM-L6-v2 encoder (loads in a few seconds)."""
    from smolora.adapters.instructions import InstructionEncoder

    return InstructionEncoder()
