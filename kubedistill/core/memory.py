"""Per-worker memory of the teacher's training stages, estimated from the model's shape (its config.json, never
its weights) and the run's spec, before anything starts.

What one training worker holds at its peak, by term (bytes):

    params       the trained model's weights, fp32 (the master copy; bf16 compute on GPUs comes from autocast or
                 FSDP's mixed precision, unless `resources.precision` is fp32 or the GPU a T4: then every term
                 below is its CPU form): 4 * P, divided by the workers under fsdp
    grads        fp32 gradients of the trainable weights: 4 * T (/ workers under fsdp)
    optimizer    AdamW's two moments: 8 * T (/ workers under fsdp)
    reference    teacher-dpo's frozen start model: 2 * P on GPUs (bf16), 4 * P on CPUs (/ workers under fsdp)
    working      ddp: on GPUs autocast's bf16 copy of the trained weights (2 * T; the gradients are views into
                 DDP's buckets, no second copy);
                 fsdp: the gathered (unsharded) units in flight: the embeddings' unit for the whole step, two
                 decoder layers (the current and the prefetched one), their gradients before reduce-scatter
    activations  what the backward pass keeps, per layer per token (`_layer_activation_bytes`), times layers,
                 sequences (per-worker batch, x2 for reward and DPO pairs) and the sequence length; with
                 gradient checkpointing only each layer's input plus one layer recomputed; plus the logits (the
                 LM head's output, its fp32 copy and log-softmax) for the LM tasks
    runtime      on GPUs the CUDA context and allocator slack (`CUDA_RESERVE`)

with P the model's parameters and T the trained ones (LoRA: the adapters of q_proj and v_proj, peft's default
for Llama-style models). `estimate` adds them; `plan` picks the strategy when the spec says `auto` and says
whether each stage fits one GPU's memory (CPU workers: the pod's memory). The terms follow the ZeRO paper's
accounting (Rajbhandari et al. 2020, arXiv 1910.02054) and Korthikanti et al. 2022 (arXiv 2205.05198) for the
activations; the measured peaks they are checked against are in benchmarks/RESULTS.md ("Teacher memory").
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

GiB = 1024**3
CUDA_RESERVE = int(1.5 * GiB)  # CUDA context, NCCL buffers, the caching allocator's fragmentation

#: scratch presets: Llama shapes small enough to train on a laptop CPU in minutes
SCRATCH: dict[str, dict[str, int]] = {
    "llama-tiny": {
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
    },
    "llama-small": {
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
    },
}

#: each training stage's section of spec.teacher
SECTIONS = {"teacher-dapt": "dapt", "teacher-sft": "sft", "reward-model": "reward_model", "teacher-dpo": "dpo"}
TRAINING_STAGES = {"teacher-dapt": "lm", "teacher-sft": "lm", "reward-model": "reward", "teacher-dpo": "dpo"}


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder-only transformer (a Llama/Qwen/Mistral-style config)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # input and output embeddings share one matrix
    qkv_bias: bool = False
    source: str = ""  # where the shape came from (said in the plan)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str) -> Shape:
        """From a transformers config.json (Llama, Qwen2, Mistral, kubedistill's pruned Llama keep these keys)."""
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            inter = cfg["intermediate_size"]
            layers = int(cfg["num_hidden_layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a decoder config this planner knows (missing {e})") from e
        # a pruned model lists one intermediate size per layer: plan for the widest
        inter = max(inter) if isinstance(inter, list) else int(inter)
        return cls(
            vocab=int(cfg.get("vocab_size") or 32000),
            hidden=hidden,
            intermediate=inter,
            layers=layers,
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2",
            source=source,
        )

    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * q + 2 * self.hidden * kv + q * self.hidden + ((q + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def embedding_params(self) -> int:
        """Input embeddings, the final norm and (untied) the LM head: FSDP's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self, lm_head: bool = True) -> int:
        head = 0 if (self.tied or lm_head) else -self.vocab * self.hidden
        return self.layers * self.layer_params() + self.embedding_params() + head

    def lora_params(self, r: int) -> int:
        """peft's LoRA on q_proj and v_proj of every layer (its default target for Llama-style models)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * r * ((self.hidden + q) + (self.hidden + kv))


#: shapes of well-known base models (their published config.json), for planning without reading the files:
#: the operator plans from these alone, `kubedistill plan` when a model's config cannot be read
KNOWN: dict[str, Shape] = {
    "qwen2.5-0.5b": Shape(151936, 896, 4864, 24, 14, 2, 64, True, True, "catalogue: Qwen2.5-0.5B"),
    "qwen2.5-1.5b": Shape(151936, 1536, 8960, 28, 12, 2, 128, True, True, "catalogue: Qwen2.5-1.5B"),
    "qwen2.5-3b": Shape(151936, 2048, 11008, 36, 16, 2, 128, True, True, "catalogue: Qwen2.5-3B"),
    "qwen2.5-7b": Shape(152064, 3584, 18944, 28, 28, 4, 128, False, True, "catalogue: Qwen2.5-7B"),
    "qwen2.5-14b": Shape(152064, 5120, 13824, 48, 40, 8, 128, False, True, "catalogue: Qwen2.5-14B"),
    "qwen2.5-32b": Shape(152064, 5120, 27648, 64, 40, 8, 128, False, True, "catalogue: Qwen2.5-32B"),
    "qwen2.5-72b": Shape(152064, 8192, 29568, 80, 64, 8, 128, False, True, "catalogue: Qwen2.5-72B"),
    "llama-3.1-8b": Shape(128256, 4096, 14336, 32, 32, 8, 128, False, False, "catalogue: Llama-3.1-8B"),
    "llama-3.1-70b": Shape(128256, 8192, 28672, 80, 64, 8, 128, False, False, "catalogue: Llama-3.1-70B"),
    "mistral-7b": Shape(32768, 4096, 14336, 32, 32, 8, 128, False, False, "catalogue: Mistral-7B-v0.3"),
}


def known_shape(uri: str) -> Shape | None:
    """The catalogue's shape for a model named like one it knows (`Qwen/Qwen2.5-7B-Instruct`,
    `s3://models/qwen2.5-7b/`, `meta-llama/Llama-3.1-8B-Instruct`), else None."""
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    name = re.sub(r"^meta-", "", name)
    for key in sorted(KNOWN, key=len, reverse=True):
        if name == key or name.startswith(key + "-") or name.startswith(key + "_"):
            return KNOWN[key]
    return None


def read_shape(uri: str, options: Any = None, *, local_only: bool = False) -> tuple[Shape | None, str]:
    """(the model's shape, "") or (None, why not): a `scratch:` preset; the config.json of a local directory, of
    the hub cache, or (unless `local_only`) of an `s3://` prefix; else the catalogue by name. Weights are never
    read, and nothing is downloaded from a hub."""
    if uri.startswith("scratch:"):
        preset = SCRATCH.get(uri.removeprefix("scratch:"))
        if preset is None:
            return None, f"unknown preset {uri}"
        return Shape.from_config({**preset, "tie_word_embeddings": True}, uri), ""
    why = ""
    try:
        text = _config_text(uri, options, local_only)
        if text is not None:
            return Shape.from_config(json.loads(text), f"{uri} config.json"), ""
    except Exception as e:  # noqa: BLE001 - any failure to read (no credentials, no such prefix): said, then the catalogue
        why = f"config.json of {uri} unreadable: {type(e).__name__}: {str(e)[:200]}"
    shape = known_shape(uri)
    if shape is not None:
        return (replace(shape, source=f"{shape.source}; {why}") if why else shape), ""
    return None, why or f"config.json of {uri} not readable here and not a model the catalogue knows"


def _config_text(uri: str, options: Any, local_only: bool) -> str | None:
    from pathlib import Path

    if uri.startswith("s3://"):
        if local_only:
            return None
        from kubedistill.core.storage import Storage

        return Storage(uri, options).read_bytes("config.json").decode()
    if Path(uri).is_dir():
        return (Path(uri) / "config.json").read_text()
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(uri, "config.json")
    except ValueError:  # not a repo id
        return None
    return Path(cached).read_text() if isinstance(cached, str) else None


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One training stage as memory sees it."""

    task: str  # lm | reward | dpo
    workers: int
    batch: int  # global batch (sequences or pairs)
    seq: int  # tokens per example
    lora_r: int | None = None
    checkpointing: bool = False
    gpu: bool = False
    bf16: bool = True  # GPU workers computing in bf16 (`resources.precision`); CPU workers are estimated as fp32

    @property
    def per_worker(self) -> int:
        return max(1, self.batch // self.workers)


@dataclass(frozen=True)
class Estimate:
    strategy: str
    terms: dict[str, int]  # bytes per term (see the module docstring)
    activations_other: int  # activations with gradient checkpointing the other way round
    host_load: int = 0  # host RAM while the start model is loaded (rank 0), for CPU workers part of the peak

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def peak(self, gpu: bool) -> int:
        """What one worker's device holds at its peak (CPU workers also hold the loaded start model at first)."""
        return self.total if gpu else max(self.total, self.host_load)


def _layer_activation_bytes(s: Shape, act: int, frozen: bool = False) -> int:
    """Bytes one decoder layer keeps for backward per token: the two RMSNorms' fp32 inputs and outputs, q/k/v and
    their rotated copies, k/v repeated to every head (grouped-query attention), attention output, the MLP's gate,
    up, activation and product; `act` bytes per element (2 under bf16 autocast, 4 in fp32). `frozen` (LoRA): a
    frozen projection keeps no input for a weight gradient, so k's pre-rotation copy, one q copy and the MLP's
    product are not kept."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    norms = 2 * (4 * s.hidden + act * s.hidden)
    attn = act * (2 * q + 3 * kv + (2 * q if kv < q else 0) + q + s.hidden)
    mlp = act * 4 * s.intermediate
    saved = act * (q + kv + s.intermediate) if frozen else 0
    return norms + attn + mlp - saved


def estimate(shape: Shape, job: Job, strategy: str) -> Estimate:
    """Per-worker bytes of `job` under `strategy` (ddp | fsdp)."""
    lm_head = job.task != "reward"  # the reward model is the backbone without its LM head
    p = shape.params(lm_head=lm_head)
    t = shape.lora_params(job.lora_r) if job.lora_r else p
    n = job.workers if strategy == "fsdp" else 1
    half = job.gpu and job.bf16
    act = 2 if half else 4
    seqs = job.per_worker * (1 if job.task == "lm" else 2)
    tokens = seqs * job.seq

    def activations(ckpt: bool) -> int:
        layer = _layer_activation_bytes(shape, act, frozen=job.lora_r is not None) * tokens
        kept = shape.layers * act * shape.hidden * tokens + layer if ckpt else shape.layers * layer
        logits = tokens * shape.vocab * (act + 4 + 4) if lm_head else 0  # output, fp32 copy, log-softmax
        return kept + logits + tokens * shape.hidden * act * 2  # + embeddings' output and the final norm

    terms = {
        "params": 4 * p // n,
        "grads": 4 * t // n,
        "optimizer": 8 * t // n,
        "reference": ((2 if half else 4) * p // n) if job.task == "dpo" else 0,
    }
    if strategy == "fsdp":
        unit = act
        gathered = shape.embedding_params() * unit + 2 * shape.layer_params() * unit
        layer_grads = (
            2 * 4 * (shape.layer_params() if not job.lora_r else shape.lora_params(job.lora_r) // shape.layers)
        )
        terms["working"] = gathered + layer_grads
    else:
        terms["working"] = 2 * t if half else 0  # gradients live in DDP's buckets (gradient_as_bucket_view)
    terms["activations"] = activations(job.checkpointing)
    terms["runtime"] = CUDA_RESERVE if job.gpu else 0
    host_load = 4 * p * (2 if job.task == "dpo" else 1) + (terms["params"] if strategy == "fsdp" else 0)
    return Estimate(strategy, terms, activations(not job.checkpointing), host_load)


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    stage: str
    shape: Shape | None
    why_unknown: str = ""
    estimate: Estimate | None = None
    other: Estimate | None = None  # the other strategy's estimate, when it was a choice or a refusal's hint
    budget: int = 0  # bytes one worker may use
    budget_source: str = ""
    gpu: bool = False
    chosen_by: str = ""  # "auto" when the planner picked the strategy
    host_budget: int = 0  # GPU workers: the pod's memory, which holds the start model while it loads
    lora: bool = False

    @property
    def fits(self) -> bool | None:
        return None if self.estimate is None else self.estimate.peak(self.gpu) <= self.budget

    def refusal(self) -> str | None:
        """Why this stage cannot start, naming the fields to change; None when it fits (or is not known)."""
        if self.estimate is None or not self.gpu:
            return None
        e = self.estimate
        if self.fits:
            if self.host_budget and e.host_load > self.host_budget:
                return (
                    f"{self.stage}: each worker loads the start model into host memory first (about "
                    f"{gib(e.host_load)}) but its pod has {gib(self.host_budget)}; raise spec.teacher.resources.memory"
                )
            return None
        hints = []
        if e.strategy == "ddp":
            fsdp = f" (about {gib(self.other.total)} per worker)" if self.other is not None else ""
            hints.append(f"spec.teacher.resources.strategy: fsdp{fsdp}")
        else:
            hints.append("more spec.teacher.resources.workers")
        if e.terms["activations"] > e.activations_other:
            hints.append(f"spec.teacher.gradientCheckpointing: true (activations {gib(e.activations_other)})")
        if self.stage == "teacher-sft" and not self.lora:
            hints.append("spec.teacher.sft.lora")
        hints.append("a smaller spec.teacher.maxLength or batchSize")
        return (
            f"{self.stage} needs about {gib(e.total)} per worker ({e.strategy}: {breakdown(e)}) but one GPU has "
            f"{gib(self.budget)} ({self.budget_source}); change {'; or '.join(hints)}"
        )

    def line(self) -> str:
        if self.estimate is None:
            return f"not estimated ({self.why_unknown})"
        e = self.estimate
        verdict = "fits" if self.fits else ("DOES NOT FIT" if self.gpu else "exceeds")
        chosen = f"{e.strategy} (auto)" if self.chosen_by == "auto" else e.strategy
        ckpt = "with" if e.terms["activations"] <= e.activations_other else "without"
        return (
            f"{chosen}: ~{gib(e.peak(self.gpu))}/worker, {verdict} {gib(self.budget)} ({breakdown(e)}; activations "
            f"{ckpt} checkpointing, {gib(e.activations_other)} {'without' if ckpt == 'with' else 'with'}; "
            f"shape from {self.shape.source if self.shape else '?'})"
        )


def gib(n: int) -> str:
    """Bytes as GiB (MiB under one GiB)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def breakdown(e: Estimate) -> str:
    return ", ".join(f"{k} {gib(v)}" for k, v in e.terms.items() if v)


_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": 10**-3}
_SUFFIX.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60})


def default_memory(cpus: float) -> str:
    """A pod's memory when the spec sets none: 4Gi per CPU, at least 4Gi (every pod has a limit)."""
    return f"{max(4, 4 * math.ceil(cpus))}Gi"


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity (`16Gi`, `1.5G`, `512Mi`, `1e9`) in bytes."""
    m = re.fullmatch(r"([0-9.]+(?:[eE][-+]?[0-9]+)?)([kMGTPEm]i?)?", quantity.strip())
    if not m or (m.group(2) or "") not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    return int(float(m.group(1)) * _SUFFIX[m.group(2) or ""])


def job_for(spec: Any, stage: str) -> Job:
    """The memory view of one teacher training stage of a spec (`DistillationRunSpec`)."""
    t = spec.teacher
    section = getattr(t, SECTIONS[stage])  # the stage's own section only: a stage reads its spec slice
    lora = getattr(section, "lora", None)
    r = t.resources
    return Job(
        task=TRAINING_STAGES[stage],
        workers=r.workers,
        batch=section.batch_size,
        seq=t.max_length,
        lora_r=lora.r if lora else None,
        checkpointing=t.gradient_checkpointing,
        gpu=r.gpus_per_worker > 0,
        bf16=r.precision != "fp32" and r.gpu_type != "T4",  # auto: bf16 where the GPU computes it (a T4 does not)
    )


def plan_stage(spec: Any, stage: str, shape: Shape | None, why: str = "") -> StagePlan:
    """The strategy (resolving `auto`) and whether it fits, for one training stage of `spec`."""
    r = spec.teacher.resources
    job = job_for(spec, stage)
    host = quantity_bytes(r.memory or default_memory(r.cpus_per_worker))
    if job.gpu:
        gb, source = r.gpu_memory()
        budget = int(gb * GiB)
    else:
        budget = host
        source = "resources.memory" if r.memory else "the pod's default memory"
    if shape is None:
        return StagePlan(stage, None, why, budget=budget, budget_source=source, gpu=job.gpu)
    ddp, fsdp = estimate(shape, job, "ddp"), estimate(shape, job, "fsdp")
    if r.strategy == "auto":
        chosen = ddp if (job.workers == 1 or ddp.peak(job.gpu) <= budget) else fsdp
    else:
        chosen = ddp if r.strategy == "ddp" else fsdp
    other = fsdp if chosen is ddp else ddp
    by = "auto" if r.strategy == "auto" else ""
    return StagePlan(
        stage, shape, "", chosen, other, budget, source, job.gpu, by, host if job.gpu else 0, job.lora_r is not None
    )


@dataclass
class MemoryPlan:
    stages: dict[str, StagePlan] = field(default_factory=dict)

    def refusals(self) -> list[str]:
        return [why for p in self.stages.values() if (why := p.refusal())]


def plan(spec: Any, stages: list[str], options: Any = None, *, local_only: bool = False) -> MemoryPlan:
    """The memory plan of a run's enabled teacher training stages (`stages`: the run's stage names)."""
    out = MemoryPlan()
    training = [s for s in stages if s in TRAINING_STAGES]
    if not training:
        return out
    # every teacher stage has the base model's shape (DAPT's and SFT's outputs keep it): one read for all
    uri = spec.teacher.base_model
    shape, why = _local_shape(uri) if local_only else read_shape(uri, options)
    for stage in training:
        out.stages[stage] = plan_stage(spec, stage, shape, why)
    return out


@functools.lru_cache(maxsize=1024)
def _local_shape(uri: str) -> tuple[Shape | None, str]:
    """`read_shape` without storage, remembered: the operator plans every reconcile, the answer stays the same."""
    return read_shape(uri, local_only=True)


def strategy(spec: Any, stage: str, shape: Shape | None) -> str:
    """ddp or fsdp for a training stage: the spec's choice, or `auto` resolved as `plan` resolves it (ddp when the
    shape is unknown)."""
    chosen = spec.teacher.resources.strategy
    if chosen != "auto":
        return chosen
    p = plan_stage(spec, stage, shape)
    return p.estimate.strategy if p.estimate else "ddp"
