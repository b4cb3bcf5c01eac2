"""The student in formats other tools load without kubedistill, and the ONNX Runtime scorer that serves them.

Beside the native artifact (`encoder/` + `head.safetensors` + `student.json`) the student stage writes

    onnx/model.onnx        the whole scoring graph in standard ONNX ops, fp32: token ids -> encoder -> pooling
                           -> head -> `probabilities` (softmax(logits / temperature)), `score` (the expected
                           grade, what /score sorts by) and `label` (argmax(log p + decision offsets))
    onnx/model-int8.onnx   the same graph with its MatMul weights in int8 (ONNX Runtime dynamic quantization)
    onnx/tokenizer.json    the student's tokenizer with its truncation (longest_first at maxLength) and padding
                           set, so `tokenizers` alone produces the graph's inputs
    onnx/config.json       labels, grades, offsets, input and output names
    hf/                    (`pooling: cls`, BERT encoders) an `AutoModelForSequenceClassification` directory

The student's standard input is the tokenizer's own pair encoding, `[CLS] query [SEP] service [SEP]` cut
longest-first to `maxLength` tokens: what `transformers`, `tokenizers`, sentence-transformers' `CrossEncoder`
and Text Embeddings Inference all produce from a (query, text) pair, so every export answers alike.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: how the student can be served; `torch` is the native artifact
RUNTIMES = ("torch", "onnx", "onnx-int8")
#: the runtimes in the order a default picks them: fastest first (benchmarks/serve_latency.py measures it)
BY_SPEED = ("onnx-int8", "onnx", "torch")
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx"}
OUTPUTS = ("probabilities", "score", "label")
#: largest |p_onnx - p_torch| over the check pairs for an fp32 export to count as the same model
FP32_TOLERANCE = 1e-4
#: BERT's pooler is tanh(W h + b); with W = EPSILON * I it is EPSILON * h to a relative (EPSILON * h)^2 / 3
EPSILON = 1e-4
_FLOOR = 1e-12  # as kubedistill.ml.calibration: log(p) of a zero probability


@dataclass(frozen=True)
class Head:
    """What an export bakes in beside the weights: the labels, the input length, the fitted temperature and
    the decision offsets (in `labels` order; None: plain argmax)."""

    labels: list[str]
    max_length: int
    temperature: float
    offsets: list[float] | None

    def offsets_or_zeros(self) -> list[float]:
        return self.offsets or [0.0] * len(self.labels)


def grades(n_labels: int) -> list[float]:
    """The grade of each label, least relevant 0 to most relevant 1: `score` is the probabilities' mean grade."""
    return np.linspace(0.0, 1.0, n_labels).tolist()


