"""The student's standard exports: ONNX fp32 and int8, the Hugging Face sequence-classification directory, the
ONNX Runtime scorer, the runtime checks evaluate makes, and a fresh Python that has only onnxruntime and tokenizers."""

import json

import numpy as np
import pytest
import torch

from kubedistill.core.spec import StudentSpec
from kubedistill.core.storage import Storage
from kubedistill.ml import calibration
from kubedistill.ml import export as ex
from kubedistill.stages import data
from kubedistill.stages.evaluate import check_runtimes
from kubedistill.stages.serving import score_results
from kubedistill.stages.student import (
    StudentConfig,
    build_model,
    encode_standard,
    export,
    export_formats,
    hf_probabilities,
    load_onnx,
    load_runtime,
    load_student,
    predict_texts,
    service_text,
)
from tests.isolated import score_onnx_fresh

LABELS = ["irrelevant", "partial", "relevant"]
TEMPERATURE, OFFSETS = 1.7, [0.0, 0.4, -0.3]


@pytest.fixture(scope="module")
def rows():
    rows = data.generate(LABELS, 60, 40, 4, 1, 40, seed=0).labeled
    # real pairs, plus the ones cutting decides: a query longer than half the budget, a very long service
    long = dict(rows[0], query=" ".join(["vegan brunch near the old town square"] * 12))
    longer = dict(rows[1], description="quiet rooms " * 200)
    return [*rows[:60], long, longer]


def _student(tiny_encoder, pooling, rows):
    """A tiny student whose head is its pooled features' class means (a nearest-mean classifier fitted on `rows`):
    varied, confident and partly right, so parity is checked on outputs that differ from pair to pair. Its weights are
    capped (row norm 100): a random encoder's CLS vector barely varies between pairs, and the class means then need
    weights of norm ~1,500, which scale float32 rounding (different between CPUs' kernels: AVX2 vs AVX-512) past the
    parity tolerance; no trained classifier is that ill-conditioned (the quickstart's student: 9.8e-07)."""
    cfg = StudentConfig(StudentSpec(base_model=tiny_encoder, max_length=48, pooling=pooling), LABELS)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    model.eval()
    with torch.no_grad():
        h = model.pool(dict(encode_standard(tok, [r["query"] for r in rows], [service_text(r) for r in rows], 48)))
        mu, sd = h.mean(0), h.std(0)
        y = torch.tensor([LABELS.index(r["label"]) for r in rows])
        weight = torch.stack([((h[y == k] - mu) / sd).mean(0) for k in range(len(LABELS))]) / sd * 3
        weight *= (100 / weight.norm(dim=1).max()).clamp(max=1)
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-(weight @ mu))
    return cfg, model, tok


@pytest.fixture(scope="module", params=["mean", "cls"])
def exported(request, tiny_encoder, rows, tmp_path_factory):
    cfg, model, tok = _student(tiny_encoder, request.param, rows)
    out = Storage(str(tmp_path_factory.mktemp(f"student-{request.param}") / "model"))
    record = export_formats(model, tok, cfg, out, TEMPERATURE, OFFSETS, rows)
    calibrated = {"temperature": TEMPERATURE, "offsets": dict(zip(LABELS, OFFSETS, strict=True))}
    uri = export(model, tok, cfg, out, {"exports": record, "calibration": calibrated, "configHash": "a" * 16})
    queries, texts = [r["query"] for r in rows], [service_text(r) for r in rows]
    reference = predict_texts(model, tok, queries, texts, 48, temperature=TEMPERATURE)
    return {"cfg": cfg, "model": model, "tok": tok, "uri": uri, "record": record, "queries": queries, "texts": texts,
            "reference": reference, "pooling": request.param}


def test_onnx_fp32_answers_as_the_model_within_1e_4_on_real_pairs(exported):
    got = load_onnx(exported["uri"], "onnx").predict_texts(exported["queries"], exported["texts"])
    assert got.shape == exported["reference"].shape
    assert ex.max_abs_diff(got, exported["reference"]) <= 1e-4
    assert exported["record"]["onnx"]["passed"] and exported["record"]["onnx"]["maxAbsDiff"] <= 1e-4
    assert exported["record"]["checkedOn"]["rows"] == len(exported["queries"])
    assert len(set(exported["reference"].argmax(1))) == len(LABELS)  # outputs that differ from pair to pair


def test_the_graph_outputs_score_and_label_as_score_answers(exported):
    scorer = load_onnx(exported["uri"], "onnx").scorer
    out = scorer.run(exported["queries"], exported["texts"])
    served = score_results(exported["reference"], LABELS, [str(i) for i in range(len(exported["queries"]))], OFFSETS)
    assert out["score"] == pytest.approx([r["score"] for r in served], abs=1e-4)
    assert [LABELS[k] for k in out["label"]] == [r["label"] for r in served]
    assert (calibration.decide(exported["reference"], OFFSETS) != exported["reference"].argmax(1)).any()  # offsets matter


