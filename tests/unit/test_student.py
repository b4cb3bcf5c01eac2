"""Student components on a tiny encoder: inputs, model, objectives, fit/resume, export/load, bad input."""

import copy

import pytest
import torch

from kubedistill.core.spec import StudentSpec
from kubedistill.core.storage import Storage
from kubedistill.ml.models import ModelNotFound, resolve
from kubedistill.stages import data
from kubedistill.stages.data import split_by_query
from kubedistill.stages.student import (
    Encoded,
    StudentConfig,
    build_model,
    check_rows,
    export,
    fit,
    load_student,
    loss_terms,
    select_student,
    service_text,
)

LABELS = ["irrelevant", "partial", "relevant"]


@pytest.fixture(scope="module")
def rows():
    return data.generate(LABELS, 60, 40, 4, 1, 40, seed=0).labeled


def _cfg(tiny_encoder, train=None, crsd=None, **kw):
    """The spec's student section (validated as in a run) with a small budget; `train`/`crsd` override theirs."""
    student = StudentSpec.model_validate({
        "base_model": tiny_encoder, "max_length": 48, "max_reasoning_tokens": 16,
        "train": {"batch_size": 8, "epochs": 1, "learning_rate": 1e-3, **(train or {})}, "crsd": crsd or {}, **kw})
    return StudentConfig(student, LABELS)


def test_service_text_uses_the_log_fields():
    row = {"service_title": "Golden Hotpot", "service_category": "hotpot restaurant", "service_district": "Harbor",
           "service_price_level": 2, "service_tags": ["hotpot", "lamb slices"], "service_description": "Cosy."}
    assert service_text(row) == "Golden Hotpot | hotpot restaurant | Harbor | $$ | offers hotpot, lamb slices | Cosy."
    assert service_text({"service_title": "X"}) == "X"


def test_check_rows_names_what_is_missing(tiny_encoder, rows):
    cfg = _cfg(tiny_encoder)
    check_rows(rows, cfg, "train")
    with pytest.raises(ValueError, match="training set is empty"):
        check_rows([], cfg, "train")
    with pytest.raises(ValueError, match=r"label\(s\) \['great'\] are not in spec.labels"):
        check_rows([{**rows[0], "label": "great"}], cfg, "train")
    with pytest.raises(ValueError, match=r"1 of 2 row\(s\) have no 'reasoning'; objective crsd .*objective: ce"):
        check_rows([rows[0], {**rows[1], "reasoning": ""}], cfg, "train")
    check_rows([{**rows[1], "reasoning": ""}], cfg.with_objective("ce"), "train")
    with pytest.raises(ValueError, match="lack 'label_probs'"):
        check_rows(rows[:3], cfg.with_objective("kd"), "train")


def test_split_holds_out_whole_queries(rows):
    train, val = split_by_query(rows, 0.25, seed=0)
    assert len(train) + len(val) == len(rows) and val
    assert not ({r["query"] for r in train} & {r["query"] for r in val})


def test_reasoning_view_is_capped_and_comes_after_the_service(tiny_encoder, rows):
    cfg = _cfg(tiny_encoder)
    _, tok = build_model(cfg)
    enc = Encoded(tok, rows[:4], cfg, with_reasoning=True)
    std_len = enc.standard["attention_mask"].sum(1)
    rsn_len = enc.reasoning["attention_mask"].sum(1)
    assert torch.all(rsn_len > std_len) and torch.all(rsn_len <= std_len + cfg.student.max_reasoning_tokens + 1)
    assert Encoded(tok, rows[:4], cfg, with_reasoning=False).reasoning is None


@pytest.mark.parametrize("objective, teacher_grad", [("ce", False), ("kd", False), ("crsd", False), ("crsd", True)])
def test_each_objective_trains_every_parameter(tiny_encoder, rows, objective, teacher_grad):
    cfg = _cfg(tiny_encoder, objective=objective, crsd={"teacher_grad": teacher_grad})
    use = [{**r, "label_probs": [0.2, 0.3, 0.5]} for r in rows[:8]] if objective == "kd" else rows[:8]
    model, tok = build_model(cfg)
    enc = Encoded(tok, use, cfg, with_reasoning=objective == "crsd")
    terms = loss_terms(model, enc, torch.arange(8), cfg)
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.parameters()), "unused parameters break DDP"
    assert {"crsd": {"sce", "tce", "align", "contrast", "loss"}, "ce": {"sce", "loss"},
            "kd": {"sce", "kd", "loss"}}[objective] == set(terms)


