"""Structured pruning of Llama-style causal LMs, one ratio per layer for attention and for the MLP.

The method of "Pruning Large Language Models via Accuracy Predictor" (arXiv 2309.09507) prunes each
layer's attention heads and MLP intermediate channels at its own ratio; importance is first-order
Taylor, as in LLM-Pruner (Ma et al. 2023): for a structure s with parameters W_s,

    I(s) = sum over w in W_s of |w * dL/dw|

on a few calibration samples (L the next-token loss). A layer's attention is pruned in whole
key-value groups (a KV head with the query heads that share it), so grouped-query attention keeps
its shape; its MLP in channels (a row of gate_proj and up_proj with the matching column of
down_proj). Every layer keeps at least one group and one channel.

Pruning removes the rows and columns for real: the model is smaller and faster. A pruned model's
layers differ in size, which the standard Llama config cannot say; `save` writes it with the small
self-contained `kubedistill/ml/pruned_llama.py` named in `auto_map`, so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` loads it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubedistill.ml import losses, pruned_llama
from kubedistill.ml.models import PRUNED_AUTO_MAP as AUTO_MAP
from kubedistill.ml.models import pruned_config

SUPPORTED = ("LlamaForCausalLM", "PrunedLlamaForCausalLM")
MODELING_FILE = Path(pruned_llama.__file__)


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    """Per layer, the fraction of attention KV groups and of MLP channels to remove, each in [0, 1)."""

    attn: tuple[float, ...]
    mlp: tuple[float, ...]

    def check(self, layers: int, field: str = "architecture") -> None:
        if len(self.attn) != layers or len(self.mlp) != layers:
            raise ValueError(
                f"{field}: expected {layers} attention and {layers} MLP ratios (one per layer), "
                f"got {len(self.attn)} and {len(self.mlp)}"
            )
        for kind, ratios in (("attn", self.attn), ("mlp", self.mlp)):
            for i, r in enumerate(ratios):
                if not 0 <= r < 1:
                    raise ValueError(f"{field}.{kind}[{i}]: a pruning ratio must be in [0, 1), got {r!r}")

    @classmethod
    def uniform(cls, layers: int, attn: float, mlp: float) -> Architecture:
        return cls((attn,) * layers, (mlp,) * layers)


@dataclass(frozen=True)
class Shape:
    """What pruning needs to know of a model: sizes per layer and the parameters outside the layers."""

    hidden: int
    head_dim: int
    groups: int  # query heads per KV head
    kv_heads: tuple[int, ...]
    intermediate: tuple[int, ...]
    other_params: int  # embeddings, norms, head

    @property
    def layers(self) -> int:
        return len(self.kv_heads)

    def layer_params(self, kv: int, inter: int, attn_bias: bool = False) -> tuple[int, int]:
        q = kv * self.groups * self.head_dim
        attn = self.hidden * q * 2 + self.hidden * kv * self.head_dim * 2  # q, o; k, v
        if attn_bias:
            attn += q + 2 * kv * self.head_dim + self.hidden
        return attn, 3 * self.hidden * inter

    def params(self, arch: Architecture | None = None) -> int:
        """Parameter count after pruning by `arch` (the model's own count with None)."""
        total = self.other_params
        for i in range(self.layers):
            kv, inter = self.kv_heads[i], self.intermediate[i]
            if arch is not None:
                kv, inter = kept(kv, arch.attn[i]), kept(inter, arch.mlp[i])
            a, m = self.layer_params(kv, inter)
            total += a + m
        return total

    def removed_fraction(self, arch: Architecture) -> float:
        return 1 - self.params(arch) / self.params()


def kept(n: int, ratio: float) -> int:
    """Structures left of `n` after removing `ratio` of them (rounded; never none)."""
    return max(1, n - round(n * ratio))


def check_supported(model: nn.Module) -> None:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"pruning supports Llama-style causal LMs ({', '.join(SUPPORTED)}); got {name} "
            f"(model_type {getattr(model.config, 'model_type', '?')!r})"
        )
    if getattr(model.config, "attention_bias", False) or getattr(model.config, "mlp_bias", False):
        raise UnsupportedArchitecture(
            f"pruning supports Llama layers without biases; {name} has attention or MLP biases"
        )


