"""The Ray Train loop of every teacher stage: DDP over `spec.teacher.resources`, bf16 autocast where the
workers compute it natively (`resources.precision`, kubedistill.ml.precision), a checkpoint in the stage's
storage prefix every `checkpoint_every` steps, and resume from the latest one when the job runs again (same
run name and storage path: a retried RayJob, a rerun of `kubedistill run` after a kill).

A stage hands `fit` a task, one of:

    lm       examples {"text"} (all tokens trained: DAPT) or {"prompt", "response"} (response only: SFT)
    reward   pairs {"prompt", "chosen", "rejected", "dimension"}: a RewardModel, one head per dimension
    dpo      pairs {"prompt", "chosen", "rejected"}: the policy against a frozen reference (the start model)

and gets back the last checkpoint (the final weights), which the stage loads on a worker and saves
as its model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubedistill.core.progress import Target
from kubedistill.core.spec import LoraSpec, Resources, TrainSpec
from kubedistill.core.stage import StageContext
from kubedistill.core.storage import S3Options, Storage
from kubedistill.ml import losses, precision, raytrain, sharded
from kubedistill.ml.sharded import Checkpoints


@dataclass(frozen=True)
class TrainConfig:
    """One teacher training run, as the Ray Train loop receives it (pickled, not re-keyed)."""

    task: str  # lm | reward | dpo
    start: str  # URI of the start model (save_pretrained files)
    examples_uri: str  # jsonl rows of the task
    train: TrainSpec  # the stage's spec section: epochs, learningRate, batchSize (global), maxSteps
    max_length: int = 256
    dimensions: tuple[str, ...] = ()  # reward
    beta: float = 0.1  # dpo
    nll_weight: float = 0.0  # dpo: weight of the chosen response's NLL
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] | None = None  # modules given adapters; None: PEFT's default for the model type
    strategy: str = "ddp"  # ddp | fsdp (kubedistill.ml.sharded); `auto` is resolved before (kubedistill.core.memory)
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto | bf16 | fp32 (kubedistill.ml.precision), resolved on each worker
    checkpoint_every: int = 20  # steps; runs longer than 25 x this checkpoint 25 times in all instead
    seed: int = 0
    s3: S3Options = field(default_factory=S3Options)  # endpoint and region; credentials come from the environment


# ---------------------------------------------------------------------------------------------
# Tokenisation


def encode(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask/labels; labels IGNORE on the prompt and the padding.

    An empty prompt trains every token (DAPT). The response ends with the tokenizer's eos, so the
    model learns to stop. Over-long rows keep their prompt's start and lose the response's end.
    """
    rows_ids, rows_labels = [], []
    for p, r in zip(prompts, responses, strict=True):
        p_ids = tokenizer(p, add_special_tokens=False).input_ids if p else []
        r_ids = [*tokenizer(r, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        ids = (p_ids + r_ids)[:max_length]
        labels = ([losses.IGNORE] * len(p_ids) + r_ids)[:max_length]
        rows_ids.append(ids)
        rows_labels.append(labels)
    width = max(len(x) for x in rows_ids)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows_ids), width), pad, dtype=torch.long)
    labels = torch.full((len(rows_ids), width), losses.IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(rows_ids, rows_labels, strict=True)):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# The reward model


class RewardModel(nn.Module):
    """A transformer backbone (the SFT teacher without its LM head) and one linear score per dimension,
    read at each sequence's last real token."""

    def __init__(self, backbone: nn.Module, dimensions: list[str]):
        super().__init__()
        self.backbone = backbone
        self.dimensions = list(dimensions)
        self.heads = nn.Linear(backbone.config.hidden_size, len(dimensions))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(-1) - 1
        return self.heads(h[torch.arange(h.size(0), device=h.device), last]).float()


def combined(scores: torch.Tensor, dimensions: list[str], weights: dict[str, float]) -> torch.Tensor:
    """The reward: sum of each dimension's score times its weight, (b, d) -> (b,)."""
    w = torch.tensor([weights.get(d, 0.0) for d in dimensions], dtype=scores.dtype, device=scores.device)
    return scores @ w


# ---------------------------------------------------------------------------------------------
# One step of each task


def lm_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return losses.causal_lm_loss(out.logits.float(), batch["labels"])


