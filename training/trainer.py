"""The continual trainer: one method over a task sequence, publishing after every task.

For each task t (from the first not yet published): the method prepares the stage
(`begin_task`: e.g. SMoLoRA freezes its gates after task 1), the adapter trains with AdamW
and a warm-up + decay schedule (gradient accumulation, clipping, bf16 autocast on GPU),
every task seen so far is evaluated (row t of the accuracy matrix a_{t,i}), and a
versioned checkpoint is published atomically into the registry with the instruction
table, adapter config, base fingerprint, tasks in order, training config and that row.
After the sequence, the final model is evaluated on the unseen tasks (zero-shot; few-shot
by short fine-tunes that are then undone) and on held-out instruction paraphrases.

Resuming: versions in the registry whose manifest carries this run's `run_key` and base
fingerprint are the completed stages; their tensors and rows are loaded and training
continues after them.
Under `torchrun` (a `DataParallel` passed in, see `distributed.py`) each rank trains on its
shard of every global batch through DDP or FSDP2, and only rank 0 publishes and writes files.
Every stage seeds its data order and dropout from (seed, task), so a resumed run equals an
uninterrupted one. This module does not define adapters or methods (see `methods/`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import get_scheduler

from smolora.adapters.checkpoint import (
    CheckpointManifest,
    base_model_fingerprint,
    list_versions,
    load_checkpoint,
    publish_checkpoint,
    read_manifest,
)
from smolora.adapters.instructions import InstructionEncoder, InstructionTable, InstructionType
from smolora.adapters.precision import resolve_dtype
from smolora.adapters.smolora import SMoLoRAModel
from smolora.adapters.tiny_llava import load_llava
from smolora.training import metrics
from smolora.training.config import RunConfig
from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.cvit_json import Example
from smolora.training.data.mini_cvit import few_shot_split, load_split
from smolora.training.data.tasks import FEW_SHOT, TASKS, ZERO_SHOT
from smolora.training.distributed import DataParallel
from smolora.training.evaluate import TaskResult, evaluate_task
from smolora.training.methods import ContinualMethod, build_method
from smolora.training.methods.base import seeded_generator
from smolora.training.routing_stats import route_usage, sharing

logger = logging.getLogger(__name__)

JOINT_STAGE = "multitask"
_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class Stage:
    """One training stage: a task (or, for joint training, all tasks)."""

    name: str
    tasks: tuple[str, ...]
    examples: list[Example]


class ContinualTrainer:
    """Trains, evaluates and publishes one method over a task sequence.

    Args:
        run: the run configuration.
        progress: show progress bars.
        instructions: a MiniLM encoder to share (default: a new one).
        parallel: this process's data-parallel group under torchrun (None: one process).
    """

    def __init__(
        self,
        run: RunConfig,
        progress: bool = True,
        instructions: InstructionEncoder | None = None,
        parallel: DataParallel | None = None,
    ):
        self.run = run
        self.parallel = parallel
        #: Publishes checkpoints and writes files: rank 0, or the only process.
        self.is_main = parallel is None or parallel.is_main
        self.progress = progress and self.is_main
        if run.num_threads:
            torch.set_num_threads(run.num_threads)
        torch.set_flush_denormal(True)  # denormal floats slow CPU training several-fold
        self.device = torch.device(run.device)
        #: "float32" or "bfloat16" (autocast): `run.dtype` resolved for this device.
        self.compute_dtype = resolve_dtype(run.dtype, self.device)
        self.model, self.processor = load_llava(run.base_dir)
        self.model.to(self.device)
        self.fingerprint = base_model_fingerprint(run.base_dir)
        self.encoder = ExampleEncoder(self.processor)
        self.instructions = instructions or InstructionEncoder()
        self.method: ContinualMethod = build_method(run, self.instructions)
        self.method.attach(self.model)
        self.method.probe = self._probe
        self.method.loss = self._loss
        self.model.eval()
        self.train_sets = {
            t: load_split(run.data_root, run.setting, t, "train", run.train_limit)
            for t in run.tasks
        }
        self.test_sets = {
            t: load_split(run.data_root, run.setting, t, "test", run.eval.test_limit)
            for t in run.tasks
        }
        self.stages = self._stages()
        self.rows: list[dict[str, dict[str, Any]]] = []
        self.stage_log: list[dict[str, Any]] = []
        #: Examples generated and seconds spent by evaluation in this process.
        self.eval_examples, self.eval_seconds = 0, 0.0

    # -- plan -------------------------------------------------------------------------
    def _stages(self) -> list[Stage]:
        if not self.method.trains:
            return []
        if self.method.joint:
            union = [ex for t in self.run.tasks for ex in self.train_sets[t]]
            return [Stage(JOINT_STAGE, self.run.tasks, union)]
        return [Stage(t, (t,), self.train_sets[t]) for t in self.run.tasks]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- training ---------------------------------------------------------------------
    def train_stage(self, index: int, stage: Stage, steps: int | None = None) -> dict[str, Any]:
        """Train one stage; returns its log (steps, mean loss of the last 10%, seconds)."""
        run, opt_cfg, method = self.run, self.run.optim, self.method
        method.prepare_task(index, stage.name, stage.examples, self._probe)
        method.begin_task(index, stage.name)
        total = steps if steps is not None else opt_cfg.stage_steps(len(stage.examples))
        if self.method.joint and steps is None and opt_cfg.steps_per_task is not None:
            total = opt_cfg.steps_per_task * len(stage.tasks)
        par = self.parallel
        # after begin_task (DDP records which parameters train) and before collecting them
        # (FSDP2 replaces them with sharded ones)
        forward = par.wrap(self.model) if par is not None else self.model
        params = method.trainable_parameters()
        optim = torch.optim.AdamW(params, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
        sched = get_scheduler(
            _SCHEDULES[opt_cfg.schedule],
            optim,
            num_warmup_steps=int(opt_cfg.warmup_ratio * total),
            num_training_steps=total,
        )
        rng = random.Random(f"{run.seed}|order|{stage.name}|{index}")
        torch.manual_seed(
            int(seeded_generator(run.seed, "dropout", stage.name, index).initial_seed())
        )
        stream = method.batches(index, stage.examples, opt_cfg.batch_size, rng)
        losses: list[float] = []
        start = time.perf_counter()
        self.model.train()
        bar = tqdm(
            range(total),
            desc=f"{method.name} {index + 1}:{stage.name}",
            disable=not self.progress,
            leave=False,
        )
        for _ in bar:
            step_loss = 0.0
            for micro in range(opt_cfg.grad_accum):
                examples = next(stream)
                batch = self.encoder.collate_train(par.shard(examples) if par else examples)
                tensors = {
                    k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)
                }
                sync = par.no_sync(forward, micro == opt_cfg.grad_accum - 1) if par else None
                with sync or contextlib.nullcontext():
                    with self._autocast(), method.scope(batch) as set_mask:
                        set_mask(tensors["attention_mask"])
                        out = forward(**tensors)
                        loss, logged = out.loss, out.loss.detach()
                        if par is not None:  # this rank's share of the global token mean
                            loss, logged = par.scale_loss(out.loss, tensors["labels"])
                        aux = method.auxiliary_loss()
                        if aux is not None:
                            loss = loss + aux
                    (loss / opt_cfg.grad_accum).backward()
                step_loss += float(logged) / opt_cfg.grad_accum
            if opt_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, opt_cfg.max_grad_norm)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}")
        self.model.eval()
        seconds = time.perf_counter() - start
        method.end_task(index, stage.name, stage.examples)
        tail = losses[-max(1, len(losses) // 10) :]
        return {
            "stage": index,
            "name": stage.name,
            "steps": total,
            "examples": total * opt_cfg.batch_size * opt_cfg.grad_accum,
            "loss": sum(tail) / len(tail),
            "seconds": seconds,
            "end_task_seconds": time.perf_counter() - start - seconds,
        }

    @torch.no_grad()
    def _probe(self, examples: list[Example], with_answers: bool) -> None:
        """A no-grad eval-mode forward of `examples` under the method's scope (see `Probe`)."""
        was_training = self.model.training
        self.model.eval()
        for i in range(0, len(examples), self.run.eval.batch_size):
            chunk = examples[i : i + self.run.eval.batch_size]
            batch = (
                self.encoder.collate_train(chunk)
                if with_answers
                else self.encoder.collate_generate(chunk)
            )
            tensors = {
                k: v.to(self.device)
                for k, v in batch.items()
                if k in ("input_ids", "attention_mask", "pixel_values")
            }
            mask = tensors["attention_mask"]
            with self._autocast(), self.method.scope(batch) as set_mask:
                set_mask(mask)
                self.model(**tensors, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
        self.model.train(was_training)

    def _loss(self, examples: list[Example]) -> torch.Tensor:
        """The training loss of `examples` (answer tokens), with grad, under the method's
        scope, in the model's current mode (see `ContinualMethod.loss`)."""
        batch = self.encoder.collate_train(examples)
        tensors = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with self._autocast(), self.method.scope(batch) as set_mask:
            set_mask(tensors["attention_mask"])
            return self.model(**tensors).loss

    def _state_path(self) -> Path:
        return self.run.out_dir / "method_state.pt"

    def _save_run_state(self) -> None:
        if not self.is_main:
            return
        state = self.method.run_state()
        if state is not None:
            tmp = self._state_path().with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(self._state_path())

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, task: str, examples: list[Example]) -> TaskResult:
        """Evaluate one task with the weights the method picks for it."""
        texts = sorted({ex.instruction for ex in examples})
        start = time.perf_counter()
        with self.method.evaluation(task, texts):
            result = evaluate_task(
                self.model,
                self.encoder,
                examples,
                self.method.scope,
                self.run.eval.batch_size,
                spec=TASKS.get(task),
                progress=self.progress,
            )
        self.eval_seconds += time.perf_counter() - start
        self.eval_examples += len(examples)
        return result

    def _row(self, seen: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        return {t: self.evaluate(t, self.test_sets[t]).summary() for t in seen}

    # -- publishing -------------------------------------------------------------------
    def _instruction_table(self, stages: list[Stage]) -> InstructionTable:
        table = InstructionTable()
        for st in stages:
            for task in st.tasks:
                texts = sorted({ex.instruction for ex in self.train_sets[task]})
                for k, (text, emb) in enumerate(zip(texts, self.instructions.encode(texts))):
                    table.add(
                        InstructionType(f"{task}.{k}", text, task, tuple(float(x) for x in emb))
                    )
        return table

    def _publish(self, index: int, row: dict[str, Any], log: dict[str, Any]) -> None:
        if self.method.adapter is None:
            return
        done = self.stages[: index + 1]
        tasks = [t for st in done for t in st.tasks]
        manifest = CheckpointManifest(
            adapter_kind=self.method.adapter_kind,
            adapter_config=self.method.adapter_config(),
            base_model={"fingerprint": self.fingerprint, "name": self.run.base_dir.name},
            layers=list(self.method.adapter.layers),
            tasks=tasks,
            instruction_types=self._instruction_table(done).to_list(),
            training={
                "method": self.method.name,
                "stage": index,
                "stage_name": done[-1].name,
                "run_key": self.run.run_key(),
                "config": self.run.to_dict(),
                "log": log,
            },
            eval={"row": row},
        )
        tensors = self.method.state_tensors()
        if self.parallel is not None:
            tensors = self.parallel.full_tensors(tensors)  # every rank takes part (FSDP2)
        if not self.is_main:
            return
        entry = publish_checkpoint(self.run.registry, tensors, manifest)  # type: ignore[arg-type]
        logger.info("published %s", entry.path)

    def _resume(self) -> int:
        """Load completed stages from the registry; returns how many there are."""
        key = json.loads(json.dumps(self.run.run_key()))
        done = []
        for entry in list_versions(self.run.registry):  # type: ignore[arg-type]
            m = read_manifest(entry.path)
            same_run = (
                m.training.get("run_key") == key
                and m.base_model.get("fingerprint") == self.fingerprint
            )
            if same_run and m.training.get("stage") == len(done):
                done.append(entry)
        if done and self._state_path().is_file():
            self.method.load_run_state(torch.load(self._state_path(), weights_only=True))
        for i, entry in enumerate(done):
            ck = load_checkpoint(entry.path, expected_fingerprint=self.fingerprint)
            stage = self.stages[i]
            self.method.load_state(i, stage.name, ck.tensors)
            self.method.end_task(i, stage.name, stage.examples)
            self.rows.append(ck.manifest.eval["row"])
            self.stage_log.append(ck.manifest.training["log"])
        if done:
            logger.info("resuming %s after %d published stage(s)", self.method.name, len(done))
        return len(done)

    # -- the run ----------------------------------------------------------------------
    def run_all(self) -> dict[str, Any]:
        """Train every remaining stage, then the final evaluations; writes `results.json`.

        Returns:
            The method's results (also written to `out_dir/results.json`).
        """
        start = time.perf_counter()
        out = self.run.out_dir
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
        first = self._resume() if self.stages else 0
        if not self.stages:  # zero-shot: the base, evaluated once
            self.rows = [self._row(self.run.tasks)]
        for index in range(first, len(self.stages)):
            stage = self.stages[index]
            log = self.train_stage(index, stage)
            seen = self.run.tasks if self.method.joint else self.run.tasks[: index + 1]
            row = self._row(seen)
            self.rows.append(row)
            self.stage_log.append(log)
            self._publish(index, row, log)
            self._save_run_state()
            self._write_matrix()
            logger.info(
                "%s stage %d (%s): %s",
                self.method.name,
                index + 1,
                stage.name,
                {t: r["score"] for t, r in row.items()},
            )
        results = self._final(time.perf_counter() - start)
        if self.is_main:
            (out / "results.json").write_text(json.dumps(results, indent=1))
        return results

    def _matrices(self) -> tuple[list[list[float | None]], list[list[float | None]]]:
        tasks = self.run.tasks
        rows = self.rows
        if not self.method.trains:  # the base never changes: a_{t,i} = a_{0,i}
            rows = [
                {t: r for t, r in self.rows[0].items() if tasks.index(t) <= s}
                for s in range(len(tasks))
            ]
        score = [[row[t]["score"] if t in row else None for t in tasks] for row in rows]
        fmt = [[row[t]["format_rate"] if t in row else None for t in tasks] for row in rows]
        return score, fmt

    def _write_matrix(self) -> None:
        if not self.is_main:
            return
        score, fmt = self._matrices()
        payload = {"tasks": list(self.run.tasks), "matrix": score, "format_matrix": fmt}
        (self.run.out_dir / "matrix.json").write_text(json.dumps(payload, indent=1))

    def _final(self, train_seconds: float) -> dict[str, Any]:
        score, fmt = self._matrices()
        self._write_matrix()
        final_row = self.rows[-1]
        captions = [final_row[t].get("metric") == "cider" for t in self.run.tasks]
        res: dict[str, Any] = {
            "method": self.method.name,
            "setting": self.run.setting,
            "tasks": list(self.run.tasks),
            # AP/MAP/BWT on the paper's scale, *_balanced on the matrix's (see metrics.py).
            **metrics.continual_metrics(score, captions),
            "MIF": metrics.mean_instruction_following([float(x) for x in fmt[-1] if x is not None]),
            "matrix": score,
            "format_matrix": fmt,
            "final": final_row,
            "stages": self.stage_log,
        }
        ev = self.run.eval
        start = time.perf_counter()
        if ev.unseen:
            res["unseen"] = self._unseen()
        if ev.robustness:
            res["robustness"] = self._robustness(res["AP"], res["AP_balanced"])
        if isinstance(self.method.adapter, SMoLoRAModel):
            res["routing"] = self._routing()
        res["runtime_s"] = train_seconds + time.perf_counter() - start
        res["throughput"] = self._throughput()
        res["config"] = self.run.to_dict()
        return res

    def _unseen(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for task in ZERO_SHOT:
            r = self.evaluate(
                task,
                load_split(
                    self.run.data_root, self.run.setting, task, "test", self.run.eval.test_limit
                ),
            )
            out[task] = r.summary()
        for task in FEW_SHOT:
            pool = load_split(self.run.data_root, self.run.setting, task, "train")
            test = load_split(
                self.run.data_root, self.run.setting, task, "test", self.run.eval.test_limit
            )
            for k in self.run.eval.few_shot:
                if self.method.trains:
                    snap = self.method.snapshot()
                    stage = Stage(task, (task,), few_shot_split(pool, k))
                    self.train_stage(len(self.stages), stage, steps=self.run.eval.few_shot_steps)
                    out[f"{task}_{k}shot"] = self.evaluate(task, test).summary()
                    self.method.restore_snapshot(snap)
                else:
                    out[f"{task}_{k}shot"] = self.evaluate(task, test).summary()
        return out

    def _routing(self, per_task: int = 16) -> dict[str, Any]:
        """Expert usage per task of the final model, and how much tasks share experts."""
        usage = {
            t: route_usage(
                self.method.adapter,
                self.encoder,
                self.instructions.encode,
                self.test_sets[t][:per_task],
            )  # type: ignore[arg-type]
            for t in self.run.tasks
        }
        return {"sharing": sharing(usage), "usage": usage}

    def _robustness(self, ap_seen: float, ap_seen_balanced: float) -> dict[str, Any]:
        """The final model on held-out instruction paraphrases: `AP_heldout` on the paper's
        scale, `AP_heldout_balanced` on the balanced one (see metrics.py)."""
        per = {}
        for task in self.run.tasks:
            held = load_split(
                self.run.data_root, self.run.setting, task, "test_heldout", self.run.eval.test_limit
            )
            per[task] = self.evaluate(task, held).summary()
        paper = [metrics.paper_scale_score(r["score"], r["metric"]) for r in per.values()]
        return {
            "AP_heldout": sum(paper) / len(paper),
            "AP_heldout_balanced": sum(r["score"] for r in per.values()) / len(per),
            "AP_seen": ap_seen,
            "AP_seen_balanced": ap_seen_balanced,
            "per_task": per,
        }

    def _throughput(self) -> dict[str, float | None]:
        """Training examples/s over the sequence's stages (also stages loaded on resume,
        from their logs) and evaluation (generated answers) examples/s in this process."""
        examples = sum(log.get("examples", 0) for log in self.stage_log)
        seconds = sum(log.get("seconds", 0.0) for log in self.stage_log if "examples" in log)
        return {
            "train_examples": examples,
            "train_seconds": round(seconds, 3),
            "train_examples_per_s": examples / seconds if seconds > 0 else None,
            "eval_examples": self.eval_examples,
            "eval_seconds": round(self.eval_seconds, 3),
            "eval_examples_per_s": (
                self.eval_examples / self.eval_seconds if self.eval_seconds > 0 else None
            ),
        }


def train_method(
    run: RunConfig, progress: bool = True, parallel: DataParallel | None = None
) -> dict[str, Any]:
    """Convenience: build a `ContinualTrainer` and run it (on this rank of `parallel`)."""
    return ContinualTrainer(run, progress=progress, parallel=parallel).run_all()


def results_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "results.json"
