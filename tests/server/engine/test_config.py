"""Engine configuration refuses what cannot serve SMoLoRA exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolora.server.engine.config import AdapterLayout, EngineConfig, EngineConfigError


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_chunked_prefill_is_refused_with_adapters(model_dir: Path) -> None:
    with pytest.raises(EngineConfigError, match="chunked_prefill"):
        EngineConfig(model_dir=model_dir, layout=AdapterLayout(), chunked_prefill=True)
    EngineConfig(
        model_dir=model_dir, adapters=False, chunked_prefill=True
    )  # fine for the base model


def test_other_invariants(model_dir: Path) -> None:
    with pytest.raises(EngineConfigError, match="enforce_eager"):
        EngineConfig(model_dir=model_dir, layout=AdapterLayout(), enforce_eager=False)
    with pytest.raises(EngineConfigError, match="max_num_batched_tokens"):
        EngineConfig(
            model_dir=model_dir,
            layout=AdapterLayout(),
            max_model_len=256,
            max_num_batched_tokens=128,
        )
    with pytest.raises(EngineConfigError, match="extra_engine_args"):
        EngineConfig(
            model_dir=model_dir,
            layout=AdapterLayout(),
            extra_engine_args={"enable_prefix_caching": True},
        )
    with pytest.raises(EngineConfigError, match="target_modules"):
        AdapterLayout(target_modules=("self_attn.q_proj",))
    assert AdapterLayout.from_dict(AdapterLayout(num_slots=3).to_dict()).num_slots == 3


def test_cpu_overlap_is_auto_on_or_off(model_dir: Path) -> None:
    with pytest.raises(EngineConfigError, match="cpu_overlap"):
        EngineConfig(model_dir=model_dir, layout=AdapterLayout(), cpu_overlap="always")  # type: ignore[arg-type]
    with pytest.raises(EngineConfigError, match="cpu_overlap"):
        AdapterLayout(cpu_overlap="yes")  # type: ignore[arg-type]
    layout = AdapterLayout.from_smolora_config(
        {"num_experts": 8, "rank": 64}, num_slots=1, trace_step_routes=0, cpu_overlap="off"
    )
    assert (
        layout.cpu_overlap == "off"
        and AdapterLayout.from_dict(layout.to_dict()).cpu_overlap == "off"
    )
    assert AdapterLayout().cpu_overlap == "auto"


def test_layout_shape_is_the_smolora_config() -> None:
    """The layout's adapter shape is built from a `SMoLoRAConfig` (object or manifest dict) and
    gives one back; its rules are SMoLoRAConfig's (one definition)."""
    from smolora.adapters.smolora.config import SMoLoRAConfig

    config = SMoLoRAConfig(num_experts=4, rank=16, target_modules=("mlp.up_proj",))
    from_object = AdapterLayout.from_smolora_config(config, num_slots=2, trace_step_routes=0)
    from_dict = AdapterLayout.from_smolora_config(
        config.to_dict(), num_slots=2, trace_step_routes=0
    )
    assert from_object == from_dict
    shape = from_object.adapter_shape()
    assert (shape.num_experts, shape.rank, shape.instruction_dim, shape.target_modules) == (
        4,
        16,
        config.instruction_dim,
        ("mlp.up_proj",),
    )
    assert (from_object.experts_per_group, from_object.expert_rank) == (
        config.experts_per_group,
        config.expert_rank,
    )
    with pytest.raises(EngineConfigError, match="num_experts must be even"):
        AdapterLayout(num_experts=3, rank=12)
    with pytest.raises(EngineConfigError, match="adapter config"):
        AdapterLayout.from_smolora_config(
            {"num_experts": 4, "rank": 16, "no_such_field": 1}, num_slots=1, trace_step_routes=0
        )


def test_the_processed_image_cache_is_bounded(model_dir: Path) -> None:
    """vLLM's processed-image cache (4 GiB per process by default) is bounded by
    `mm_cache_gb`, and reaches the engine arguments."""
    from smolora.server.engine.engine import engine_args

    layout = AdapterLayout()
    config = EngineConfig(model_dir=model_dir, layout=layout)
    assert engine_args(config, layout)["mm_processor_cache_gb"] == config.mm_cache_gb == 0.25
    off = EngineConfig(model_dir=model_dir, layout=layout, mm_cache_gb=0)
    assert engine_args(off, layout)["mm_processor_cache_gb"] == 0
    with pytest.raises(EngineConfigError, match="mm_cache_gb"):
        EngineConfig(model_dir=model_dir, layout=layout, mm_cache_gb=-1)