def test_forward_only_teacher_view_gives_the_encoder_no_gradient_from_it(tiny_encoder, rows):
    cfg = _cfg(tiny_encoder)
    assert cfg.student.crsd.teacher_grad is False  # the default
    model, tok = build_model(cfg)
    enc = Encoded(tok, rows[:8], cfg, with_reasoning=True)
    std = {k: v[:8] for k, v in enc.standard.items()}
    rsn = {k: v[:8] for k, v in enc.reasoning.items()}
    h, ls, r, lt = model(std, rsn, reasoning_grad=False)
    assert not r.requires_grad and lt.requires_grad
    torch.nn.functional.cross_entropy(lt, enc.labels[:8]).backward()
    assert model.classifier.weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())


def test_fit_resumes_mid_run_to_the_same_result(tiny_encoder, rows):
    cfg = _cfg(tiny_encoder, train={"epochs": 2}, patience=5)
    train, val = split_by_query(rows, 0.2, seed=0)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    rounds = []
    # a checkpoint is serialised when taken (as the Ray Train worker does with torch.save)
    full = fit(cfg, model, tok, train, val, on_round=lambda r: rounds.append((r.metrics, copy.deepcopy(r.checkpoint()))))
    assert [m["epoch"] for m, _ in rounds] == [1.0, 2.0]
    # a fresh process resumes from the first round's checkpoint and ends where the full run ended
    torch.manual_seed(0)
    model2, _ = build_model(cfg)
    resumed = fit(cfg, model2, tok, train, val, resume=rounds[0][1])
    assert resumed["step"] == full["step"]
    for k, v in full["model"].items():
        assert torch.allclose(v, resumed["model"][k], atol=1e-5), k


@pytest.mark.parametrize("objective", ["ce", "kd", "crsd"])
def test_bf16_computes_the_forward_in_bf16_and_the_losses_and_gradients_in_fp32(tiny_encoder, rows, objective):
    cfg = _cfg(tiny_encoder, objective=objective)
    use = [{**r, "label_probs": [0.2, 0.3, 0.5]} for r in rows[:8]] if objective == "kd" else rows[:8]
    model, tok = build_model(cfg)
    model.eval()  # no dropout: the two passes see the same network
    enc = Encoded(tok, use, cfg, with_reasoning=objective == "crsd")
    full = loss_terms(model, enc, torch.arange(8), cfg, "fp32")
    half = loss_terms(model, enc, torch.arange(8), cfg, "bf16")
    assert {k: v.dtype for k, v in half.items()} == {k: torch.float32 for k in full}
    for k in full:  # bf16 keeps 8 bits of mantissa: the same loss to within a few parts in a hundred
        torch.testing.assert_close(half[k], full[k], rtol=0.05, atol=0.02)
    half["loss"].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_fit_says_which_arithmetic_it_trained_in(tiny_encoder, rows):
    train, val = split_by_query(rows, 0.2, seed=0)
    for requested in ("fp32", "bf16"):
        cfg = _cfg(tiny_encoder, resources={"precision": requested})
        model, tok = build_model(cfg)
        assert fit(cfg, model, tok, train, val)["metrics"]["precision"] == requested


def test_early_stopping(tiny_encoder, rows):
    cfg = _cfg(tiny_encoder, train={"epochs": 20, "learning_rate": 1e-9}, patience=1)  # nothing improves after round 1
    model, tok = build_model(cfg)
    train, val = split_by_query(rows, 0.2, seed=0)
    out = fit(cfg, model, tok, train, val)
    assert out["metrics"]["stopped_early"] and out["step"] < 20 * 4


def test_mean_pooling_averages_real_tokens_only_and_cls_takes_the_first(tiny_encoder):
    from kubedistill.stages.student import RelevanceStudent

    model, _ = build_model(_cfg(tiny_encoder))
    model.eval()
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # the third token is padding
    mask = torch.tensor([[1, 1, 0]])

    class Fixed(torch.nn.Module):  # an encoder whose last hidden state we choose
        config = model.encoder.config

        def forward(self, **batch):
            return type("Out", (), {"last_hidden_state": hidden})()

    mean = RelevanceStudent(Fixed(), 3, pooling="mean").pool({"input_ids": mask, "attention_mask": mask})
    cls = RelevanceStudent(Fixed(), 3, pooling="cls").pool({"input_ids": mask, "attention_mask": mask})
    assert mean.tolist() == [[2.0, 3.0]] and cls.tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError, match="spec.student.pooling"):
        RelevanceStudent(Fixed(), 3, pooling="max")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_export_and_load_give_the_same_predictions(tiny_encoder, rows, tmp_path, pooling):
    cfg = _cfg(tiny_encoder, pooling=pooling)
    model, tok = build_model(cfg)
    model.eval()
    uri = export(model, tok, cfg, Storage(str(tmp_path / "model")), {"bestValMacroF1": 0.5})
    loaded = load_student(uri)
    assert loaded.labels == LABELS and loaded.meta["bestValMacroF1"] == 0.5
    assert loaded.meta["pooling"] == pooling and loaded.model.pooling == pooling
    from kubedistill.stages.student import predict_proba

    assert torch.allclose(torch.tensor(predict_proba(model, tok, rows[:5], cfg.student.max_length)),
                          torch.tensor(loaded.predict_proba(rows[:5])), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no student.json"):
        load_student(str(tmp_path))


def test_model_loader_errors_name_the_field(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFound, match="spec.student.baseModel: .* without config.json"):
        resolve(str(tmp_path), "spec.student.baseModel")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="spec.teacher.baseModel: cannot load model 'Qwen/Qwen2.5-7B'"):
        resolve("Qwen/Qwen2.5-7B", "spec.teacher.baseModel")
    assert resolve("sentence-transformers/all-MiniLM-L6-v2", "x").endswith("model")


