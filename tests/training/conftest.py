"""Shared fixtures of the training tests: a small mini-CVIT build and an aligned tiny base."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from smolora.training.data.mini_cvit import MiniCVITConfig, build_mini_cvit
from smolora.training.pretrain import PretrainConfig, pretrain_base

warnings.filterwarnings("ignore", message="The value of the smallest subnormal")

SMALL_DATA = MiniCVITConfig(
    seed=3, image_size=32, train_per_task=24, test_per_task=6, few_shot_max=2, pretrain_size=24
)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mini_cvit(tmp_path_factory.mktemp("mini_cvit"), SMALL_DATA, progress=False)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """The tiny preset after a few alignment steps (exercises `pretrain_base`)."""
    out = tmp_path_factory.mktemp("base") / "tiny-aligned"
    return pretrain_base(
        PretrainConfig(data_root=data_root, out_dir=out, preset="tiny", steps=3, batch_size=4),
        progress=False,
    )
