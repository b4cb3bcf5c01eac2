"""Training arithmetic: `spec.teacher.resources.precision` and `spec.student.resources.precision`.

bf16 runs the matrix products of the forward pass (and so of the backward) in bfloat16 under `torch.autocast`; the
weights, their gradients, AdamW's moments and the losses stay fp32 (autocast computes cross-entropy and softmax in
fp32). fp32 computes everything in fp32. `auto` takes bf16 where the device computes it natively: CUDA GPUs with bf16
units (Ampere and newer; not a T4) and CPUs with AVX-512 BF16 or AMX, where a training step took 0.60-0.68x of fp32's
time (benchmarks/train_precision.py; RESULTS.md "Training in bf16 where the CPU computes it"); elsewhere fp32, since
emulated bf16 is slower than fp32.
"""

from __future__ import annotations

import contextlib
from typing import Any, get_args

import torch

from kubedistill.core.spec import Precision


def native_bf16(device_type: str) -> bool:
    """Whether `device_type` ("cuda", "cpu") computes bf16 products natively here."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU-feature checks
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def resolve(requested: Precision | str, device_type: str, native: bool | None = None) -> str:
    """bf16 or fp32: what `requested` (auto | bf16 | fp32) means on `device_type`; `native` overrides the probe."""
    if requested not in get_args(Precision):
        raise ValueError(f"precision: {requested!r}; expected one of {', '.join(get_args(Precision))}")
    if requested != "auto":
        return requested
    return "bf16" if (native_bf16(device_type) if native is None else native) else "fp32"


def autocast(precision: str, device_type: str) -> Any:
    """The context the forward pass and loss run in: bf16 autocast for "bf16", nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