def test_int8_quantizes_every_encoder_matmul_and_nothing_after_it(exported):
    import onnx

    directory = Storage(exported["uri"]).uri("onnx")
    fp32 = [n for n in onnx.load(f"{directory}/model.onnx").graph.node if n.op_type in ("MatMul", "Gemm")]
    int8 = {n.name: n.op_type for n in onnx.load(f"{directory}/model-int8.onnx").graph.node}
    encoder = [n.name for n in fp32 if n.name.startswith("/encoder/")]
    head = [n.name for n in fp32 if not n.name.startswith("/encoder/")]
    # a weight matmul becomes MatMulInteger (its node renamed *_quant); attention's activation x activation stays
    weights = [n for n in encoder if n not in int8]
    assert len(weights) >= 6 * 2 and all(f"{n}_quant" in int8 for n in weights), (weights, sorted(int8)[:20])
    # the head and the grade average stay fp32 (the quantizer rewrites a Gemm as a MatMul and an Add first)
    assert head and all(int8.get(n) in ("MatMul", "Gemm") or int8.get(f"{n}_MatMul") == "MatMul" for n in head), head


def test_int8_is_smaller_close_and_recorded(exported):
    files = exported["record"]["onnx"]["files"]
    assert files["model-int8.onnx"]["bytes"] < files["model.onnx"]["bytes"] / 2
    got = load_onnx(exported["uri"], "onnx-int8").predict_texts(exported["queries"], exported["texts"])
    diff = ex.max_abs_diff(got, exported["reference"])
    assert diff == pytest.approx(exported["record"]["onnx-int8"]["maxAbsDiff"], abs=1e-6)
    meta = load_student(exported["uri"]).meta
    assert meta["exports"]["onnx-int8"]["path"] == "onnx/model-int8.onnx"


def test_hugging_face_directory_loads_in_transformers_and_cross_encoder_with_cls_pooling(exported):
    hf = exported["record"]["hf"]
    if exported["pooling"] == "mean":
        assert "skipped" in hf and "mean" in hf["skipped"] and "ONNX" in hf["skipped"]
        assert not (Storage(exported["uri"]).is_file("hf/config.json"))
        return
    from sentence_transformers import CrossEncoder

    path = Storage(exported["uri"]).uri("hf")
    assert hf["passed"] and hf["class"] == "BertForSequenceClassification"
    config = json.loads(Storage(exported["uri"]).read_bytes("hf/config.json"))
    assert config["id2label"] == {str(i): lab for i, lab in enumerate(LABELS)}
    got = hf_probabilities(path, exported["queries"], exported["texts"])
    assert ex.max_abs_diff(got, exported["reference"]) <= 1e-4
    cross = CrossEncoder(path, device="cpu")
    pairs = list(zip(exported["queries"], exported["texts"], strict=True))
    assert ex.max_abs_diff(cross.predict(pairs, apply_softmax=True), exported["reference"]) <= 1e-4


def test_a_fresh_python_with_only_onnxruntime_and_tokenizers_answers_the_same(exported):
    directory = Storage(exported["uri"]).uri("onnx")
    query, texts = exported["queries"][0], exported["texts"][:6]
    for model, tolerance in (("model.onnx", 1e-4), ("model-int8.onnx", None)):
        answers, loaded = score_onnx_fresh(directory, query, texts, model)
        assert loaded <= {"onnxruntime", "tokenizers", "numpy"}, loaded
        runtime = "onnx" if model == "model.onnx" else "onnx-int8"
        expected = load_runtime(exported["uri"], runtime).predict_texts([query] * len(texts), texts)
        got = np.array([[a["probabilities"][lab] for lab in LABELS] for a in answers])
        assert ex.max_abs_diff(got, expected) <= 1e-5  # the same file, the same tokens: one answer
        if tolerance:  # and fp32 is the PyTorch model's answer
            reference = load_student(exported["uri"]).predict_texts([query] * len(texts), texts)
            assert ex.max_abs_diff(got, reference) <= tolerance


def test_served_versions_name_the_runtime(exported):
    versions = {r: load_runtime(exported["uri"], r).version for r in ex.RUNTIMES}
    assert versions == {r: f"crsd-aaaaaaaaaaaa+{r}" for r in ex.RUNTIMES}


def test_a_student_without_exports_has_no_onnx_runtime(tiny_encoder, rows, tmp_path):
    cfg, model, tok = _student(tiny_encoder, "mean", rows)
    uri = export(model, tok, cfg, Storage(str(tmp_path / "old")), {})
    with pytest.raises(KeyError, match="no onnx export"):
        load_onnx(uri, "onnx")