def reward_step(
    model: nn.Module, chosen: dict[str, torch.Tensor], rejected: dict[str, torch.Tensor], dim_index: torch.Tensor
) -> torch.Tensor:
    rows = torch.arange(dim_index.size(0), device=dim_index.device)
    sc = model(chosen["input_ids"], chosen["attention_mask"])[rows, dim_index]
    sr = model(rejected["input_ids"], rejected["attention_mask"])[rows, dim_index]
    return losses.pairwise_reward_loss(sc, sr)


def logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return losses.sequence_logprob(out.logits.float(), batch["labels"])


def label_probabilities(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    reasonings: list[str],
    labels: list[str],
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """The teacher's distribution over `labels` for each prompt, given the reasoning it wrote: the softmax over
    the labels of log p(response(reasoning, label) | prompt), shape (n, len(labels)). The response puts the
    reasoning before the label, so every label's response shares the reasoning's tokens and what differs is
    p(label line, end | prompt, reasoning): the soft targets a `kd` student learns from (Hinton et al., 2015,
    "Distilling the Knowledge in a Neural Network"), read off the chain the teacher wrote. A response longer
    than the model's context would lose its label to truncation, so it raises ValueError naming the row."""
    from kubedistill.stages.teacher import fmt

    limit = int(getattr(model.config, "max_position_embeddings", 2048))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                p, r = prompts[i : i + batch_size], reasonings[i : i + batch_size]
                scores = []
                for label in labels:
                    batch = encode(tokenizer, p, [fmt.response(x, label) for x in r], limit + 1)
                    if (long := batch["attention_mask"].sum(-1) > limit).any():
                        row = i + int(long.nonzero()[0, 0])
                        raise ValueError(f"row {row}: the prompt and response exceed the model's {limit} tokens")
                    scores.append(logprobs(model, {k: v.to(device) for k, v in batch.items()}))
                out.append(torch.stack(scores, -1).softmax(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, len(labels))


def dpo_step(
    policy: nn.Module,
    reference: nn.Module,
    chosen: dict[str, torch.Tensor],
    rejected: dict[str, torch.Tensor],
    beta: float,
    nll_weight: float = 0.0,
) -> torch.Tensor:
    with torch.no_grad():
        ref_c, ref_r = logprobs(reference, chosen), logprobs(reference, rejected)
    logits_c = policy(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"]).logits.float()
    pol_c = losses.sequence_logprob(logits_c, chosen["labels"])
    loss = losses.dpo_loss(pol_c, logprobs(policy, rejected), ref_c, ref_r, beta)
    if nll_weight:
        loss = loss + nll_weight * losses.token_nll(logits_c, chosen["labels"]).mean()
    return loss


def preference_accuracy(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    pairs: list[dict[str, str]],
    max_length: int,
    batch_size: int = 32,
) -> float:
    """The share of preference pairs whose DPO implicit reward margin (`losses.dpo_margin`) is positive (TRL's
    `rewards/accuracies`). A tie is not fitted: before training, where policy = reference, the share is 0. What
    DPO optimises on its own pairs, so a check that it trained, where the held-out reward is a draw."""
    if not pairs:
        return 0.0
    device = next(policy.parameters()).device
    fitted = 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            batch = pairs[i : i + batch_size]
            prompts = [p["prompt"] for p in batch]
            c, r = (
                {k: v.to(device) for k, v in encode(tokenizer, prompts, [p[side] for p in batch], max_length).items()}
                for side in ("chosen", "rejected")
            )
            margin = losses.dpo_margin(
                logprobs(policy, c), logprobs(policy, r), logprobs(reference, c), logprobs(reference, r)
            )
            fitted += int((margin > 0).sum())
    return fitted / len(pairs)


# ---------------------------------------------------------------------------------------------
# Models per task


def build(
    cfg: TrainConfig, options: S3Options | None, *, reference: bool = True
) -> tuple[nn.Module, Any, nn.Module | None]:
    """(trained module, tokenizer, frozen reference or None) for the task, from `cfg.start`.

    `reference=False` skips DPO's frozen copy (loading trained weights after training needs none)."""
    from transformers import AutoModel, AutoTokenizer

    from kubedistill.ml.models import resolve
    from kubedistill.stages.teacher import lm

    # every worker builds the same start (LoRA adapters, reward heads): FSDP shards what each rank holds,
    # nothing broadcasts it
    torch.manual_seed(cfg.seed)
    if cfg.task == "reward":
        path = resolve(cfg.start, "start model", options)
        tokenizer = AutoTokenizer.from_pretrained(path)
        lm.ensure_specials(tokenizer, None)
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
        return RewardModel(backbone, list(cfg.dimensions)), tokenizer, None
    # the trained weights in fp32 (the master copy; bf16 computes under autocast or FSDP's policy)
    model, tokenizer = lm.load(cfg.start, "start model", options, dtype=torch.float32)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora_targets) if cfg.lora_targets else None,
                task_type="CAUSAL_LM",
            ),
        )
    frozen = None
    if cfg.task == "dpo" and reference:
        # the frozen reference only runs forward: held in bf16 where GPUs compute in bf16
        bf16_gpu = torch.cuda.is_available() and precision.resolve(cfg.precision, "cuda") == "bf16"
        dtype = torch.bfloat16 if bf16_gpu else torch.float32
        frozen, _ = lm.load(cfg.start, "start model", options, dtype=dtype)
        frozen.eval().requires_grad_(False)
    return model, tokenizer, frozen


