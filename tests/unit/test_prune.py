"""Structured pruning of Llama layers: parameter counts, identity at 0%, Taylor importance on a case
where the answer is known, save + `from_pretrained`, and bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from kubedistill.ml import prune
from kubedistill.stages.teacher import lm


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
BATCH = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_parameter_count_matches_the_requested_ratios():
    model = _llama()
    shape = prune.shape_of(model)
    assert shape.params() == prune.param_count(model)
    arch = prune.Architecture((0.5, 0.25, 0.0), (0.5, 0.0, 0.75))
    prune.prune(model, arch, prune.taylor_importance(model, [BATCH]))
    assert prune.param_count(model) == shape.params(arch)
    layers = model.model.layers
    # 4 KV groups of 2 query heads x 8 dims; 128 channels
    assert [la.self_attn.k_proj.out_features // 8 for la in layers] == [2, 3, 4]
    assert [la.self_attn.q_proj.out_features // 8 for la in layers] == [4, 6, 8]
    assert [la.mlp.gate_proj.out_features for la in layers] == [64, 128, 32]
    # by hand: per layer attention 64*(q+o) + 64*(k+v), MLP 3*64*channels; the rest untouched
    by_hand = shape.other_params + sum(64 * 2 * q + 64 * 2 * k + 3 * 64 * c
                                       for q, k, c in ((32, 16, 64), (48, 24, 128), (64, 32, 32)))
    assert prune.param_count(model) == by_hand
    assert _logits(model).shape == (2, 16, 300)


def test_zero_pruning_leaves_outputs_identical():
    model = _llama()
    before = _logits(model)
    prune.prune(model, prune.Architecture.uniform(3, 0.0, 0.0), prune.taylor_importance(model, [BATCH]))
    assert type(model).__name__ == "PrunedLlamaForCausalLM"
    assert torch.equal(_logits(model), before)


def test_taylor_importance_finds_a_group_that_contributes_nothing_and_pruning_it_changes_nothing():
    model = _llama()
    a = model.model.layers[1].self_attn
    with torch.no_grad():  # KV group 2 of layer 1 (query heads 4, 5): every weight zero
        a.q_proj.weight[32:48].zero_()
        a.k_proj.weight[16:24].zero_()
        a.v_proj.weight[16:24].zero_()
        a.o_proj.weight[:, 32:48].zero_()
        model.model.layers[2].mlp.down_proj.weight[:, 7].zero_()  # channel 7 of layer 2 writes nothing
    before = _logits(model)
    imp = prune.taylor_importance(model, [BATCH, BATCH])
    assert imp.attn[1][2] == 0 and (imp.attn[1][[0, 1, 3]] > 0).all()
    assert imp.mlp[2].argmin() == 7
    arch = prune.Architecture((0.0, 0.25, 0.0), (0.0, 0.0, 1 / 128))
    prune.prune(model, arch, imp)
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    assert model.model.layers[1].self_attn.k_proj.out_features == 24


def test_a_pruned_model_saves_and_reloads_with_from_pretrained(tmp_path):
    model = _llama()
    prune.prune(model, prune.Architecture((0.5, 0.0, 0.25), (0.25, 0.5, 0.0)), prune.taylor_importance(model, [BATCH]))
    tok = lm.train_tokenizer(["plumber in harbor", "sushi near north"] * 20, 300)
    prune.save(model, tok, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(again).__name__ == "PrunedLlamaForCausalLM" and prune.param_count(again) == prune.param_count(model)
    torch.testing.assert_close(_logits(again), _logits(model))
    assert prune.is_pruned(tmp_path) and prune.param_count(prune.load(tmp_path)) == prune.param_count(model)
    # a pruned model prunes further (its layers already differ in size)
    prune.prune(again, prune.Architecture.uniform(3, 0.0, 0.5), prune.taylor_importance(again, [BATCH]))
    assert [la.mlp.gate_proj.out_features for la in again.model.layers] == [48, 32, 64]


def test_the_teacher_loader_takes_a_pruned_model_without_asking_on_stdin(tmp_path, monkeypatch):
    """transformers asks on stdin before running a model's code; the tokenizer reads the same config."""
    model = _llama()
    prune.prune(model, prune.Architecture.uniform(3, 0.25, 0.25), prune.taylor_importance(model, [BATCH]))
    prune.save(model, lm.train_tokenizer(["plumber in harbor", "sushi near north"] * 20, 300), tmp_path)

    def asked(*_: object) -> str:
        raise AssertionError("asked on stdin whether to trust the pruned model's code")

    monkeypatch.setattr("builtins.input", asked)
    lm.check_loadable(str(tmp_path), "spec.teacher.baseModel")
    again, _ = lm.load(str(tmp_path), "spec.teacher.baseModel")
    assert prune.param_count(again) == prune.param_count(model)


def test_only_kubedistills_own_modeling_code_is_trusted(tmp_path):
    model = _llama()
    prune.prune(model, prune.Architecture.uniform(3, 0.0, 0.0), prune.taylor_importance(model, [BATCH]))
    prune.save(model, lm.train_tokenizer(["a b c"] * 5, 300), tmp_path)
    (tmp_path / "pruned_llama.py").write_text((tmp_path / "pruned_llama.py").read_text() + "\nimport os\n")
    assert not prune.is_pruned(tmp_path)
    with pytest.raises(prune.UnsupportedArchitecture, match="not a model saved by kubedistill.ml.prune.save"):
        prune.load(tmp_path)