def configure_tokenizer(tokenizer: Any, max_length: int) -> Any:
    """A `tokenizers.Tokenizer` copy of `tokenizer`'s backend that truncates pairs longest-first to `max_length`
    and pads a batch to its longest row: the student's standard input from `tokenizers` alone."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.enable_truncation(max_length, strategy="longest_first")
    tok.enable_padding(
        pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, pad_type_id=tokenizer.pad_token_type_id
    )
    return tok


# ---------------------------------------------------------------------------------------------
# ONNX


def _scoring_graph(model: Any, input_names: list[str], temperature: float, offsets: list[float] | None) -> Any:
    """The served computation as one module: token ids -> (probabilities, score, label)."""
    import torch

    n = model.classifier.out_features

    class ScoringGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = model
            self.register_buffer("grades", torch.tensor(grades(n), dtype=torch.float32))
            self.register_buffer("offsets", torch.tensor(offsets or [0.0] * n, dtype=torch.float32))

        def forward(self, *inputs: Any) -> tuple[Any, Any, Any]:
            _, logits = self.student.encode(dict(zip(input_names, inputs, strict=True)))
            p = torch.softmax(logits.float() / temperature, dim=-1)
            label = (torch.log(p.clamp(min=_FLOOR)) + self.offsets).argmax(dim=-1)
            return p, p @ self.grades, label

    return ScoringGraph().eval()


def export_onnx(model: Any, tokenizer: Any, head: Head, dest: Path) -> dict[str, Any]:
    """Write onnx/{model.onnx, model-int8.onnx, tokenizer.json, config.json} under `dest`; return what was written
    (file digests and sizes). The graph is traced with eager attention (the exporter's patterns are standard ops)."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dest.mkdir(parents=True, exist_ok=True)
    student = copy.deepcopy(model).cpu().float().eval()
    if hasattr(student.encoder, "set_attn_implementation"):
        student.encoder.set_attn_implementation("eager")
    names = [n for n in tokenizer.model_input_names if n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = _scoring_graph(student, names, head.temperature, head.offsets)
    sample = tokenizer(["a query"] * 2, ["a service text", "another"], padding=True, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            graph,
            tuple(sample[k] for k in names),
            str(dest / ONNX_FILES["onnx"]),
            input_names=names,
            output_names=list(OUTPUTS),
            dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in names}, **{k: {0: "batch"} for k in OUTPUTS}},
            opset_version=17,
            dynamo=False,
        )
    quantize_dynamic(
        str(dest / ONNX_FILES["onnx"]),
        str(dest / ONNX_FILES["onnx-int8"]),
        weight_type=QuantType.QInt8,
        # the encoder's matmuls and embeddings only: the head and the grade average are a few hundred weights
        # whose rounding would cost accuracy and save nothing
        nodes_to_exclude=_outside_encoder(dest / ONNX_FILES["onnx"]),
        extra_options={"DefaultTensorType": 1},  # FLOAT, for tensors shape inference leaves untyped
    )
    configure_tokenizer(tokenizer, head.max_length).save(str(dest / "tokenizer.json"))
    config = {
        "labels": head.labels,
        "grades": grades(len(head.labels)),
        "offsets": head.offsets_or_zeros(),
        "temperature": head.temperature,
        "temperatureApplied": True,
        "maxLength": head.max_length,
        "inputs": names,
        "outputs": list(OUTPUTS),
        "models": {"fp32": ONNX_FILES["onnx"], "int8": ONNX_FILES["onnx-int8"]},
        "tokenizer": "tokenizer.json",
        "usage": "encode (query, service text) pairs with tokenizer.json as saved (its truncation and padding are "
        "set), feed the named inputs as int64; `probabilities` are calibrated, `score` is their mean grade, "
        "`label` indexes `labels`",
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return {"seconds": round(time.perf_counter() - t0, 1), **files_record(dest)}


def _outside_encoder(path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    # the exporter names a node by its module path: the encoder's are /encoder/..., the head's /classifier/...;
    # the quantizer first rewrites a Gemm as <name>_MatMul + <name>_Add
    outside = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and not n.name.startswith("/encoder/")]
    return [n.name for n in outside] + [f"{n.name}_MatMul" for n in outside if n.op_type == "Gemm"]


def files_record(directory: Path) -> dict[str, Any]:
    return {
        "files": {
            f.name: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
            for f in sorted(directory.iterdir())
            if f.is_file()
        }
    }


@dataclass
class OnnxScorer:
    """An exported scoring graph on ONNX Runtime: `predict_texts(queries, services)` -> calibrated probabilities.

    Needs only `onnxruntime`, `tokenizers` and numpy (what serving replicas and outside users load)."""

    directory: Path
    runtime: str = "onnx"
    threads: int = 0  # 0: ONNX Runtime's default (every core)
    config: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if self.runtime not in ONNX_FILES:
            raise ValueError(f"runtime: {self.runtime!r} is not an ONNX runtime; expected one of {list(ONNX_FILES)}")
        self.config = json.loads((self.directory / "config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(self.directory / self.config["tokenizer"]))
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: a replica's cores also run its HTTP handling and tokenizer
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.directory / ONNX_FILES[self.runtime]), options, providers=["CPUExecutionProvider"]
        )

    def inputs(self, queries: list[str], services: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer.encode_batch(list(zip(queries, services, strict=True)))
        columns = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        return {k: np.array([getattr(e, columns[k]) for e in enc], dtype=np.int64) for k in self.config["inputs"]}

    def run(self, queries: list[str], services: list[str]) -> dict[str, np.ndarray]:
        out = self.session.run(list(OUTPUTS), self.inputs(queries, services))
        return dict(zip(OUTPUTS, out, strict=True))

    def predict_texts(self, queries: list[str], services: list[str], batch_size: int = 64) -> np.ndarray:
        parts = [
            self.run(queries[i : i + batch_size], services[i : i + batch_size])["probabilities"]
            for i in range(0, len(queries), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.config["labels"])), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Hugging Face sequence classification


def hf_unsupported(model: Any) -> str | None:
    """Why this student has no standard `AutoModelForSequenceClassification` form, or None when it has one."""
    if model.pooling != "cls":
        return (
            f"pooling: {model.pooling}: sequence-classification heads read the [CLS] vector, and a mean over "
            "tokens has no standard head; the ONNX export (which carries the pooling) is the standard form"
        )
    if model.encoder.config.model_type != "bert":
        return (
            f"encoder {model.encoder.config.model_type!r}: only BERT-family encoders map exactly onto a standard "
            "head (through BERT's pooler); the ONNX export is the standard form"
        )
    return None


def export_hf(model: Any, tokenizer: Any, head: Head, dest: Path) -> dict[str, Any]:
    """Write a `BertForSequenceClassification` directory whose softmax equals the student's calibrated probabilities.

    The student's head reads [CLS] directly; BERT's head reads pooler(h) = tanh(W h + b). With W = EPSILON * I
    and b = 0 the pooler is EPSILON * h to within a relative (EPSILON * |h|)^2 / 3 (1e-6 at |h| = 17), and
    the classifier takes the student's weights / (EPSILON * temperature): the same logits / temperature. Decision
    offsets, which no standard head has, are kept in the config (`kubedistill_decision_offsets`)."""
    import torch
    from transformers import BertForSequenceClassification

    labels, temperature = head.labels, head.temperature
    config = copy.deepcopy(model.encoder.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {lab: i for i, lab in enumerate(labels)}
    config.kubedistill_decision_offsets = dict(zip(labels, head.offsets_or_zeros(), strict=True))
    config.kubedistill_grades = dict(zip(labels, grades(len(labels)), strict=True))
    hf = BertForSequenceClassification(config).eval()
    missing, unexpected = hf.bert.load_state_dict(model.encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(f"encoder weights do not map onto BERT: missing {missing}, unexpected {unexpected}")
    hidden = config.hidden_size
    with torch.no_grad():
        hf.bert.pooler.dense.weight.copy_(torch.eye(hidden) * EPSILON)
        hf.bert.pooler.dense.bias.zero_()
        hf.classifier.weight.copy_(model.classifier.weight.float() / (EPSILON * temperature))
        hf.classifier.bias.copy_(model.classifier.bias.float() / temperature)
    dest.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(dest))
    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = head.max_length  # `truncation=True` then cuts pairs longest-first at the student's length
    tok.save_pretrained(str(dest))
    return {"class": "BertForSequenceClassification", "epsilon": EPSILON, **files_record(dest)}


# ---------------------------------------------------------------------------------------------
# Checks


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if len(a) else 0.0


def int8_verdict(fp32_macro_f1: float, int8_macro_f1: float, max_loss_points: float = 0.5) -> dict[str, Any]:
    """Whether the int8 export kept its quality: at most `max_loss_points` macro-F1 points (0.5 = 0.005) below
    fp32 on the same pairs."""
    loss = round(100 * (fp32_macro_f1 - int8_macro_f1), 4)
    ok = loss <= max_loss_points
    return {
        "lossPoints": loss,
        "maxLossPoints": max_loss_points,
        "passed": ok,
        "reason": f"int8 macro-F1 {int8_macro_f1:.4f} vs fp32 {fp32_macro_f1:.4f}: {loss:+.2f} points lost "
        f"({'<=' if ok else '>'} {max_loss_points})",
    }


def pick_runtime(passed: dict[str, bool]) -> str:
    """The fastest runtime whose check passed (torch, the reference, always does)."""
    return next(r for r in BY_SPEED if r == "torch" or passed.get(r, False))
