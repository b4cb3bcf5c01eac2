"""The student: a small encoder + classifier trained with CRSD (or the `ce` / `kd` baselines).

Read top to bottom: the inputs the student sees, the model, one training step per objective, the
Ray Train loop (DDP workers, checkpoints, resume, early stopping), export and loading of the serving
artifact, and the `student-crsd` stage. Losses live in `kubedistill.ml.losses`.

At inference only the standard input (query, service) exists: the exported model never needs
reasoning text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kubedistill.core.progress import Target
from kubedistill.core.spec import StudentSpec
from kubedistill.core.stage import StageContext
from kubedistill.core.storage import S3Options, Storage, is_s3
from kubedistill.ml import calibration, losses, precision, raytrain
from kubedistill.ml.metrics import classification_metrics
from kubedistill.ml.models import resolve
from kubedistill.stages.data import (
    pair_id,
    read_dataset,
    read_sft,
    row_sources,
    service_text,
    training_rows,
    validation_split,
    write_rows,
)

ARTIFACT_VERSION = 1
POOLING = ("mean", "cls")  # how the encoder's last hidden states become one vector


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class StudentConfig:
    """One student training run: the spec's `student` section and the run's labels, as validated.

    The Ray Train loop receives this object itself (pickled), not a re-keyed copy of it."""

    student: StudentSpec
    labels: list[str]

    def with_objective(self, objective: str) -> StudentConfig:
        """The same run with another objective (`compareObjectives`: same rows, seed and budget)."""
        return replace(self, student=self.student.model_copy(update={"objective": objective}))


def check_rows(rows: list[dict[str, Any]], cfg: StudentConfig, what: str) -> None:
    """Refuse data the objective cannot train on, naming what is missing."""
    if not rows:
        raise ValueError(f"{what}: the training set is empty")
    unknown = sorted({str(r.get("label")) for r in rows} - set(cfg.labels))
    if unknown:
        raise ValueError(f"{what}: label(s) {unknown} are not in spec.labels {cfg.labels}")
    if cfg.student.objective == "crsd":
        missing = sum(1 for r in rows if not (r.get("reasoning") or "").strip())
        if missing:
            raise ValueError(
                f"{what}: {missing} of {len(rows)} row(s) have no 'reasoning'; objective crsd needs a reasoning chain "
                "per pair: train on labels alone (spec.student.objective: ce), have a teacher annotate the log "
                "(spec.annotation.mode: label), or have it explain your labels (spec.annotation.mode: rationalize)"
            )
    if cfg.student.objective == "kd":
        bad = sum(
            1
            for r in rows
            if not isinstance(r.get("label_probs"), (list, tuple)) or len(r["label_probs"]) != len(cfg.labels)
        )
        if bad:
            raise ValueError(
                f"{what}: {bad} row(s) lack 'label_probs' (the teacher's distribution over {len(cfg.labels)} labels); "
                "objective kd needs it: use annotations that provide it, or objective ce/crsd"
            )


def drop_unexplained(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(the rows with a reasoning chain, how many had none): for crsd, when the run's labels were rationalized
    and the model explained only those it agreed with (Distilling Step-by-Step trains on explained rows)."""
    kept = [r for r in rows if (r.get("reasoning") or "").strip()]
    return kept, len(rows) - len(kept)


def _cap(tokenizer: Any, text: str, n: int) -> str:
    return tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)[: max(0, n)])


def fit_services(tokenizer: Any, queries: list[str], texts: list[str], max_length: int) -> list[str]:
    """Service texts cut to what fits beside each query in `max_length` tokens."""
    return [
        _cap(tokenizer, t, max_length - len(tokenizer.tokenize(q)) - 3) for q, t in zip(queries, texts, strict=True)
    ]


