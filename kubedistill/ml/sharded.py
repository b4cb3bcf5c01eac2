"""The two ways a teacher training worker holds its model, and their checkpoints.

    ddp    every worker holds the whole model (Ray Train's `prepare_model`: DistributedDataParallel); rank 0 writes
           the full training state to `state.pt`
    fsdp   torch FSDP2 (`fully_shard`): each decoder layer one unit, the rest (embeddings, final norm, LM head) the
           root unit; weights, gradients and AdamW's moments sharded over the workers, bf16 compute with fp32
           reduction on GPUs; every rank writes its shard with torch.distributed.checkpoint (DCP), rank 0 also the
           loop's counters (`extra.pt`), and a checkpoint saved by N workers loads on M (DCP re-shards on load)

`Checkpoints.save(dir)` writes this rank's files (False: this rank has none), `Checkpoints.load(dir)` restores the
model, optimizer and scheduler and returns the step; `full_model_state` reads either kind into a plain model on one
process (the stage's final weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubedistill.ml.raytrain import STATE_FILE, load_tensors  # STATE_FILE: ddp, everything in one file

EXTRA_FILE = "extra.pt"  # fsdp: step, scheduler, RNG (rank 0); the tensors are DCP shards beside it
DCP_METADATA = ".metadata"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (its `_no_split_modules` classes), wherever they are nested
    (a peft wrapper, the reward model's backbone)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers to shard (no _no_split_modules)")
    return layers


def shard(model: nn.Module, device: torch.device, world: int, bf16: bool = True) -> nn.Module:
    """`model` sharded in place over `world` ranks with FSDP2: on CUDA with `bf16`, bf16 params for compute and fp32
    reduction; else fp32 params (on CPUs bf16 comes from the loop's autocast)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cuda" and bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient (activation) checkpointing on every Hugging Face model inside `model`, non-reentrant (it works with
    frozen inputs under LoRA and with FSDP)."""
    from transformers import PreTrainedModel

    found = False
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing and not found:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.config.use_cache = False
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")


@dataclass(frozen=True)
class Checkpoints:
    """Save and load the training state of one worker (see the module docstring)."""

    sharded: bool
    rank: int = 0

    def save(self, d: Path, model: nn.Module, optimizer: Any, scheduler: Any, step: int) -> bool:
        extra = {"step": step, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
        if not self.sharded:
            if self.rank != 0:
                return False
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}
            torch.save(state, d / STATE_FILE)
            return True
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(d))
        if self.rank == 0:
            torch.save(extra, d / EXTRA_FILE)
        return True

    def load(self, d: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> int:
        if not self.sharded:
            if not (d / STATE_FILE).is_file():
                raise ValueError(f"the checkpoint at {d} is sharded (fsdp); this run trains with ddp: {_switch()}")
            state = load_tensors(d / STATE_FILE)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        else:
            if not (d / DCP_METADATA).is_file():
                raise ValueError(f"the checkpoint at {d} is a ddp one; this run trains with fsdp: {_switch()}")
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optimizer": osd}
            dcp.load(state, checkpoint_id=str(d))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
            state = load_tensors(d / EXTRA_FILE)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        return int(state["step"])


def _switch() -> str:
    return "a stage resumes with the strategy it started with (its config hash names both)"


def full_model_state(d: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint directory of either kind, for a plain (unsharded) `model` on one process:
    a ddp checkpoint's `state.pt`, or a DCP checkpoint read into `model`'s own full-size tensors (no process group
    needed; any number of shards)."""
    if (d / STATE_FILE).is_file():
        return load_tensors(d / STATE_FILE)["model"]
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(d), no_dist=True)
    return state["model"]


def load_model(checkpoint: Any, model: nn.Module) -> None:
    """Load a Ray Train checkpoint's weights, of either strategy, into a plain `model`."""
    with checkpoint.as_directory() as d:
        model.load_state_dict(full_model_state(Path(d), model))
