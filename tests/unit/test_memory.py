"""Memory planning for the teacher stages: shapes counted like the models count themselves, the estimate's terms on
hand-computed cases, `auto`, the refusals (plan, run, operator) and the 7B sample."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from kubedistill import cli
from kubedistill.cluster.reconcile import reconcile_body
from kubedistill.core import memory, spec
from tests.conftest import minimal_doc

SAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "samples" / "teacher-7b.yaml"
GiB = memory.GiB


def _config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **kw})


@pytest.mark.parametrize("tied", [False, True])
def test_a_shape_counts_the_parameters_the_model_has(tied):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = _config(tie_word_embeddings=tied)
    shape = memory.Shape.from_config(cfg.to_dict(), "test")
    model = LlamaForCausalLM(cfg)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert shape.params(lm_head=False) == sum(p.numel() for p in AutoModel.from_config(cfg).parameters())
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    assert shape.lora_params(4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    qwen = Qwen2Config(**{k: v for k, v in cfg.to_dict().items() if k in _config().to_dict()})
    q = memory.Shape.from_config(qwen.to_dict(), "qwen")
    assert q.qkv_bias and q.params() == sum(p.numel() for p in Qwen2ForCausalLM(qwen).parameters())


def test_the_catalogue_knows_the_published_sizes_and_names():
    assert memory.KNOWN["qwen2.5-7b"].params() == pytest.approx(7.62e9, rel=0.005)  # "7.61B" on its model card
    assert memory.KNOWN["llama-3.1-8b"].params() == pytest.approx(8.03e9, rel=0.005)
    assert memory.KNOWN["qwen2.5-0.5b"].params() == pytest.approx(0.494e9, rel=0.005)
    assert memory.known_shape("Qwen/Qwen2.5-7B-Instruct") is memory.KNOWN["qwen2.5-7b"]
    assert memory.known_shape("s3://models/qwen2.5-72b/") is memory.KNOWN["qwen2.5-72b"]
    assert memory.known_shape("meta-llama/Llama-3.1-8B-Instruct") is memory.KNOWN["llama-3.1-8b"]
    assert memory.known_shape("Qwen/Qwen2.5-7Bx") is None and memory.known_shape("acme/secret-model") is None


def test_a_model_shape_is_read_from_its_config_without_its_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config().to_dict()))
    shape, why = memory.read_shape(str(tmp_path))
    assert why == "" and shape.hidden == 64 and shape.kv_heads == 2 and shape.layers == 3
    scratch, _ = memory.read_shape("scratch:llama-tiny")
    assert scratch.tied and scratch.vocab == 1024
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "bert"}')
    none, why = memory.read_shape(str(tmp_path / "bad"))
    assert none is None and "hidden_size" in why
    none, why = memory.read_shape("acme/never-cached-model")
    assert none is None and "catalogue" in why


def test_the_estimate_on_a_hand_computed_case():
    # 1 layer, hidden 4, intermediate 8, vocab 10, 2 heads of 2, untied:
    # layer = 4*4 (q) + 2*4*4 (k, v) + 4*4 (o) + 3*4*8 (mlp) + 2*4 (norms) = 16+32+16+96+8 = 168
    # embeddings = 10*4*2 + 4 = 84; P = 252
    s = memory.Shape(vocab=10, hidden=4, intermediate=8, layers=1, heads=2, kv_heads=2, head_dim=2, tied=False)
    assert (s.layer_params(), s.embedding_params(), s.params()) == (168, 84, 252)
    job = memory.Job("lm", workers=2, batch=4, seq=3)
    ddp = memory.estimate(s, job, "ddp")
    assert (ddp.terms["params"], ddp.terms["grads"], ddp.terms["optimizer"]) == (4 * 252, 4 * 252, 8 * 252)
    assert ddp.terms["working"] == 0 and ddp.terms["reference"] == 0 and ddp.terms["runtime"] == 0
    fsdp = memory.estimate(s, job, "fsdp")
    assert (fsdp.terms["params"], fsdp.terms["optimizer"]) == (4 * 252 // 2, 8 * 252 // 2)
    assert fsdp.terms["working"] == 84 * 4 + 2 * 168 * 4 + 2 * 4 * 168  # root + 2 layers gathered, 2 layers' grads
    # activations, fp32 on CPU, 2 sequences x 3 tokens per worker: per layer per token
    # norms 2*(16+16) + attn 4*(2*4 + 3*4 + 0 + 4 + 4) + mlp 4*4*8 = 64 + 112 + 128 = 304
    tokens = 6
    assert ddp.terms["activations"] == 304 * tokens + tokens * 10 * 12 + tokens * 4 * 4 * 2
    # LoRA: frozen projections keep no input for a weight gradient: 4 * (q + kv + intermediate) less per token
    assert memory._layer_activation_bytes(s, 4, frozen=True) == 304 - 4 * (4 + 4 + 8)
    ckpt = memory.estimate(s, memory.Job("lm", 2, 4, 3, checkpointing=True), "ddp")
    assert ckpt.terms["activations"] == 4 * 4 * tokens + 304 * tokens + tokens * 10 * 12 + tokens * 4 * 4 * 2
    assert ckpt.activations_other == ddp.terms["activations"]
    dpo = memory.estimate(s, memory.Job("dpo", 2, 4, 3, gpu=True), "fsdp")
    assert dpo.terms["reference"] == 2 * 252 // 2 and dpo.terms["runtime"] == memory.CUDA_RESERVE
    lora = memory.estimate(s, memory.Job("lm", 2, 4, 3, lora_r=2), "ddp")
    assert lora.terms["grads"] == 4 * s.lora_params(2) == 4 * 1 * 2 * (8 + 8)


def _run(**teacher) -> spec.DistillationRun:
    doc = minimal_doc(storage={"uri": "s3://b/runs"}, teacher={"baseModel": "Qwen/Qwen2.5-7B-Instruct", **teacher})
    return spec.parse_run(doc)


GPU = {"workers": 8, "gpusPerWorker": 1, "memory": "96Gi"}


def test_auto_picks_ddp_when_it_fits_and_fsdp_when_it_does_not():
    small = _run(baseModel="Qwen/Qwen2.5-0.5B-Instruct", resources=GPU, sft={"lora": {"r": 16}})
    p = memory.plan(small.spec, list(memory.TRAINING_STAGES))
    assert {s.estimate.strategy for s in p.stages.values()} == {"ddp"} and p.stages["teacher-sft"].chosen_by == "auto"
    big = memory.plan(_run(resources=GPU).spec, list(memory.TRAINING_STAGES))
    assert big.stages["teacher-dapt"].estimate.strategy == "fsdp" and not big.refusals()
    assert memory.strategy(_run(resources=GPU).spec, "teacher-dapt", memory.KNOWN["qwen2.5-7b"]) == "fsdp"
    assert memory.strategy(_run(resources=GPU).spec, "teacher-dapt", None) == "ddp"  # unknown shape: as before


def test_a_stage_that_cannot_fit_is_refused_naming_what_to_change():
    p = memory.plan(_run(resources={**GPU, "strategy": "ddp", "gpuType": "A100-40GB"}).spec, ["teacher-dapt"])
    (why,) = p.refusals()
    assert why.startswith("teacher-dapt needs about") and "40.0 GiB (resources.gpuType A100-40GB)" in why
    assert "spec.teacher.resources.strategy: fsdp" in why and "spec.teacher.gradientCheckpointing: true" in why
    tight = _run(resources={**GPU, "gpuMemoryGiB": 12}, gradientCheckpointing=True, maxLength=4096)
    (why,) = memory.plan(tight.spec, ["teacher-dapt"]).refusals()
    assert "(resources.gpuMemoryGiB)" in why and "more spec.teacher.resources.workers" in why
    host = _run(resources={**GPU, "memory": "16Gi"})
    (why,) = memory.plan(host.spec, ["teacher-dapt"]).refusals()
    assert "host memory" in why and "spec.teacher.resources.memory" in why
    cpu = _run(resources={"workers": 2, "memory": "4Gi"})
    assert memory.plan(cpu.spec, ["teacher-dapt"]).stages["teacher-dapt"].fits is False
    assert not memory.plan(cpu.spec, ["teacher-dapt"]).refusals()  # CPU workers: said, not refused


def test_an_unknown_model_is_planned_as_unknown_not_refused():
    p = memory.plan(_run(baseModel="acme/private-13b", resources={**GPU, "gpuMemoryGiB": 1}).spec, ["teacher-sft"])
    assert p.stages["teacher-sft"].fits is None and not p.refusals()
    assert p.stages["teacher-sft"].line().startswith("not estimated (config.json of acme/private-13b not readable")


def test_the_7b_sample_fits_with_fsdp_and_is_refused_with_ddp_and_full_fine_tuning(tmp_path, capsys):
    assert cli.main(["plan", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    for stage in memory.TRAINING_STAGES:
        line = out.split(stage, 1)[1].splitlines()[1]
        assert line.strip().startswith("memory: fsdp: ~") and ", fits 80.0 GiB" in line
        assert line.endswith("shape from catalogue: Qwen2.5-7B)")
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["spec"]["teacher"]["resources"]["strategy"] = "ddp"
    del doc["spec"]["teacher"]["sft"]["lora"]
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(doc))
    assert cli.main(["plan", str(tmp_path / "ddp.yaml")]) == 1
    err = capsys.readouterr().err
    assert "error: teacher-sft needs about" in err and "change spec.teacher.resources.strategy: fsdp" in err
    assert cli.preflight(spec.parse_run(doc), None, 8000).startswith("teacher-dapt needs about")


def test_the_operator_refuses_a_run_that_cannot_fit_before_creating_anything():
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update(namespace="ml", uid="u1", generation=1)
    ok = reconcile_body(copy.deepcopy(doc), {}, {}.get, "2026-12-05T00:00:00Z")
    assert ok.status.phase != "Failed" and ok.create
    doc["spec"]["teacher"]["resources"]["strategy"] = "ddp"
    plan = reconcile_body(doc, {}, {}.get, "2026-12-05T00:00:00Z")
    assert plan.status.phase == "Failed" and plan.create == []
    ready = next(c for c in plan.status.conditions if c.type == "Ready")
    assert ready.reason == "InsufficientMemory" and "spec.teacher.resources.strategy: fsdp" in ready.message
    assert plan.events[0][:2] == ("Warning", "InsufficientMemory")


@pytest.mark.parametrize(("q", "n"), [("16Gi", 16 * GiB), ("1.5G", 1_500_000_000), ("512Mi", 512 * 2**20), ("1e9", 10**9)])
def test_quantities(q, n):
    assert memory.quantity_bytes(q) == n


def test_each_training_stage_plans_from_its_own_spec_slice():
    """A stage job sees only the spec paths its registry entry declares: the plan must need nothing else."""
    from kubedistill.core import pipeline

    run = _run(resources=GPU, gradientCheckpointing=True, maxLength=1024)
    for st in pipeline.build(run):
        if st.name in memory.TRAINING_STAGES:
            view = spec.spec_slice(st.config["spec"], st.name)
            planned = memory.plan_stage(view, st.name, memory.KNOWN["qwen2.5-7b"])
            assert planned.estimate.strategy == "fsdp" and planned.fits


def test_gpu_workers_in_fp32_are_estimated_as_cpu_arithmetic():
    """`resources.precision: fp32` (or a T4, which has no bf16 units) on GPUs: fp32 activations, an fp32 reference
    and no autocast copy of the weights; bf16 (auto on other GPUs) halves the activations."""
    s = memory.Shape(vocab=10, hidden=4, intermediate=8, layers=1, heads=2, kv_heads=2, head_dim=2, tied=False)
    half = memory.estimate(s, memory.Job("dpo", 2, 4, 3, gpu=True), "ddp")
    full = memory.estimate(s, memory.Job("dpo", 2, 4, 3, gpu=True, bf16=False), "ddp")
    assert (half.terms["reference"], full.terms["reference"]) == (2 * 252, 4 * 252)
    assert (half.terms["working"], full.terms["working"]) == (2 * 252, 0)
    assert full.terms["activations"] > half.terms["activations"]
    gpu = {"workers": 8, "gpusPerWorker": 1}
    assert memory.job_for(_run(resources=gpu).spec, "teacher-sft").bf16
    assert not memory.job_for(_run(resources={**gpu, "precision": "fp32"}).spec, "teacher-sft").bf16
    assert not memory.job_for(_run(resources={**gpu, "gpuType": "T4"}).spec, "teacher-sft").bf16