def test_an_export_that_fails_is_recorded_and_the_trained_model_kept(tiny_encoder, rows, tmp_path, monkeypatch):
    cfg, model, tok = _student(tiny_encoder, "cls", rows)

    def untraceable(*args, **kwargs):
        raise RuntimeError("cannot trace this encoder")

    monkeypatch.setattr(ex, "export_onnx", untraceable)
    out = Storage(str(tmp_path / "model"))
    record = export_formats(model, tok, cfg, out, 1.0, None, rows[:8])
    assert record["onnx"] == record["onnx-int8"] == {"error": "RuntimeError: cannot trace this encoder", "passed": False}
    assert record["hf"]["passed"]  # the other form still made
    uri = export(model, tok, cfg, out, {"exports": record})
    assert not Storage(uri).list("onnx")
    with pytest.raises(KeyError, match="cannot trace this encoder"):
        load_onnx(uri, "onnx-int8")
    assert load_runtime(uri, "torch").predict_texts(["q"], ["s"]).shape == (1, 3)


class _Worse:
    """An int8 scorer that loses quality whatever the student learned: it gives every pair a grade its truth is not
    (macro-F1 0). (Swapping two grades of the reference was a loss on one draw of the data and a gain on another.)"""

    def __init__(self, scorer, truth):
        self.scorer, self.truth = scorer, truth

    def predict_texts(self, queries, services, batch_size=64):
        out = np.zeros_like(self.scorer.predict_texts(queries, services, batch_size))
        out[np.arange(len(out)), [(LABELS.index(t) + 1) % len(LABELS) for t in self.truth]] = 1.0
        return out


def test_runtime_checks_pick_the_fastest_that_passed_and_say_why_int8_failed(exported, rows):
    student = load_student(exported["uri"])
    served = student.predict_texts(exported["queries"], exported["texts"])
    truth = [r["label"] for r in rows]
    checks = check_runtimes(student, served, lambda r: load_onnx(exported["uri"], r), rows, truth, 0.0)
    assert checks["torch"]["passed"] and checks["onnx"]["passed"] and checks["onnx"]["max_abs_diff"] <= 1e-4
    assert checks["onnx"]["macro_f1"] == pytest.approx(checks["torch"]["macro_f1"], abs=1e-4)
    int8_ok = checks["onnx-int8"]["loss_points"] <= 0.5  # a gain passes too
    assert checks["onnx-int8"]["passed"] == int8_ok
    assert ex.pick_runtime({r: c["passed"] for r, c in checks.items()}) == ("onnx-int8" if int8_ok else "onnx")

    def worse(runtime):
        scorer = load_onnx(exported["uri"], runtime)
        return _Worse(scorer, truth) if runtime == "onnx-int8" else scorer

    checks = check_runtimes(student, served, worse, rows, truth, 0.0)
    assert not checks["onnx-int8"]["passed"] and "points lost (> 0.5)" in checks["onnx-int8"]["reason"]
    assert ex.pick_runtime({r: c["passed"] for r, c in checks.items()}) == "onnx"  # fp32 served instead

    def missing(runtime):
        raise KeyError(runtime)

    checks = check_runtimes(student, served, missing, rows, truth, 0.0)
    assert [r for r, c in checks.items() if c["passed"]] == ["torch"] and "not exported" in checks["onnx"]["reason"]


def test_int8_verdict_on_a_hand_computed_case():
    assert ex.int8_verdict(0.8000, 0.7960)["lossPoints"] == pytest.approx(0.4)
    assert ex.int8_verdict(0.8000, 0.7960)["passed"]
    bad = ex.int8_verdict(0.8000, 0.7940)
    assert bad["lossPoints"] == pytest.approx(0.6) and not bad["passed"] and "0.60 points lost (> 0.5)" in bad["reason"]
    assert ex.int8_verdict(0.80, 0.81)["passed"]  # a gain is no loss


def test_the_tokenizer_alone_makes_the_models_inputs(tiny_encoder, rows):
    """The student's standard input is the tokenizer's own longest-first pair encoding: `tokenizers` with the
    exported configuration gives the same ids, including a query longer than half the budget."""
    _, _, tok = _student(tiny_encoder, "mean", rows)
    queries, texts = [r["query"] for r in rows], [service_text(r) for r in rows]
    ours = encode_standard(tok, queries, texts, 48)
    theirs = ex.configure_tokenizer(tok, 48).encode_batch(list(zip(queries, texts, strict=True)))
    assert ours["input_ids"].tolist() == [e.ids for e in theirs]
    assert ours["token_type_ids"].tolist() == [e.type_ids for e in theirs]
    assert max(len(e.ids) for e in theirs) == 48
