"""The four teacher stages on a real local Ray cluster (Ray Train DDP, 2 CPU workers) with a scratch
Llama: artifacts and checkpoints on SeaweedFS S3, the numbers each stage must report, a killed
a base model that cannot be loaded. (A killed training job resuming: test_teacher_resume.py.)"""

from __future__ import annotations

import io
import json

import pytest

from kubedistill import runner
from kubedistill.core import spec
from kubedistill.core.stage import FAILURE, MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.stages.data import read_dataset
from kubedistill.stages.teacher import fmt, lm, stages
from tests.conftest import artifact, attempted, minimal_doc

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OFF = {"annotation": {"enabled": False}, "student": {"enabled": False}, "pruning": {"enabled": False},
       "serving": {"enabled": False}}
TEACHER = {
    "baseModel": "scratch:llama-tiny",
    "dapt": {"epochs": 2, "batchSize": 16, "learningRate": 3e-3},
    "sft": {"epochs": 10, "batchSize": 16, "learningRate": 3e-3, "corpusReplay": 0.2},  # 60 domain texts beside 300 pairs
    "rewardModel": {"epochs": 2, "batchSize": 16, "learningRate": 1e-3, "ownAnswers": 40},  # 32 + 8 held-out prompts
    "dpo": {"epochs": 2, "batchSize": 8, "learningRate": 1e-4, "samplesPerPrompt": 4, "margin": 0.1, "prompts": 150},
    "resources": {"workers": 2, "cpusPerWorker": 1},
    "maxNewTokens": 96,  # the classic world's chains fit (the quickstart annotates with 96); every stage generates less
}
# the quickstart's services and SFT set (a smaller SFT set makes DPO's effect on this tiny model a coin
# toss); an eighth of its log (300 pairs to annotate) and fewer eval pairs
SYNTHETIC = {"services": 300, "queries": 50, "pairsPerQuery": 6, "sftSize": 300, "evalSize": 100, "seed": 0}
SMALL = {"services": 80, "queries": 80, "pairsPerQuery": 4, "sftSize": 20, "evalSize": 10, "seed": 0}


def _doc(uri: str, name: str, teacher: dict, synthetic: dict = SYNTHETIC, **more: dict) -> dict:
    doc = minimal_doc(storage={"uri": uri}, data={"synthetic": synthetic}, teacher=teacher, **{**OFF, **more})
    doc["metadata"]["name"] = name
    return doc


