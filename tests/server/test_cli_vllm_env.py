"""The serve CLI prepares vLLM's environment; the engine library never touches it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import smolora.server.engine as engine_pkg
from smolora.server.cli import prepare_vllm_environment


def test_prepare_sets_v1_runner_and_drops_the_cpu_kv_cache_override() -> None:
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "PATH": "/bin"}
    changes = prepare_vllm_environment(env)
    assert env == {"VLLM_USE_V2_MODEL_RUNNER": "0", "PATH": "/bin"}
    assert len(changes) == 2
    assert prepare_vllm_environment(env) == []  # idempotent


def test_prepare_keeps_an_explicit_model_runner_choice() -> None:
    env = {"VLLM_USE_V2_MODEL_RUNNER": "1"}
    assert prepare_vllm_environment(env) == [] and env == {"VLLM_USE_V2_MODEL_RUNNER": "1"}


def test_engine_library_does_not_use_the_environment() -> None:
    """No module of server/engine names `os.environ` / `os.getenv` / `os.putenv`."""
    offenders = []
    for path in sorted(Path(engine_pkg.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
                and node.attr in ("environ", "getenv", "putenv", "unsetenv")
            ):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == [], offenders


def test_prepare_binds_one_cpu_group_per_tensor_parallel_rank() -> None:
    """vLLM's automatic CPU binding wants a NUMA node per rank; with fewer, the CLI splits
    the allowed CPUs into one group per rank, unless the user set a binding."""
    env: dict[str, str] = {}
    changes = prepare_vllm_environment(env, 2, device="cpu", cpus=[0, 1, 2, 3])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3" and any("BIND" in c for c in changes)
    env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    prepare_vllm_environment(env, 2, device="cpu", cpus=[0, 1])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    for tp, device in ((1, "cpu"), (2, "cuda")):
        env = {}
        prepare_vllm_environment(env, tp, device=device, cpus=[0, 1])
        assert "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_prepare_refuses_more_ranks_than_cpus() -> None:
    with pytest.raises(ValueError, match="a CPU per rank"):
        prepare_vllm_environment({}, 4, device="cpu", cpus=[0, 1])