@pytest.mark.parametrize(("attn", "mlp", "says"), [
    ((0.0, 1.0, 0.0), (0.0, 0.0, 0.0), r"arch.attn\[1\]: a pruning ratio must be in \[0, 1\), got 1.0"),
    ((0.0, 0.0, 0.0), (-0.1, 0.0, 0.0), r"arch.mlp\[0\]: a pruning ratio must be in \[0, 1\), got -0.1"),
    ((0.0, 0.0), (0.0, 0.0, 0.0), r"arch: expected 3 attention and 3 MLP ratios \(one per layer\), got 2 and 3"),
])
def test_bad_ratios_name_the_field(attn, mlp, says):
    with pytest.raises(ValueError, match=says):
        prune.Architecture(attn, mlp).check(3, "arch")
    with pytest.raises(ValueError):
        prune.prune(_llama(), prune.Architecture(attn, mlp), prune.Importance([], []))


def test_an_architecture_the_pruner_does_not_support_is_refused():
    bert = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    with pytest.raises(prune.UnsupportedArchitecture, match="supports Llama-style causal LMs .* got BertForMaskedLM"):
        prune.taylor_importance(bert, [BATCH])
    cfg = _llama().config
    cfg.attention_bias = True
    with pytest.raises(prune.UnsupportedArchitecture, match="without biases"):
        prune.shape_of(LlamaForCausalLM(cfg))


def test_kept_rounds_and_never_removes_everything():
    assert [prune.kept(4, r) for r in (0.0, 0.2, 0.25, 0.5, 0.9, 0.99)] == [4, 3, 3, 2, 1, 1]


def test_importance_round_trips_through_safetensors_and_prunes_the_same_model():
    """What the prune-search stage saves for its trials: tensors only, so a planted file cannot run code."""
    imp = prune.taylor_importance(_llama(), [BATCH])
    back = prune.Importance.from_bytes(imp.to_bytes())
    for a, b in zip(imp.attn + imp.mlp, back.attn + back.mlp, strict=True):
        torch.testing.assert_close(a, b)
    arch = prune.Architecture((0.5, 0.0, 0.25), (0.25, 0.5, 0.0))
    one, two = _llama(), _llama()
    prune.prune(one, arch, imp)
    prune.prune(two, arch, back)
    torch.testing.assert_close(_logits(one), _logits(two))
    with pytest.raises(ValueError, match="not an importance file"):
        prune.Importance.from_bytes(prune.Importance([torch.ones(1)], []).to_bytes())


def test_recovery_trains_only_the_adapters_and_the_merged_model_reloads_with_the_standard_loader(tmp_path):
    """Recovery's path (kubedistill.stages.prune_search): a pruned model saved by `prune.save`, wrapped with LoRA on
    every projection by `train.build`, trained by `train.fit`, checkpointed, merged by `stages.trained_model` and
    saved by `save_pruned`: before the merge only adapter weights moved; after it, `lm.load` reads the model with
    no adapter left, in its pruned shape, computing what the trained adapters did."""
    import ray.train

    from kubedistill.core.spec import LoraSpec, TrainSpec
    from kubedistill.core.storage import Storage
    from kubedistill.stages import prune_search as ps
    from kubedistill.stages.teacher import stages, train

    model = _llama()
    tok = lm.train_tokenizer(["plumber in harbor", "sushi near north"] * 20, 300)
    prune.prune(model, prune.Architecture((0.5, 0.25, 0.0), (0.5, 0.0, 0.75)), prune.taylor_importance(model, [BATCH]))
    start = tmp_path / "pruned"
    ps.save_pruned(model, tok, Storage(str(start)))
    cfg = train.TrainConfig(task="lm", start=str(start), examples_uri="", lora_targets=ps.RECOVERY_TARGETS,
                            train=TrainSpec(epochs=1, learning_rate=1e-2, batch_size=4, max_steps=3),
                            lora=LoraSpec(r=4, alpha=8, dropout=0.0), checkpoint_every=10**9)
    peft_model, tokenizer, _ = train.build(cfg, None, reference=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert all("lora_" in n for n in trainable) and adapted == set(ps.RECOVERY_TARGETS)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    rows = [{"prompt": "plumber in ", "response": "harbor"}, {"prompt": "sushi ", "response": "near north"}] * 4
    (tmp_path / "ckpt").mkdir()
    train.fit(cfg, peft_model, tokenizer, None, rows, on_checkpoint=lambda save, m: save(tmp_path / "ckpt"))
    after = dict(peft_model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert moved and moved <= trainable  # only adapters changed (lora_A starts random, lora_B at zero: B moved)
    merged, _ = stages.trained_model(cfg, ray.train.Checkpoint.from_directory(str(tmp_path / "ckpt")), None)
    ps.save_pruned(merged, tok, Storage(str(tmp_path / "recovered")))
    loaded, _ = lm.load(str(tmp_path / "recovered"), "test")
    assert type(loaded).__name__ == "PrunedLlamaForCausalLM" and not any("lora" in n for n in loaded.state_dict())
    assert prune.param_count(loaded) == prune.param_count(model)  # the pruned shape, adapters folded in
    peft_model.eval()
    torch.testing.assert_close(_logits(loaded.eval()), _logits(peft_model), rtol=1e-4, atol=1e-4)