@pytest.mark.cost(700)
@pytest.mark.timeout(2400)  # 18 minutes beside another test on 2 cores without AVX-512 (CI of 6c78f45): a hang, not a slow machine
def test_the_teacher_stages_train_on_s3_and_report_what_they_must(bucket, ray_address, ray_head):
    # then the DPO teacher, as saved on S3, annotates the log with vLLM (asked for: at 300 rows auto would pick
    # transformers, which finishes first on CPUs below the measured crossover)
    annotation = {"enabled": True, "engine": "vllm", "batchSize": 128, "maxTokens": 128, "kvCacheGib": 0.5, "compile": False}
    # and the predictor-guided pruning search prunes it (Ray Tune trials, 2 at a time)
    # (without recovery: model/ is the pruned model itself; recovery is test_prune_recovery.py's)
    pruning = {"enabled": True, "targetRatio": 0.25, "sampledArchitectures": 8, "topK": 2, "candidates": 1000,
               "evalTexts": 32, "evalPrompts": 8, "recovery": {"enabled": False}}
    run = spec.parse_run(_doc(f"s3://{bucket}/runs", "teach", TEACHER, annotation=annotation, pruning=pruning))
    out = io.StringIO()
    status = runner.run_local(run, address=ray_address, out=out)
    assert [(s.name, s.phase) for s in status.stages][:6] == [
        ("data", "Succeeded"), ("teacher-dapt", "Succeeded"), ("teacher-sft", "Succeeded"),
        ("reward-model", "Succeeded"), ("teacher-dpo", "Succeeded"), ("annotate", "Succeeded")]
    st = Storage(f"s3://{bucket}/runs/teach")
    m = {s: st.read_json(f"{s}/{MANIFEST}")["metrics"] for s in ("teacher-dapt", "teacher-sft", "reward-model", "teacher-dpo")}
    assert m["teacher-dapt"]["perplexity_after"] < m["teacher-dapt"]["perplexity_before"]
    assert m["teacher-sft"]["eval"]["parse_rate"] >= 0.95, m["teacher-sft"]
    # SFT trained its pairs and the domain texts it replayed in the same batches
    assert m["teacher-sft"]["replayed_texts"] == 60 and m["teacher-sft"]["total_steps"] == 10 * 23, m["teacher-sft"]
    examples = [json.loads(x) for x in artifact(st, "teacher-sft").read_text("examples/part-00000.jsonl").splitlines()]
    assert sum("text" in e for e in examples) == 60 and sum("response" in e for e in examples) == 300
    acc = m["reward-model"]["pairwise_accuracy"]
    assert set(acc) == {"label", "consistency", "faithfulness", "format"} and all(0 <= a <= 1 for a in acc.values())
    assert m["reward-model"]["combined_pairwise_accuracy"] > 0.5
    # label pairs of the SFT teacher's own answers (4 samples of each of 40 prompts), the held-out ones scored apart
    own = m["reward-model"]["own_answer_pairs"]
    assert 0 < own["train"] <= 32 and own["heldout"] <= 8, own
    assert m["reward-model"]["own_answers_accuracy"] is None if not own["heldout"] else 0 <= m["reward-model"]["own_answers_accuracy"] <= 1
    dpo = m["teacher-dpo"]
    # DPO fitted its own pairs (the policy prefers most chosen answers over their rejected ones more than the SFT
    # teacher did); whether that moves the held-out reward is a draw on a model this small, reported, not asserted
    assert dpo["preference_pairs"] > 0 and dpo["pairs_fitted"] > 0.5, dpo
    assert {"mean_reward", "label_accuracy", "reward_auc"} <= set(dpo["before"]) & set(dpo["after"]), dpo
    # the reward model checked on the teacher's own samples: shares, each pair's chosen and rejected against its label
    truth = dpo["preference_truth"]
    assert set(truth) == {"chosen_right", "rejected_right", "ordered"} and all(0 <= v <= 1 for v in truth.values())
    for s in ("teacher-dapt", "teacher-sft", "teacher-dpo"):  # each a loadable save_pretrained model
        files = {f.rsplit("/", 1)[-1] for f in artifact(st, s).list("model")}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert {"reward.json", "reward_heads.safetensors"} <= {f.rsplit("/", 1)[-1] for f in artifact(st, "reward-model").list("model")}
    assert any("/checkpoint_" in f for f in artifact(st, "teacher-sft").list("ray"))  # checkpoints on S3
    assert "held-out perplexity" in out.getvalue()
    ann = st.read_json(f"annotate/{MANIFEST}")["metrics"]
    assert ann["engine"] == "vllm" and ann["rows_in"] == 300 == ann["labeled"] + ann["quarantined"]
    assert ann["parse_rate"] >= 0.9, ann

    pr = st.read_json(f"prune-search/{MANIFEST}")["metrics"]
    assert pr["evaluated"] == pr["evaluated_this_run"] == 1 + 8 + 2 and pr["sampled"] == 8 and pr["proposed"] == 2
    budget = pr["base"]["params"] * 0.75
    for which in ("searched", "uniform"):  # both within the same parameter budget, both measured
        assert pr[which]["params"] <= budget and pr[which]["perplexity"] > 0 and 0 <= pr[which]["label_accuracy"] <= 1
    assert pr["searched"]["perplexity"] < pr["base"]["perplexity"] * 10
    assert set(pr["predictor"]) == {"kind", "r2", "kendall_tau", "n_train", "n_test", "fit"} and pr["predictor"]["n_test"] == 8
    assert pr["held_out"]["searched"]["recovered"] is None and pr["held_out"]["uniform"]["recovered"] is None
    assert pr["held_out"]["uniform"]["pruned"]["label_accuracy"] is not None
    searched = artifact(st, "prune-search")
    table = [json.loads(x) for x in searched.read_text("architectures.jsonl").splitlines()]
    assert [x["phase"] for x in table].count("sampled") == 8 and len(table) == 11
    assert searched.read_bytes("predicted_vs_measured.png")[:8] == b"\x89PNG\r\n\x1a\n"
    files = {f.rsplit("/", 1)[-1] for f in searched.list("model")}
    assert {"config.json", "model.safetensors", "pruned_llama.py", "tokenizer.json"} <= files
    # the pruned teacher loads with the standard loader and is smaller
    model, _ = lm.load(searched.uri("model"), "test", st.options)
    assert sum(p.numel() for p in model.parameters()) == pr["searched"]["params"]

    # a retried job (one that died before its manifest) re-evaluates only architectures without a persisted result
    st.delete(f"prune-search/{MANIFEST}")
    searched.delete(MANIFEST)
    searched.delete(searched.list("evals")[0])
    status = runner.run_local(run, address=ray_address, out=io.StringIO())
    assert status.phase == "Succeeded"
    again = st.read_json(f"prune-search/{MANIFEST}")["metrics"]
    assert again["evaluated_this_run"] == 1 and again["searched"]["perplexity"] <= pr["searched"]["perplexity"] + 1e-3

    # DPO's pairs judged by the SFT set's labels (dpo.prefer: label), the stage alone on the same teacher: every
    # chosen response gives its prompt's label and no rejected one does, whatever the reward model says
    # (40 prompts: a chosen and a rejected answer come from the same prompt's samples, so fewer prompts suffice)
    by_label = _doc(f"s3://{bucket}/runs", "teach", {**TEACHER, "dpo": {**TEACHER["dpo"], "prefer": "label", "prompts": 40}},
                    annotation=annotation, pruning=pruning)
    labelled = runner.run_stages(spec.parse_run(by_label), ("teacher-dpo",), ray_head.dashboard_url)["teacher-dpo"]["metrics"]
    assert labelled["preference_pairs"] > 0 and labelled["preference_truth"]["chosen_right"] == 1.0
    assert labelled["preference_truth"]["rejected_right"] == 0.0 and labelled["preference_truth"]["ordered"] == 1.0
    for judged in (dpo["before"], dpo["after"], labelled["after"]):  # the reward ranking the teacher's own answers
        assert judged["reward_auc"] is None or 0 <= judged["reward_auc"] <= 1, judged

    # a quarter of the SFT set's queries held out of SFT for DPO (teacher.preferenceHoldout): SFT trains on none of
    # their pairs, and every prompt DPO samples and every own answer the reward model learns from is one of theirs
    held_doc = _doc(f"s3://{bucket}/runs", "teach", {**TEACHER, "preferenceHoldout": 0.25,
                    "dpo": {**TEACHER["dpo"], "prefer": "label", "prompts": 40}}, annotation=annotation, pruning=pruning)
    held_m = runner.run_stages(spec.parse_run(held_doc), ("teacher-sft", "reward-model", "teacher-dpo"),
                               ray_head.dashboard_url)
    sft_set = read_dataset(artifact(st, "data").child("sft"))
    kept, held = stages.preference_split(sft_set, 0.25)
    held_prompts = {fmt.prompt(r) for r in held}
    assert held_m["teacher-sft"]["metrics"]["sft_rows"] == len(kept) < 300
    trained = [json.loads(x) for x in Storage(held_m["teacher-sft"]["artifact"], st.options)
               .read_text("examples/part-00000.jsonl").splitlines()]
    assert sum("response" in e for e in trained) == len(kept) and not {e.get("prompt") for e in trained} & held_prompts
    preferred = [json.loads(x) for x in Storage(held_m["teacher-dpo"]["artifact"], st.options)
                 .read_text("examples/part-00000.jsonl").splitlines()]
    assert preferred and {e["prompt"] for e in preferred} <= held_prompts
    assert held_m["teacher-dpo"]["metrics"]["preference_truth"]["chosen_right"] == 1.0


def test_a_base_model_that_cannot_be_loaded_fails_the_stage_naming_the_field(tmp_path, ray_address):
    run = spec.parse_run(_doc(str(tmp_path / "store"), "nobase", {**TEACHER, "baseModel": str(tmp_path / "nothing-here")},
                              SMALL))
    with pytest.raises(runner.RunFailed, match="spec.teacher.baseModel") as e:
        runner.run_local(run, address=ray_address, out=io.StringIO())
    assert e.value.stage == "teacher-dapt"
    st = Storage(str(tmp_path / "store" / "nobase"))
    assert st.exists(f"teacher-dapt/{FAILURE}") and not st.exists(f"teacher-dapt/{MANIFEST}")
    assert not attempted(st, "teacher-dapt").list("model")