# ---------------------------------------------------------------------------------------------
# The loop


def fit(
    cfg: TrainConfig,
    model: nn.Module,
    tokenizer: Any,
    reference: nn.Module | None,
    rows: list[dict[str, Any]],
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    wrap=lambda m: m,
    checkpoints: Checkpoints | None = None,
    resume: Path | None = None,
    on_checkpoint=lambda save, metrics: None,
    on_step=lambda step, total, **numbers: None,
) -> dict[str, Any]:
    """Train `model` in place on this worker's share of `rows`; {"metrics": the last checkpoint's}.

    `wrap` makes the module the steps run (DDP or FSDP; FSDP replaces the parameters, so the optimizer is built
    after it). `resume` is a checkpoint directory to continue from; `on_checkpoint(save, metrics)` every
    `cfg.checkpoint_every` steps and at the end, with `save(dir)` writing this rank's files of the state
    (`Checkpoints.save`); `on_step` (progress) after every step."""
    device = device or torch.device("cpu")
    checkpoints = checkpoints or Checkpoints(sharded=False, rank=rank)
    torch.manual_seed(cfg.seed)
    if not rows:
        raise ValueError("no training examples")
    per_worker = max(1, cfg.train.batch_size // world)
    steps_per_epoch = max(1, math.ceil(len(rows) / (per_worker * world)))
    total = cfg.train.max_steps or max(1, round(cfg.train.epochs * steps_per_epoch))
    if cfg.gradient_checkpointing:
        sharded.enable_checkpointing(model)
    trained = wrap(model)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=0.0)
    warmup = max(1, total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.05, (total - s) / max(1, total - warmup)))
    )
    every = max(cfg.checkpoint_every, total // 25)  # a retry loses at most 4% of a long run; saving stays cheap
    step = 0
    if resume is not None:
        step = checkpoints.load(resume, model, optimizer, scheduler)
        if rank == 0:
            print(f"[{cfg.task}] resuming from checkpoint at step {step} ({cfg.strategy}, {world} workers)", flush=True)
    if reference is not None:
        reference.to(device)
    arithmetic = precision.resolve(cfg.precision, device.type)
    autocast = precision.autocast(arithmetic, device.type)
    dims = {d: i for i, d in enumerate(cfg.dimensions)}

    def to(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batch.items()}

    recent: list[float] = []
    t0, n0 = time.monotonic(), step
    metrics: dict[str, Any] = {}
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        trained.train()
        for b in range(offset, steps_per_epoch):
            lo = b * per_worker * world + rank * per_worker
            batch = [rows[int(i)] for i in order[torch.arange(lo, lo + per_worker) % len(order)]]
            with autocast:
                if cfg.task == "lm":
                    loss = lm_step(
                        trained,
                        to(
                            encode(
                                tokenizer,
                                [r.get("prompt", "") for r in batch],
                                [r.get("response") or r["text"] for r in batch],
                                cfg.max_length,
                            )
                        ),
                    )
                else:
                    prompts = [r["prompt"] for r in batch]
                    chosen = to(encode(tokenizer, prompts, [r["chosen"] for r in batch], cfg.max_length))
                    rejected = to(encode(tokenizer, prompts, [r["rejected"] for r in batch], cfg.max_length))
                    if cfg.task == "reward":
                        idx = torch.tensor([dims[r["dimension"]] for r in batch], device=device)
                        loss = reward_step(trained, chosen, rejected, idx)
                    else:
                        loss = dpo_step(trained, reference, chosen, rejected, cfg.beta, cfg.nll_weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            recent = [*recent, float(loss.detach())][-20:]
            on_step(step, total, loss=sum(recent) / len(recent))
            done = step >= total
            if step % every == 0 or done:
                metrics = {
                    "step": step,
                    "total_steps": total,
                    "loss": sum(recent) / len(recent),
                    "seconds_per_step": (time.monotonic() - t0) / max(1, step - n0),
                    "samples_per_second": (step - n0) * per_worker * world / max(1e-9, time.monotonic() - t0),
                    "torch_threads": torch.get_num_threads(),  # what the worker computed with (Ray sets it from its CPUs)
                    "strategy": cfg.strategy,
                    "precision": arithmetic,
                    "workers": world,
                    "resumed_at_step": n0,  # 0: a fresh start
                }
                at = step

                def save(d: Path, at: int = at) -> bool:
                    return checkpoints.save(d, model, optimizer, scheduler, at)

                on_checkpoint(save, metrics)
            if done:
                break
    return {"metrics": metrics}


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def prepare(cfg: TrainConfig, model: nn.Module, reference: nn.Module | None, device: torch.device, world: int):
    """(wrap, reference) for this worker: DDP through Ray Train, or FSDP2 with the DPO reference sharded too."""
    if cfg.strategy == "fsdp":
        bf16 = precision.resolve(cfg.precision, device.type) == "bf16"
        if reference is not None:
            sharded.shard(reference, device, world, bf16)
        return (lambda m: sharded.shard(m, device, world, bf16)), reference
    import ray.train.torch

    # the gradients are views into DDP's all-reduce buckets: one copy of them, not two
    return (
        lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"gradient_as_bucket_view": True})
    ), reference


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build the task's model, resume from the latest checkpoint, train, checkpoint."""
    import ray.train
    import ray.train.torch

    from kubedistill.stages.data import read_dataset

    cfg: TrainConfig = config["train"]
    options = cfg.s3
    rows = read_dataset(Storage(cfg.examples_uri, options))
    ctx = ray.train.get_context()
    rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    model, tokenizer, reference = build(cfg, options)
    # the memory a worker reports is its training's: what it holds now (Python, torch, the modeling code it just
    # imported, the rows) is not, except the models' own tensors
    baseline = raytrain.rss()[0] - sum(tensor_bytes(m) for m in (model, reference) if m is not None)
    wrap, reference = prepare(cfg, model, reference, device, world)
    checkpoints = Checkpoints(sharded=cfg.strategy == "fsdp", rank=rank)

    def report(save: Any, metrics: dict[str, Any]) -> None:
        line = (
            f"[{cfg.task}] step {metrics['step']}/{metrics['total_steps']} loss {metrics['loss']:.4f} "
            f"{metrics['seconds_per_step']:.2f}s/step ({cfg.strategy})"
        )
        used = {"peak_rss_bytes": raytrain.rss()[1] - baseline}
        if device.type == "cuda":
            used["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        raytrain.report({**metrics, **raytrain.max_over_workers(used)}, save, line)

    on_step = raytrain.steps(config)
    with raytrain.latest_checkpoint() as resume:
        fit(
            cfg,
            model,
            tokenizer,
            reference,
            rows,
            rank=rank,
            world=world,
            device=device,
            wrap=wrap,
            checkpoints=checkpoints,
            resume=resume,
            on_checkpoint=report,
            on_step=on_step,
        )
    on_step.close()


def run(ctx: StageContext, cfg: TrainConfig, resources: Resources, name: str) -> tuple[Any, dict[str, Any]]:
    """Run `fit` as a TorchTrainer; (its last checkpoint, last metrics). Re-running with the same `name` resumes.

    The checkpoint (a `ray.train.Checkpoint` holding `state.pt`) is read where the model is needed
    next, on a worker: the driver never loads the weights."""
    max_failures = ctx.spec.teacher.max_failures
    result = raytrain.fit(
        train_loop_per_worker,
        {"train": cfg},
        resources,
        ctx.out,
        f"{name}-{ctx.config_hash}",
        max_failures,
        Target.of(ctx.storage, ctx.name),
    )
    return result.checkpoint, raytrain.scalar_metrics(result)