def _services(tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> list[str]:
    return fit_services(tokenizer, [r["query"] for r in rows], [service_text(r) for r in rows], max_length)


def encode_standard(tokenizer: Any, queries: list[str], services: list[str], max_length: int) -> Any:
    """[CLS] query [SEP] service [SEP], cut longest-first to `max_length` tokens: the only input the student sees at
    inference, and the tokenizer's own pair encoding, so `tokenizers`, `transformers` and every export produce it
    alike (kubedistill.ml.export)."""
    return tokenizer(
        queries, services, truncation="longest_first", max_length=max_length, padding=True, return_tensors="pt"
    )


class Encoded:
    """Tokenized standard (and, for CRSD, reasoning-augmented) inputs for a list of rows.

    Standard: [CLS] query [SEP] service [SEP], cut longest-first to `max_length` tokens (`encode_standard`).
    Reasoning view: the query and the service text cut to what fits beside it, then [SEP] and the reasoning
    chain capped at `max_reasoning_tokens`, so the reasoning is never the part truncated away.
    """

    def __init__(self, tokenizer: Any, rows: list[dict[str, Any]], cfg: StudentConfig, with_reasoning: bool):
        queries = [r["query"] for r in rows]
        self.standard = encode_standard(tokenizer, queries, [service_text(r) for r in rows], cfg.student.max_length)
        self.reasoning = None
        if with_reasoning:
            services = _services(tokenizer, rows, cfg.student.max_length)
            second = [
                f"{s} {tokenizer.sep_token} {_cap(tokenizer, r.get('reasoning') or '', cfg.student.max_reasoning_tokens)}"
                for s, r in zip(services, rows, strict=True)
            ]
            self.reasoning = tokenizer(
                queries,
                second,
                truncation="longest_first",
                max_length=cfg.student.max_length + cfg.student.max_reasoning_tokens + 1,
                padding=True,
                return_tensors="pt",
            )
        self.labels = torch.tensor([cfg.labels.index(r["label"]) for r in rows]) if "label" in rows[0] else None
        train = cfg.student.train
        weights = (
            calibration.class_weights(
                train.class_weights, cfg.labels, [r["label"] for r in rows], train.custom_class_weights
            )
            if self.labels is not None
            else None
        )
        #: per-label loss weights (spec.student.train.classWeights), None for plain losses
        self.class_weight = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        self.soft = (
            torch.tensor([r["label_probs"] for r in rows], dtype=torch.float32)
            if cfg.student.objective == "kd" and "label_probs" in rows[0]
            else None
        )


# ---------------------------------------------------------------------------------------------
# The model


class RelevanceStudent(nn.Module):
    """Encoder -> pooled vector ([CLS], or the mean over real tokens) -> dropout -> linear classifier
    over the relevance labels.

    `forward(standard, reasoning=None)` runs both views in one call, so DDP sees one forward per
    backward even though CRSD encodes each pair twice.
    """

    def __init__(self, encoder: nn.Module, n_labels: int, dropout: float = 0.1, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"spec.student.pooling: {pooling!r}; expected one of {POOLING}")
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # pooling reads the last hidden state; an unused pooler breaks DDP
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, n_labels)

    def pool(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pool(batch)
        return h, self.classifier(self.dropout(h))

    def forward(
        self,
        standard: dict[str, torch.Tensor],
        reasoning: dict[str, torch.Tensor] | None = None,
        reasoning_grad: bool = True,
    ) -> Any:
        h, logits_s = self.encode(standard)
        if reasoning is None:
            return h, logits_s, None, None
        if reasoning_grad:
            r, logits_t = self.encode(reasoning)
        else:  # the reasoning view as a frozen-encoder teacher: forward only; its CE trains the head
            with torch.no_grad():
                r = self.pool(reasoning)
            logits_t = self.classifier(self.dropout(r))
        return h, logits_s, r, logits_t


def encoder_layers(config: Any, layers: int | None, base_model: str) -> int | None:
    """How many of the base encoder's layers the student keeps (`spec.student.layers`): None for all of them."""
    total = getattr(config, "num_hidden_layers", None)
    if layers is None or layers == total:
        return None
    if not isinstance(total, int):
        raise ValueError(
            f"spec.student.layers: {base_model!r} ({type(config).__name__}) does not say how many layers it has "
            "(no num_hidden_layers in its config); leave layers unset"
        )
    if layers > total:
        raise ValueError(f"spec.student.layers: {layers}, but {base_model!r} has {total} layers; expected 1 to {total}")
    return layers


@contextlib.contextmanager
def _quiet_unused_weights() -> Iterator[None]:
    """Silence transformers' "some weights were not used" while loading a shallower encoder (unused on purpose)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _cannot_load(cfg: StudentConfig, e: Exception) -> ValueError:
    return ValueError(f"spec.student.baseModel: cannot load {cfg.student.base_model!r}: {e}")


def base_encoder(cfg: StudentConfig, options: S3Options | None = None) -> tuple[str, Any, int | None]:
    """The base encoder's loadable path, its config and the layers the student keeps (None: all); raises
    naming the spec field when the model cannot be loaded or `layers` does not fit it."""
    from transformers import AutoConfig

    path = resolve(cfg.student.base_model, "spec.student.baseModel", options)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _cannot_load(cfg, e) from e
    return path, config, encoder_layers(config, cfg.student.layers, cfg.student.base_model)


def build_model(cfg: StudentConfig, options: S3Options | None = None) -> tuple[RelevanceStudent, Any]:
    from transformers import AutoModel, AutoTokenizer

    path, config, keep = base_encoder(cfg, options)
    if keep is not None:  # the first `keep` layers with their pretrained weights; the exported config says `keep`
        config.num_hidden_layers = keep
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with _quiet_unused_weights() if keep is not None else contextlib.nullcontext():
            encoder = AutoModel.from_pretrained(path, config=config)
    except (OSError, ValueError) as e:
        raise _cannot_load(cfg, e) from e
    torch.manual_seed(cfg.student.seed)  # the head's initial weights follow from the seed, in every process
    return RelevanceStudent(encoder, len(cfg.labels), pooling=cfg.student.pooling), tokenizer


def _slice(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `idx` of a padded batch, trimmed to their longest real sequence."""
    out = {k: v[idx] for k, v in batch.items()}
    width = int(out["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width] for k, v in out.items()}


def forward(model: nn.Module, arithmetic: str, *views: dict[str, torch.Tensor] | None, **kw: Any) -> Any:
    """The student's forward pass on the model's device, its products in `arithmetic` (bf16 | fp32,
    kubedistill.ml.precision), its outputs in fp32: the losses are always computed in fp32."""
    device = next(model.parameters()).device
    moved = [None if v is None else {k: t.to(device) for k, t in v.items()} for v in views]
    with precision.autocast(arithmetic, device.type):
        out = model(*moved, **kw)
    return tuple(None if t is None else t.float() for t in out)


def loss_terms(
    model: nn.Module, enc: Encoded, idx: torch.Tensor, cfg: StudentConfig, arithmetic: str = "fp32"
) -> dict[str, torch.Tensor]:
    """One step's loss (and its terms) for the configured objective; the forward pass in `arithmetic`."""
    assert enc.labels is not None
    device = next(model.parameters()).device
    y, w = enc.labels[idx].to(device), None if enc.class_weight is None else enc.class_weight.to(device)
    if cfg.student.objective == "crsd":
        assert enc.reasoning is not None
        h, logits_s, r, logits_t = forward(
            model,
            arithmetic,
            _slice(enc.standard, idx),
            _slice(enc.reasoning, idx),
            reasoning_grad=cfg.student.crsd.teacher_grad,
        )
        return losses.crsd_loss(
            logits_s,
            logits_t,
            h,
            r,
            y,
            cfg.student.crsd.align_weight,
            cfg.student.crsd.contrast_weight,
            cfg.student.crsd.temperature,
            cfg.student.crsd.stop_gradient,
            w,
        )
    _, logits_s, _, _ = forward(model, arithmetic, _slice(enc.standard, idx))
    terms = {"sce": losses.ce_loss(logits_s, y, w)}
    if cfg.student.objective == "kd":
        assert enc.soft is not None
        terms["kd"] = losses.kd_loss(logits_s, enc.soft[idx].to(device), cfg.student.kd_temperature, y, w)
        terms["loss"] = 0.5 * terms["sce"] + 0.5 * terms["kd"]
    else:
        terms["loss"] = terms["sce"]
    return terms


@torch.no_grad()
def predict_proba(
    model: RelevanceStudent,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    max_length: int,
    batch_size: int = 64,
    temperature: float = 1.0,
) -> np.ndarray:
    """Class probabilities from the standard input only (what serving sees)."""
    return predict_texts(
        model,
        tokenizer,
        [r["query"] for r in rows],
        [service_text(r) for r in rows],
        max_length,
        batch_size,
        temperature,
    )


@torch.inference_mode()
def predict_texts(
    model: RelevanceStudent,
    tokenizer: Any,
    queries: list[str],
    services: list[str],
    max_length: int,
    batch_size: int = 64,
    temperature: float = 1.0,
) -> np.ndarray:
    """Class probabilities softmax(logits / temperature) of (query, service text) pairs from the standard
    input: what serving calls (with the exported model's fitted temperature)."""
    model.eval()
    out = []
    for i in range(0, len(queries), batch_size):
        q = queries[i : i + batch_size]
        batch = encode_standard(tokenizer, q, services[i : i + batch_size], max_length)
        batch = {k: v.to(model.classifier.weight.device) for k, v in batch.items()}
        _, logits, _, _ = model(batch)
        out.append(torch.softmax(logits.float() / temperature, dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.classifier.out_features))


# ---------------------------------------------------------------------------------------------
# Training loop: plain PyTorch, run by every Ray Train worker (and directly by the benchmarks)


@dataclass
class Round:
    """What `fit` reports after each evaluation round; `checkpoint()` is the resumable state."""

    metrics: dict[str, Any]
    checkpoint: Callable[[], dict[str, Any]]


def epoch_order(enc: Encoded, cfg: StudentConfig, epoch: int) -> torch.Tensor:
    """The row order of one epoch, a function of (seed, epoch) alone, so a resumed run draws the same
    batches. shuffle: a permutation. balanced: as many draws with replacement, each row with probability
    1 / (grades present x its grade's count), so every grade comes up equally often."""
    g = torch.Generator().manual_seed(cfg.student.seed * 1000 + epoch)
    assert enc.labels is not None
    n = len(enc.labels)
    if cfg.student.train.sampling == "shuffle":
        return torch.randperm(n, generator=g)
    counts = torch.bincount(enc.labels, minlength=len(cfg.labels)).float()
    p = 1.0 / counts[enc.labels]
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g)


def fit(
    cfg: StudentConfig,
    model: RelevanceStudent,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    val_rows: list[dict[str, Any]],
    *,
    rank: int = 0,
    world: int = 1,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    resume: dict[str, Any] | None = None,
    on_round: Callable[[Round], None] = lambda r: None,
    on_step: Callable[..., None] = lambda step, total, **numbers: None,
) -> dict[str, Any]:
    """Train `model` on this worker's share of `train_rows`; evaluate on `val_rows` once per epoch; `on_step`
    (progress) after every step.

    Early stopping after `cfg.student.patience` rounds without a better validation macro-F1. Returns the
    final state (including `best_state`, the weights of the best round). `resume` is a state that
    `Round.checkpoint()` returned earlier: training continues from its step, mid-epoch included.
    """
    torch.manual_seed(cfg.student.seed)
    enc = Encoded(tokenizer, train_rows, cfg, with_reasoning=cfg.student.objective == "crsd")
    per_worker = max(2, cfg.student.train.batch_size // world)
    steps_per_epoch = max(1, math.ceil(len(train_rows) / (per_worker * world)))
    total_steps = cfg.student.train.max_steps or max(1, round(cfg.student.train.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.student.train.learning_rate, weight_decay=0.01)
    warmup = max(1, total_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )
    st: dict[str, Any] = {"step": 0, "best_f1": -1.0, "best_step": 0, "bad_rounds": 0, "best_state": None}
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        st = {k: resume[k] for k in st}
        torch.set_rng_state(resume["rng"])  # the same dropout masks as an uninterrupted run
    trained = wrap(model)
    arithmetic = precision.resolve(cfg.student.resources.precision, next(model.parameters()).device.type)

    def checkpoint() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            **st,
        }

    stopped, metrics = False, dict[str, Any]()
    while st["step"] < total_steps and not stopped:
        epoch, offset = divmod(st["step"], steps_per_epoch)
        order = epoch_order(enc, cfg, epoch)
        trained.train()
        t0, sums, n = time.monotonic(), dict[str, float](), 0
        for b in range(offset, steps_per_epoch):
            lo = b * per_worker * world + rank * per_worker
            idx = order[torch.arange(lo, lo + per_worker) % len(order)]  # the last batch wraps around
            terms = loss_terms(trained, enc, idx, cfg, arithmetic)
            optimizer.zero_grad()
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            st["step"] += 1
            n += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            on_step(st["step"], total_steps, loss=sums["loss"] / n)
            if st["step"] >= total_steps:
                break
        elapsed = time.monotonic() - t0
        val = classification_metrics(
            [r["label"] for r in val_rows],
            predict_proba(model, tokenizer, val_rows, cfg.student.max_length),
            cfg.labels,
        )
        if val["macro_f1"] > st["best_f1"]:
            st.update(
                best_f1=val["macro_f1"],
                best_step=st["step"],
                bad_rounds=0,
                best_state={k: v.detach().clone() for k, v in model.state_dict().items()},
            )
        else:
            st["bad_rounds"] += 1
        stopped = st["bad_rounds"] >= cfg.student.patience
        metrics = {
            "step": st["step"],
            "total_steps": total_steps,
            "epoch": round(st["step"] / steps_per_epoch, 3),
            "val_macro_f1": val["macro_f1"],
            "val_accuracy": val["accuracy"],
            "val_auc": val["auc_ovr"],
            "best_val_macro_f1": st["best_f1"],
            "best_step": st["best_step"],
            "seconds_per_step": elapsed / max(1, n),
            "precision": arithmetic,
            "stopped_early": stopped,
            **{f"train_{k}": v / max(1, n) for k, v in sums.items()},
        }
        on_round(Round(metrics, checkpoint))
    return {**checkpoint(), "metrics": metrics}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: DDP-wrapped `fit`, a checkpoint per round, resume from the latest."""
    import ray.train
    import ray.train.torch

    cfg: StudentConfig = config["student"]
    options = S3Options(**config["s3"])
    splits = Storage(config["splits_uri"], options)
    train_rows, val_rows = read_dataset(splits.child("train")), read_dataset(splits.child("val"))
    ctx = ray.train.get_context()
    model, tokenizer = build_model(cfg, options)
    resume = raytrain.resume_state("student-crsd")

    def report(r: Round) -> None:
        m = r.metrics
        line = (
            f"[student-crsd] step {m['step']}/{m['total_steps']} val macro-F1 {m['val_macro_f1']:.4f} "
            f"(best {m['best_val_macro_f1']:.4f} @ {m['best_step']}) loss {m['train_loss']:.4f} "
            f"{m['seconds_per_step']:.2f}s/step" + (" - early stop" if m["stopped_early"] else "")
        )
        raytrain.report(m, raytrain.state_file(r.checkpoint), line)

    on_step = raytrain.steps(config, label=f"{cfg.student.objective} student")
    fit(
        cfg,
        model,
        tokenizer,
        train_rows,
        val_rows,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        wrap=ray.train.torch.prepare_model,
        resume=resume,
        on_round=report,
        on_step=on_step,
    )
    on_step.close()


# ---------------------------------------------------------------------------------------------
# Calibration: fitted on the validation split, after training, stored with the model


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """sha256 of the rows' sorted pair ids: which pairs a fit saw, recorded beside what it fitted."""
    ids = sorted(str(r.get("pair_id") or pair_id(r["query"], str(r.get("service_id", "")))) for r in rows)
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def calibrate(
    cfg: StudentConfig, model: RelevanceStudent, tokenizer: Any, val_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The temperature and decision offsets of `spec.student.calibration`, fitted on the validation split
    (held-out queries of the training rows or of the SFT set, `validateOn`; never eval data), with what they did
    there: top-label ECE and macro-F1 before and after, and the digest of the pairs they were fitted on."""
    val_proba = predict_proba(model, tokenizer, val_rows, cfg.student.max_length)
    val_labels = [r["label"] for r in val_rows]
    y = np.array([cfg.labels.index(lab) for lab in val_labels])
    spec = cfg.student.calibration
    temperature = calibration.fit_temperature(val_proba, y) if spec.temperature else 1.0
    proba = calibration.apply_temperature(val_proba, temperature)
    offsets = calibration.fit_offsets(proba, y) if spec.offsets else np.zeros(len(cfg.labels))
    return {
        "fittedOn": "validation",
        "rows": len(y),
        "pairsDigest": rows_digest(val_rows),
        "temperature": round(temperature, 6),
        "offsets": {lab: float(b) for lab, b in zip(cfg.labels, offsets, strict=True)},
        "valEceBefore": round(calibration.expected_calibration_error(val_proba, y), 6),
        "valEceAfter": round(calibration.expected_calibration_error(proba, y), 6),
        "valMacroF1Argmax": round(classification_metrics(val_labels, val_proba, cfg.labels)["macro_f1"], 6),
        "valMacroF1": round(classification_metrics(val_labels, proba, cfg.labels, offsets.tolist())["macro_f1"], 6),
    }


# ---------------------------------------------------------------------------------------------
# The serving artifact


def export(model: RelevanceStudent, tokenizer: Any, cfg: StudentConfig, out: Storage, extra: dict[str, Any]) -> str:
    """Write encoder + tokenizer + head + student.json under `out` (the meta file last)."""
    from safetensors.torch import save as st_save

    with tempfile.TemporaryDirectory() as d:
        model.encoder.save_pretrained(d)
        tokenizer.save_pretrained(d)
        for f in sorted(Path(d).iterdir()):
            out.write_bytes(f"encoder/{f.name}", f.read_bytes())
    head = {k: v.contiguous() for k, v in model.classifier.state_dict().items()}
    out.write_bytes("head.safetensors", st_save(head))
    meta = {
        "artifactVersion": ARTIFACT_VERSION,
        "labels": cfg.labels,
        "maxLength": cfg.student.max_length,
        "pooling": cfg.student.pooling,
        "objective": cfg.student.objective,
        "baseModel": cfg.student.base_model,
        **extra,
    }
    out.write_json("student.json", meta)
    return out.uri()


def export_formats(
    model: RelevanceStudent,
    tokenizer: Any,
    cfg: StudentConfig,
    out: Storage,
    temperature: float,
    offsets: list[float] | None,
    check_rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """Write the ONNX (fp32, int8) and, where the student has one, the Hugging Face sequence-classification form
    under `out` (`onnx/`, `hf/`); return what student.json records of them: files, and each one's largest
    probability difference to this model on `check_rows` (real pairs: the validation split). An fp32 form
    further than `export.FP32_TOLERANCE` from the model is recorded as failed, and never served; a form that
    cannot be exported (an encoder the exporter cannot trace) is recorded with its error, and the trained
    model is kept: it serves with torch."""
    from kubedistill.ml import export as ex

    check = check_rows[:256]
    queries, services = [r["query"] for r in check], [service_text(r) for r in check]
    reference = predict_texts(model, tokenizer, queries, services, cfg.student.max_length, temperature=temperature)
    head = ex.Head(cfg.labels, cfg.student.max_length, temperature, offsets)
    record: dict[str, Any] = {"checkedOn": {"rows": len(check), "pairsDigest": rows_digest(check)}}
    with tempfile.TemporaryDirectory() as d:
        try:
            onnx = ex.export_onnx(model, tokenizer, head, Path(d) / "onnx")
            for runtime in ("onnx", "onnx-int8"):
                got = ex.OnnxScorer(Path(d) / "onnx", runtime).predict_texts(queries, services)
                diff = ex.max_abs_diff(got, reference)
                record[runtime] = {"path": f"onnx/{ex.ONNX_FILES[runtime]}", "maxAbsDiff": diff}
                if runtime == "onnx":
                    record[runtime]["passed"] = bool(check) and diff <= ex.FP32_TOLERANCE
            record["onnx"].update(onnx)
        except Exception as e:  # noqa: BLE001 - recorded; the native model is what the stage trained
            shutil.rmtree(Path(d) / "onnx", ignore_errors=True)
            record["onnx"] = record["onnx-int8"] = {"error": f"{type(e).__name__}: {e}"[:2000], "passed": False}
        reason = ex.hf_unsupported(model)
        if reason is None:
            try:
                hf = ex.export_hf(model, tokenizer, head, Path(d) / "hf")
                got = hf_probabilities(Path(d) / "hf", queries, services)
                diff = ex.max_abs_diff(got, reference)
                passed = bool(check) and diff <= ex.FP32_TOLERANCE
                record["hf"] = {"path": "hf", "maxAbsDiff": diff, "passed": passed, **hf}
            except Exception as e:  # noqa: BLE001 - as above
                shutil.rmtree(Path(d) / "hf", ignore_errors=True)
                record["hf"] = {"error": f"{type(e).__name__}: {e}"[:2000], "passed": False}
        else:
            record["hf"] = {"skipped": reason}
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                out.write_bytes(str(f.relative_to(d)), f.read_bytes())
    return record


@torch.inference_mode()
def hf_probabilities(path: Path, queries: list[str], services: list[str]) -> np.ndarray:
    """softmax of a sequence-classification directory's logits, loaded by `transformers` as any such model is."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if not queries:
        return np.zeros((0, hf.config.num_labels))
    batch = tok(queries, services, truncation=True, padding=True, return_tensors="pt")
    return torch.softmax(hf(**batch).logits, dim=-1).numpy()


def decision_offsets(meta: dict[str, Any]) -> list[float] | None:
    """An exported student's decision offsets per label, in `labels` order, or None (plain argmax)."""
    fitted = meta.get("calibration", {}).get("offsets")
    return [float(fitted.get(lab, 0.0)) for lab in meta["labels"]] if fitted else None


@dataclass
class LoadedStudent:
    model: RelevanceStudent
    tokenizer: Any
    meta: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]

    @property
    def temperature(self) -> float:
        """The fitted softmax temperature (1 for a model exported without calibration)."""
        return float(self.meta.get("calibration", {}).get("temperature", 1.0))

    @property
    def offsets(self) -> list[float] | None:
        return decision_offsets(self.meta)

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """The predicted label indices: argmax(log p + offsets), what /score's `label` and evaluate use."""
        return calibration.decide(proba, self.offsets)

    @property
    def version(self) -> str:
        """What served responses call this model: `<objective>-<artifact version>` (of an artifact from before
        versions, its config hash; the digest of student.json if it has neither)."""
        return self.meta["version"]

    def predict_proba(self, rows: list[dict[str, Any]], batch_size: int = 64, calibrated: bool = True) -> np.ndarray:
        """Class probabilities, with the fitted temperature unless `calibrated` is False."""
        t = self.temperature if calibrated else 1.0
        return predict_proba(self.model, self.tokenizer, rows, self.meta["maxLength"], batch_size, t)

    def predict_texts(self, queries: list[str], services: list[str], batch_size: int = 64) -> np.ndarray:
        return predict_texts(
            self.model, self.tokenizer, queries, services, self.meta["maxLength"], batch_size, self.temperature
        )


def load_student(uri: str, options: S3Options | None = None) -> LoadedStudent:
    """Load an exported student (the native artifact, on PyTorch) from a local directory or an s3:// prefix."""
    from safetensors.torch import load as st_load
    from transformers import AutoModel, AutoTokenizer

    meta = read_meta(uri, options)
    st = Storage(uri, options)
    local = resolve(st.uri("encoder"), f"{uri}/encoder", options)  # a local dir, or the s3:// prefix cached
    encoder = AutoModel.from_pretrained(local)
    model = RelevanceStudent(encoder, len(meta["labels"]), pooling=meta.get("pooling", "cls"))
    model.classifier.load_state_dict(st_load(st.read_bytes("head.safetensors")))
    model.eval()
    return LoadedStudent(model, AutoTokenizer.from_pretrained(local), meta)


@dataclass
class OnnxStudent:
    """An exported student on ONNX Runtime (`runtime` onnx or onnx-int8): what serving and evaluate call on a
    LoadedStudent (`labels`, `offsets`, `version`, `predict_texts`), from the `onnx/` export alone."""

    scorer: Any  # kubedistill.ml.export.OnnxScorer
    meta: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]

    @property
    def offsets(self) -> list[float] | None:
        return decision_offsets(self.meta)

    @property
    def version(self) -> str:
        return self.meta["version"]

    def predict_texts(self, queries: list[str], services: list[str], batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities: the graph applies the fitted temperature itself."""
        return self.scorer.predict_texts(queries, services, batch_size)


def read_meta(uri: str, options: S3Options | None = None) -> dict[str, Any]:
    """student.json of an exported student, with `version` set to what served responses call it."""
    st = Storage(uri, options)
    try:
        raw = st.read_bytes("student.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no student.json here; is this a student-crsd model artifact?") from None
    meta = json.loads(raw)
    tag = meta.get("version") or meta.get("configHash") or hashlib.sha256(raw).hexdigest()
    meta["version"] = f"{meta.get('objective', 'student')}-{tag[:12]}"
    if meta.get("artifactVersion") != ARTIFACT_VERSION:
        raise ValueError(
            f"{uri}: artifact version {meta.get('artifactVersion')} is not supported (want {ARTIFACT_VERSION})"
        )
    return meta


def load_onnx(uri: str, runtime: str, options: S3Options | None = None, threads: int = 0) -> OnnxStudent:
    """The student's ONNX export (`runtime`: onnx or onnx-int8) on ONNX Runtime; KeyError when it has none."""
    from kubedistill.ml.export import OnnxScorer
    from kubedistill.ml.models import fetch_prefix

    meta = read_meta(uri, options)
    export = (meta.get("exports") or {}).get(runtime)
    if export is None or "error" in export:
        why = export["error"] if export else "exported before ONNX exports?"
        raise KeyError(f"{uri}: the student has no {runtime} export ({why})")
    st = Storage(uri, options)
    local = fetch_prefix(st.uri("onnx"), options) if is_s3(st.uri()) else Path(st.uri("onnx"))
    return OnnxStudent(OnnxScorer(Path(local), runtime, threads), meta)


def load_runtime(uri: str, runtime: str, options: S3Options | None = None, threads: int = 0) -> Any:
    """The student as `runtime` scores it (a LoadedStudent or an OnnxStudent), its version naming the runtime."""
    student = load_student(uri, options) if runtime == "torch" else load_onnx(uri, runtime, options, threads)
    student.meta["version"] = f"{student.meta['version']}+{runtime}"
    return student


# ---------------------------------------------------------------------------------------------
# The stage


def run_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = StudentConfig(ctx.spec.student, ctx.spec.labels)
    rows, source = training_rows(ctx)
    others = [cfg.with_objective(o) for o in cfg.student.compare_objectives]
    dropped = 0
    if "rationalize" in ctx.inputs and any(c.student.objective == "crsd" for c in [cfg, *others]):
        rows, dropped = drop_unexplained(rows)  # every objective trains on the same rows
        if dropped:
            ctx.log(
                f"{dropped} labeled pair(s) the model did not explain (it disagreed) left out: crsd needs reasoning"
            )
    for c in [cfg, *others]:
        check_rows(rows, c, source)
    base_encoder(cfg, ctx.storage.options)  # fail before starting workers
    train_rows, val_rows = validation_split(rows, read_sft(ctx), cfg.student)
    validated_on = validation_source(cfg.student.validate_on, val_rows, len(rows) - len(train_rows))
    ctx.log(
        f"objective {cfg.student.objective}: {len(train_rows)} train pairs from {source}; validation: {validated_on}"
    )
    write_rows(ctx.out, "splits/train/part-00000", train_rows, "jsonl")
    write_rows(ctx.out, "splits/val/part-00000", val_rows, "jsonl")

    configs: dict[str, StudentConfig] = {c.student.objective: c for c in [cfg, *others]}
    trained: dict[str, Any] = {}  # objective -> its Ray Train result, in spec order (resumable under its own name)
    for objective, c in configs.items():
        if c is not cfg:
            ctx.log(f"comparison objective {objective}: training on the same splits")
        trained[objective] = _train(ctx, c, f"train-{ctx.config_hash}" + ("" if c is cfg else f"-{objective}"))
    validation = {o: float(raytrain.scalar_metrics(r)["best_val_macro_f1"]) for o, r in trained.items()}
    chosen = select_student(cfg.student.select, cfg.student.objective, validation)
    if len(trained) > 1:
        ctx.log(
            f"run's student: {chosen} (spec.student.select: {cfg.student.select}; best validation macro-F1 "
            + ", ".join(f"{o} {f:.4f}" for o, f in validation.items())
            + ")"
        )
    metrics, uri = _export_trained(ctx, configs[chosen], trained[chosen], source, ctx.out.child("model"), True)
    metrics.update(
        train_rows=len(train_rows), val_rows=len(val_rows), validated_on=validated_on, rows_from=row_sources(rows)
    )
    if len(trained) > 1:
        metrics["selected"] = {"by": cfg.student.select, "objective": chosen, "best_val_macro_f1": validation}
    if "rationalize" in ctx.inputs:
        metrics.update(
            rows_rationalized=sum(1 for r in rows if r.get("rationalized")), rows_unexplained_left_out=dropped
        )
    outputs = {"model": uri}
    compared = {}
    for objective, result in trained.items():  # same rows, seed and budget; evaluate scores them beside the student
        if objective == chosen:
            continue
        out = ctx.out.child(f"compare/{objective}/model")
        m, outputs[f"model_{objective}"] = _export_trained(ctx, configs[objective], result, source, out)
        compared[objective] = {
            k: m[k]
            for k in ("val_macro_f1", "val_auc", "best_val_macro_f1", "seconds_per_step", "precision", "step")
            if k in m
        }
    if compared:
        metrics["compared"] = compared
    return {"metrics": metrics, "outputs": outputs}


def validation_source(validate_on: str, val_rows: list[dict[str, Any]], left_out: int) -> str:
    """What the validation split is, in words (the manifest's `validated_on`, the log, the report)."""
    queries = len({r["query"] for r in val_rows})
    if validate_on == "trainingRows":
        return f"{len(val_rows)} pairs of {queries} held-out queries of the training rows"
    return f"{len(val_rows)} pairs of {queries} held-out queries of the SFT set (spec.student.validateOn: sftSeed)" + (
        f"; {left_out} training row(s) of those queries left out" if left_out else ""
    )


def select_student(select: str, objective: str, validation: dict[str, float]) -> str:
    """The run's student among the trained objectives (`spec.student.select`): `objective` itself, or the best
    validation macro-F1 (`validation`: objective -> score), a tie going to `objective`, then to spec order."""
    if select == "objective":
        return objective
    if select != "validation":
        raise ValueError(f"spec.student.select: expected objective or validation, got {select!r}")
    return max(validation, key=lambda o: (validation[o], o == objective))


def _train(ctx: StageContext, cfg: StudentConfig, name: str) -> Any:
    """One Ray Train run of `cfg` on the stage's splits (resumable under `name`): its result, whose checkpoint
    holds the best round's weights."""
    loop_config = {
        "student": cfg,
        "splits_uri": ctx.out.uri("splits"),
        "s3": {"endpoint": ctx.storage.options.endpoint, "region": ctx.storage.options.region},
    }
    return raytrain.fit(
        train_loop_per_worker,
        loop_config,
        cfg.student.resources,
        ctx.out,
        name,
        cfg.student.max_failures,
        Target.of(ctx.storage, ctx.name),
    )


def _export_trained(
    ctx: StageContext, cfg: StudentConfig, result: Any, source: str, out: Storage, formats: bool = False
) -> tuple[dict[str, Any], str]:
    """A trained run's best round, calibrated on validation and exported to `out` (with the ONNX and Hugging
    Face forms when `formats`: the student that may be served)."""
    state = raytrain.load_state(result.checkpoint)
    model, tokenizer = build_model(cfg, ctx.storage.options)
    model.load_state_dict(state["best_state"])
    val_rows = read_dataset(ctx.out.child("splits/val"))
    cal = calibrate(cfg, model, tokenizer, val_rows)
    exports = {}
    if formats:
        offsets = [cal["offsets"][lab] for lab in cfg.labels]  # zeros unless spec.student.calibration.offsets
        exports = export_formats(model, tokenizer, cfg, out, cal["temperature"], offsets, val_rows)
        for form in ("onnx", "onnx-int8", "hf"):
            e = exports[form]
            said = (
                e.get("error")
                or e.get("skipped")
                or f"largest probability difference on validation pairs {e['maxAbsDiff']:.1e}"
            )
            ctx.log(f"export {form}: {said}")
    metrics = raytrain.scalar_metrics(result)
    metrics.update(
        objective=cfg.student.objective, parameters=sum(p.numel() for p in model.parameters()), calibration=cal
    )
    uri = export(
        model,
        tokenizer,
        cfg,
        out,
        {
            "bestValMacroF1": state["best_f1"],
            "bestStep": state["best_step"],
            "trainedOn": source,
            "configHash": ctx.config_hash,
            "version": ctx.version,
            "calibration": cal,
            **({"exports": exports} if exports else {}),
        },
    )
    ctx.log(
        f"{cfg.student.objective}: exported the standard-input model to {uri} (best val macro-F1 {state['best_f1']:.4f} "
        f"at step {state['best_step']}; temperature {cal['temperature']:.3f}, validation ECE {cal['valEceBefore']:.4f} -> "
        f"{cal['valEceAfter']:.4f}, offsets {cal['offsets']}, validation macro-F1 {cal['valMacroF1Argmax']:.4f} -> "
        f"{cal['valMacroF1']:.4f})"
    )
    return metrics, uri
