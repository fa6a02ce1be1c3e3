"""deploy/'s Prometheus config and alert rules pass `promtool`, and the engine alerts on vLLM's
own families fire on the series they are written for (`promtool test rules`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.promtool import promtool_path

DEPLOY = Path(__file__).parents[2] / "deploy"

#: promtool unit tests of the vLLM-metric alerts: a full KV cache for 15 minutes, steady
#: preemption for 20 minutes, and a healthy engine that fires neither.
RULE_TESTS = """\
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'vllm:kv_cache_usage_perc{model_name="m", engine="0"}'
        values: '0.97x20'
      - series: 'vllm:num_preemptions_total{model_name="m", engine="0"}'
        values: '0+30x40'
      - series: 'vllm:kv_cache_usage_perc{model_name="ok", engine="0"}'
        values: '0.5x20'
      - series: 'vllm:num_preemptions_total{model_name="ok", engine="0"}'
        values: '0x40'
    alert_rule_test:
      - eval_time: 15m
        alertname: SmoloraKVCacheFull
        exp_alerts:
          - exp_labels: {model_name: m}
            exp_annotations:
              summary: "the engine's KV cache is nearly full; requests wait in vLLM's \
scheduler or get preempted"
      - eval_time: 25m
        alertname: SmoloraEnginePreempting
        exp_alerts:
          - exp_labels: {model_name: m}
            exp_annotations:
              summary: "vLLM keeps preempting running requests: raise --engine-option \
kv_cache_bytes or lower max_num_seqs"
      - eval_time: 5m
        alertname: SmoloraKVCacheFull
        exp_alerts: []
"""


def _promtool(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        [promtool_path(), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_config_and_rules_pass_promtool() -> None:
    _promtool(
        "check", "config", "prometheus.yml", cwd=DEPLOY
    )  # also checks alerts.yml, its rule file


def test_engine_alerts_fire_on_vllm_series(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    _promtool("test", "rules", "tests.yml", cwd=tmp_path)