def shape_of(model: nn.Module) -> Shape:
    check_supported(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    layers = model.model.layers
    kv = tuple(layer.self_attn.k_proj.out_features // head_dim for layer in layers)
    inter = tuple(layer.mlp.gate_proj.out_features for layer in layers)
    in_layers = sum(p.numel() for layer in layers for n, p in layer.named_parameters() if "norm" not in n)
    total = sum(p.numel() for p in model.parameters())
    return Shape(cfg.hidden_size, head_dim, groups, kv, inter, total - in_layers)


# ---------------------------------------------------------------------------------------------
# Importance.


@dataclass
class Importance:
    """Per layer: a score per KV group (attention) and per intermediate channel (MLP)."""

    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]

    def to_bytes(self) -> bytes:
        """safetensors, not pickle: a file planted in storage can hold tensors, never code."""
        from safetensors.torch import save

        tensors = {f"{kind}.{i}": t.contiguous() for kind in ("attn", "mlp") for i, t in enumerate(getattr(self, kind))}
        return save(tensors)

    @classmethod
    def from_bytes(cls, data: bytes) -> Importance:
        from safetensors.torch import load

        tensors = load(data)
        layers = len(tensors) // 2
        if sorted(tensors) != sorted(f"{k}.{i}" for k in ("attn", "mlp") for i in range(layers)):
            raise ValueError(f"not an importance file: tensors {sorted(tensors)[:6]}")
        return cls([tensors[f"attn.{i}"] for i in range(layers)], [tensors[f"mlp.{i}"] for i in range(layers)])


def _taylor(p: Any) -> torch.Tensor:
    """First-order Taylor importance of each weight of a linear layer: |w * dL/dw| (after a backward pass)."""
    return (p.weight * p.weight.grad).abs().detach()


def taylor_importance(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> Importance:
    """First-order Taylor importance summed over calibration batches ({input_ids, attention_mask, labels})."""
    shape = shape_of(model)
    model.eval()
    model.zero_grad(set_to_none=True)
    attn = [torch.zeros(k) for k in shape.kv_heads]
    mlp = [torch.zeros(m) for m in shape.intermediate]
    for batch in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        losses.causal_lm_loss(out.logits, batch["labels"]).backward()
        for i, layer in enumerate(model.model.layers):
            a, m = layer.self_attn, layer.mlp
            d, g = shape.head_dim, shape.groups
            q = _taylor(a.q_proj).sum(1).view(-1, g * d).sum(1)  # rows of a group's query heads
            kv = (_taylor(a.k_proj).sum(1) + _taylor(a.v_proj).sum(1)).view(-1, d).sum(1)
            o = _taylor(a.o_proj).sum(0).view(-1, g * d).sum(1)  # columns of its query heads
            attn[i] += (q + kv + o).float().cpu()
            ch = _taylor(m.gate_proj).sum(1) + _taylor(m.up_proj).sum(1) + _taylor(m.down_proj).sum(0)
            mlp[i] += ch.float().cpu()
        model.zero_grad(set_to_none=True)
    return Importance(attn, mlp)


# ---------------------------------------------------------------------------------------------
# Pruning.


def _keep(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n most important structures, in their original order."""
    return torch.topk(scores, n).indices.sort().values


def _rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return w.index_select(0, idx).clone()


def prune(model: nn.Module, arch: Architecture, importance: Importance) -> nn.Module:
    """Remove the least important KV groups and channels of every layer, in place; returns the model,
    whose class becomes PrunedLlamaForCausalLM (what `save` writes and `from_pretrained` loads)."""
    shape = shape_of(model)
    arch.check(shape.layers)
    d, g = shape.head_dim, shape.groups
    kv_sizes, inter_sizes = [], []
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            a, m = layer.self_attn, layer.mlp
            old = {n: getattr(a, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
            old |= {n: getattr(m, n).weight for n in ("gate_proj", "up_proj", "down_proj")}
            dtype, device = old["q_proj"].dtype, old["q_proj"].device
            groups = _keep(importance.attn[i], kept(shape.kv_heads[i], arch.attn[i]))
            heads = (groups[:, None] * g + torch.arange(g)).flatten()  # query heads of the kept groups
            q_idx = (heads[:, None] * d + torch.arange(d)).flatten().to(device)
            kv_idx = (groups[:, None] * d + torch.arange(d)).flatten().to(device)
            ch = _keep(importance.mlp[i], kept(shape.intermediate[i], arch.mlp[i])).to(device)
            pruned_llama.resize_layer(layer, len(groups), len(ch), d, g)
            layer.to(device=device, dtype=dtype)
            a.q_proj.weight.copy_(_rows(old["q_proj"], q_idx))
            a.k_proj.weight.copy_(_rows(old["k_proj"], kv_idx))
            a.v_proj.weight.copy_(_rows(old["v_proj"], kv_idx))
            a.o_proj.weight.copy_(old["o_proj"].index_select(1, q_idx))
            m.gate_proj.weight.copy_(_rows(old["gate_proj"], ch))
            m.up_proj.weight.copy_(_rows(old["up_proj"], ch))
            m.down_proj.weight.copy_(old["down_proj"].index_select(1, ch))
            kv_sizes.append(len(groups))
            inter_sizes.append(len(ch))
    cfg = pruned_llama.PrunedLlamaConfig(
        kv_heads_per_layer=kv_sizes,
        intermediate_per_layer=inter_sizes,
        **{
            k: v
            for k, v in model.config.to_dict().items()
            if k
            not in (
                "model_type",
                "architectures",
                "auto_map",
                "kv_heads_per_layer",
                "intermediate_per_layer",
                "transformers_version",
            )
        },
    )
    model.config = cfg
    model.__class__ = pruned_llama.PrunedLlamaForCausalLM
    return model


# ---------------------------------------------------------------------------------------------
# Saving and loading.


def save(model: nn.Module, tokenizer: Any, directory: str | Path) -> Path:
    """save_pretrained files plus the modeling code the config's auto_map names."""
    d = Path(directory)
    model.config.auto_map = dict(AUTO_MAP)
    model.config.architectures = ["PrunedLlamaForCausalLM"]
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    shutil.copyfile(MODELING_FILE, d / MODELING_FILE.name)
    return d


def is_pruned(path: str | Path) -> bool:
    """True for a directory `save` wrote, with kubedistill's own modeling code (byte for byte): the one
    case where loading trusts code that ships with a model."""
    p = Path(path)
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not pruned_config(cfg) or not (p / MODELING_FILE.name).is_file():
        return False
    ours, theirs = (hashlib.sha256(f.read_bytes()).hexdigest() for f in (MODELING_FILE, p / MODELING_FILE.name))
    return ours == theirs


def load(path: str | Path, dtype: Any = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not is_pruned(path):
        raise UnsupportedArchitecture(f"{path}: not a model saved by kubedistill.ml.prune.save")
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=dtype)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