def test_the_head_starts_from_the_seed_whatever_ran_before(tiny_encoder):
    """The classifier head is initialised from the seed, not from whatever the process's RNG held
    (each Ray Train worker is a fresh process: before, a run could not be reproduced from its seed)."""
    first, _ = build_model(_cfg(tiny_encoder))
    torch.rand(1000)  # the RNG moves on, as it does between runs
    again, _ = build_model(_cfg(tiny_encoder))
    other, _ = build_model(_cfg(tiny_encoder, seed=1))
    assert torch.equal(first.classifier.weight, again.classifier.weight)
    assert not torch.equal(first.classifier.weight, other.classifier.weight)


def test_rows_the_model_did_not_explain_are_left_out_for_crsd(rows):
    from kubedistill.stages.student import drop_unexplained

    kept, dropped = drop_unexplained([rows[0], {**rows[1], "reasoning": " "}, {**rows[2], "reasoning": None}])
    assert kept == [rows[0]] and dropped == 2


def test_select_picks_the_objective_or_the_best_on_validation():
    val = {"crsd": 0.61, "ce": 0.64, "kd": 0.58}
    assert select_student("objective", "crsd", val) == "crsd"  # the spec's objective, whatever validation says
    assert select_student("validation", "crsd", val) == "ce"
    assert select_student("validation", "crsd", {"crsd": 0.64, "ce": 0.64}) == "crsd"  # a tie goes to objective
    assert select_student("validation", "kd", {"kd": 0.5, "ce": 0.6, "crsd": 0.6}) == "ce"  # then to spec order
    with pytest.raises(ValueError, match=r"spec\.student\.select.*objective or validation"):
        select_student("eval", "crsd", val)


def test_a_shallower_student_keeps_the_first_layers_weights_and_reloads_as_trained(tiny_encoder, rows, tmp_path):
    from transformers import AutoModel

    from kubedistill.stages.student import predict_proba

    full = AutoModel.from_pretrained(tiny_encoder)
    cfg = _cfg(tiny_encoder, layers=1)
    model, tok = build_model(cfg)
    kept = model.encoder.encoder.layer
    assert len(kept) == 1 and model.encoder.config.num_hidden_layers == 1
    for name, weight in kept[0].state_dict().items():  # the pretrained first layer, not a fresh one
        assert torch.equal(weight, full.encoder.layer[0].state_dict()[name]), name
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, full.embeddings.word_embeddings.weight)
    model.eval()
    uri = export(model, tok, cfg, Storage(str(tmp_path / "model")), {})
    loaded = load_student(uri)
    assert len(loaded.model.encoder.encoder.layer) == 1
    assert torch.allclose(torch.tensor(predict_proba(model, tok, rows[:5], cfg.student.max_length)),
                          torch.tensor(loaded.predict_proba(rows[:5])), atol=1e-5)
    same, _ = build_model(_cfg(tiny_encoder, layers=2))  # every layer: the model as it was saved
    assert len(same.encoder.encoder.layer) == 2


def test_a_shallower_student_exports_to_onnx_and_the_hugging_face_form(tiny_encoder, rows, tmp_path):
    from kubedistill.stages.student import export_formats

    cfg = _cfg(tiny_encoder, layers=1, pooling="cls")
    model, tok = build_model(cfg)
    model.eval()
    record = export_formats(model, tok, cfg, Storage(str(tmp_path / "model")), 1.0, None, rows[:8])
    assert record["onnx"]["passed"] and record["hf"]["passed"], record


def test_layers_beyond_the_base_encoders_name_the_field(tiny_encoder):
    from kubedistill.stages.student import base_encoder

    with pytest.raises(ValueError, match=r"spec.student.layers: 3, but .* has 2 layers; expected 1 to 2"):
        base_encoder(_cfg(tiny_encoder, layers=3))
    with pytest.raises(ValueError, match="spec.student.layers: 3, but"):
        build_model(_cfg(tiny_encoder, layers=3))
    with pytest.raises(ValueError):  # the spec itself refuses 0
        _cfg(tiny_encoder, layers=0)

