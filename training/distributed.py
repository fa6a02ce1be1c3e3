"""Data-parallel training under `torchrun`: process group, batch shards, DDP or FSDP2 wrapping.

The continual trainer runs unchanged in one process; under `torchrun --nproc-per-node N` the
CLI builds a `DataParallel` from torchrun's environment (`DistributedConfig.from_torchrun`)
and hands it to `ContinualTrainer`, which then:

- draws the same global batch on every rank from the same seeded stream (the method's
  `batches`, so Replay's buffer mix and SMoLoRA's task order are unchanged) and trains on
  this rank's contiguous shard of it (`shard`: `batch_size / world_size` examples);
- runs the training forward through `wrap(model)`: PyTorch's `DistributedDataParallel`
  (gradients all-reduced in backward; `find_unused_parameters` because top-1 routing leaves
  experts without a gradient in a step) or, with `sharding="fsdp2"`,
  `torch.distributed.fsdp.fully_shard` on every decoder layer and the root (parameters,
  gradients and optimizer state sharded; for models that do not fit one device);
- scales each rank's mean token loss by its share of the global batch's answer tokens
  (`scale_loss`), so the averaged gradient is the gradient of the global batch's mean token
  loss, as in one process;
- publishes checkpoints and writes reports on rank 0 only (`is_main`).

Evaluation is replicated: every rank evaluates the same examples (the rows rank 0 publishes
are its own). Backend: gloo on CPU, nccl on CUDA. This module does not launch processes
(torchrun does) and implements no collective of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

Sharding = Literal["ddp", "fsdp2"]
SHARDING_CHOICES: tuple[str, ...] = ("ddp", "fsdp2")
T = TypeVar("T")


@dataclass(frozen=True)
class DistributedConfig:
    """Where this process sits in the data-parallel group.

    Attributes:
        rank: global rank (0 publishes).
        world_size: number of processes.
        local_rank: rank on this host (picks the CUDA device).
        backend: "gloo" (CPU) or "nccl" (CUDA).
        sharding: "ddp" (replicated parameters, all-reduced gradients) or "fsdp2"
            (`fully_shard`: parameters, gradients and optimizer state sharded).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "gloo"
    sharding: Sharding = "ddp"

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {self.backend!r}")
        if self.sharding not in SHARDING_CHOICES:
            raise ValueError(f"sharding must be one of {SHARDING_CHOICES}, got {self.sharding!r}")

    @classmethod
    def from_torchrun(
        cls, env: Mapping[str, str], device: str, sharding: Sharding = "ddp"
    ) -> DistributedConfig | None:
        """The config torchrun describes in `env` (RANK, WORLD_SIZE, LOCAL_RANK), or None
        when the process was not started by torchrun. nccl for a CUDA `device`, else gloo."""
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        return cls(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            backend="nccl" if device.startswith("cuda") else "gloo",
            sharding=sharding,
        )

    def device(self, requested: str) -> str:
        """The torch device of this rank: `cuda:<local_rank>` when CUDA is requested."""
        return f"cuda:{self.local_rank}" if requested.startswith("cuda") else requested


class DataParallel:
    """One process of a data-parallel training group (see the module docstring).

    Joins the default process group on construction (torchrun's MASTER_ADDR/PORT rendezvous,
    `init_method="env://"`), unless one is already initialised; `close()` leaves it.

    Args:
        config: this process's place in the group.
    """

    def __init__(self, config: DistributedConfig):
        self.config = config
        self._owns_group = False
        if not dist.is_initialized():
            if config.backend == "nccl":
                torch.cuda.set_device(config.local_rank)
            dist.init_process_group(
                config.backend,
                init_method="env://",
                rank=config.rank,
                world_size=config.world_size,
            )
            self._owns_group = True
        logger.info(
            "data parallel: rank %d of %d (%s, %s)",
            config.rank,
            config.world_size,
            config.backend,
            config.sharding,
        )

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that publishes checkpoints and writes reports."""
        return self.config.rank == 0

    def shard(self, batch: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global batch.

        Raises:
            ValueError: the global batch does not split evenly over the ranks.
        """
        n, w = len(batch), self.world_size
        if n % w:
            raise ValueError(
                f"the global batch of {n} examples does not split over {w} processes; "
                "use a --batch-size that is a multiple of the number of processes"
            )
        per = n // w
        return list(batch[self.rank * per : (self.rank + 1) * per])

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run training forwards through (call after the stage's parameters
        are frozen or unfrozen: DDP records which parameters need gradients when built).

        DDP returns a wrapper around `model` (evaluation keeps calling `model` itself);
        FSDP2 shards `model` in place (once) and returns it.
        """
        if self.config.sharding == "fsdp2":
            return self._fully_shard(model)
        device_ids = [self.config.local_rank] if self.config.backend == "nccl" else None
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=device_ids,
            find_unused_parameters=True,
            broadcast_buffers=False,
        )

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(model, FSDPModule):
            # the no-grad forwards of evaluation leave the root's parameters gathered; a
            # training forward on that copy would give them no gradient: shard them again
            model.reshard()
            return model
        device_type = "cuda" if self.config.backend == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (self.world_size,))
        for module in model.modules():
            # one communication group per decoder layer, then the rest at the root
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def no_sync(self, wrapped: nn.Module, last_micro_batch: bool):
        """A context that skips the gradient all-reduce on all but the last micro-batch of
        an accumulated step (DDP only; FSDP2 always reduces)."""
        import contextlib

        if last_micro_batch or not isinstance(wrapped, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return wrapped.no_sync()

    def scale_loss(
        self, loss: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's loss term, and the global batch's mean token loss (detached, for logs).

        `loss` is the mean over this rank's answer tokens (the causal-LM loss: labels shifted
        by one, -100 ignored). Scaled by `world_size * n_rank / n_global`, the ranks' terms
        average (as DDP averages gradients) to the global batch's mean token loss.

        Args:
            loss: scalar mean token loss of this rank's shard.
            labels: [batch, seq] the shard's labels (-100 where ignored).
        """
        counts = torch.stack(
            [(labels[..., 1:] != -100).sum().to(torch.float64), loss.detach().to(torch.float64)]
        )
        counts[1] = counts[1] * counts[0]  # this rank's summed token loss
        dist.all_reduce(counts)
        n_rank = (labels[..., 1:] != -100).sum().to(loss.dtype)
        scale = self.world_size * n_rank / counts[0].to(loss.dtype).clamp_min(1)
        return loss * scale, (counts[1] / counts[0].clamp_min(1)).to(torch.float32)

    def full_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Plain tensors of a (possibly FSDP2-sharded) state: DTensors are gathered (every
        rank must call this), others returned as they are."""
        from torch.distributed.tensor import DTensor

        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Leave the process group (if this object joined it)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
