"""A Llama whose layers keep different numbers of attention heads and MLP channels (after pruning).

Saved beside a pruned model's weights and named in its config's `auto_map`, so the standard
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` loads it, as with any Hub model
that ships its modeling code. Self-contained on purpose: it imports only transformers and torch.
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruned_llama"

    def __init__(self, kv_heads_per_layer: list[int] | None = None, intermediate_per_layer: list[int] | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.kv_heads_per_layer = kv_heads_per_layer
        self.intermediate_per_layer = intermediate_per_layer


def resize_layer(layer: nn.Module, kv_heads: int, intermediate: int, head_dim: int, groups: int) -> None:
    """Give one decoder layer fresh projections of the pruned sizes (weights are filled by the caller)."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden = attn.q_proj.in_features
    bias = attn.q_proj.bias is not None
    attn.q_proj = nn.Linear(hidden, kv_heads * groups * head_dim, bias=bias)
    attn.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
    attn.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
    attn.o_proj = nn.Linear(kv_heads * groups * head_dim, hidden, bias=attn.o_proj.bias is not None)
    mbias = mlp.gate_proj.bias is not None
    mlp.gate_proj = nn.Linear(hidden, intermediate, bias=mbias)
    mlp.up_proj = nn.Linear(hidden, intermediate, bias=mbias)
    mlp.down_proj = nn.Linear(intermediate, hidden, bias=mlp.down_proj.bias is not None)
    mlp.intermediate_size = intermediate


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        groups = config.num_attention_heads // config.num_key_value_heads
        for layer, kv, inter in zip(self.model.layers, config.kv_heads_per_layer, config.intermediate_per_layer,
                                    strict=True):
            resize_layer(layer, kv, inter, head_dim, groups)
