"""The `evaluate` stage: the lexical baseline every report keeps, the scores, and the evaluation gate.

- Scores come from `kubedistill.ml.metrics.classification_metrics` (the student's validation uses it too).
- `LexicalBaseline`: BM25-style query/service features and a multinomial logistic regression. It is
  the floor a distilled student must beat, and it stays in every report. It is trained with the
  student's class weighting (`spec.student.train.classWeights`; balanced sampling counts as balanced
  weights) and, when the student fits decision offsets, fits its own on held-out queries of its
  training rows, so the comparison stays fair.
- Every model's probabilities are scored for calibration too (top-label ECE; the student before and
  after its fitted temperature), drawn as reliability diagrams beside the confusion matrices.
- `gate`: the run's promotion rule: an absolute floor (`spec.evaluation.minMacroF1`) and a comparison
  (`spec.evaluation.minGainOverBaseline`: the student's macro-F1 over the stronger lexical baseline, with
  a paired-bootstrap interval so a reader sees whether the gain is more than the eval set's noise; it resamples
  whole queries, since a query's pairs stand or fall together).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kubedistill.core.progress import Target
from kubedistill.core.spec import StudentSpec
from kubedistill.core.stage import PROMOTED, StageContext, now
from kubedistill.ml import calibration
from kubedistill.ml.metrics import classification_metrics, paired_gain_interval

_TOKEN = re.compile(r"[a-z0-9$]+")
_CHEAP = {"cheap", "budget", "affordable"}


def tokens(text: str | None) -> list[str]:
    return _TOKEN.findall((text or "").lower())


@dataclass
class Bm25:
    """Okapi BM25 over a document collection (k1=1.2, b=0.75)."""

    k1: float = 1.2
    b: float = 0.75
    idf: dict[str, float] = field(default_factory=dict)
    avgdl: float = 1.0

    def fit(self, docs: list[list[str]]) -> Bm25:
        n = len(docs)
        df = Counter(t for d in docs for t in set(d))
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
        self.avgdl = max(1.0, sum(len(d) for d in docs) / max(1, n))
        self._default = math.log(1 + (n + 0.5) / 0.5)
        return self

    def score(self, query: list[str], doc: list[str]) -> float:
        tf = Counter(doc)
        norm = self.k1 * (1 - self.b + self.b * len(doc) / self.avgdl)
        return sum(
            self.idf.get(t, self._default) * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in set(query) if t in tf
        )


def _doc(row: dict[str, Any]) -> list[str]:
    parts = [
        row.get("service_title"),
        row.get("service_category"),
        " ".join(row.get("service_tags") or []),
        row.get("service_description"),
    ]
    return tokens(" ".join(p for p in parts if p))


class LexicalBaseline:
    """BM25-style features + multinomial logistic regression: what word overlap alone achieves."""

    FEATURES = (
        "bm25_doc",
        "bm25_title",
        "bm25_tags",
        "cover_doc",
        "cover_title",
        "cover_tags",
        "district_match",
        "district_asked",
        "price_level",
        "cheap_asked",
        "query_len",
    )

    def __init__(self, labels: list[str], seed: int = 0, class_weight: dict[int, float] | None = None):
        self.labels = labels
        self.seed = seed
        self.bm25 = Bm25()
        #: decision offsets per label (`fit_offsets`), None for the plain argmax
        self.offsets: list[float] | None = None
        #: whether the logistic regression weighs the grades (spec.student.train.classWeights / sampling)
        self.weighted = class_weight is not None
        self.model = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed, class_weight=class_weight)
        )

    def features(self, rows: list[dict[str, Any]]) -> np.ndarray:
        out = []
        for r in rows:
            q = tokens(r["query"])
            doc, title, tags = _doc(r), tokens(r.get("service_title")), tokens(" ".join(r.get("service_tags") or []))
            qs = set(q) or {""}
            district = tokens(r.get("service_district"))
            out.append(
                [
                    self.bm25.score(q, doc),
                    self.bm25.score(q, title),
                    self.bm25.score(q, tags),
                    len(qs & set(doc)) / len(qs),
                    len(qs & set(title)) / len(qs),
                    len(qs & set(tags)) / len(qs),
                    float(bool(district) and all(t in q for t in district)),
                    float(any(w in ("in", "near") for w in q)),
                    float(r.get("service_price_level") or 0),
                    float(bool(_CHEAP & set(q)) or "under" in q),
                    float(len(q)),
                ]
            )
        return np.asarray(out, dtype=np.float64)

    def fit(self, rows: list[dict[str, Any]]) -> LexicalBaseline:
        if not rows:
            raise ValueError("the baseline needs labeled training rows")
        self.bm25.fit([_doc(r) for r in rows])
        y = [self.labels.index(r["label"]) for r in rows]
        if len(set(y)) < 2:
            raise ValueError("the baseline needs at least two distinct labels in its training rows")
        self.model.fit(self.features(rows), y)
        return self

    def predict_proba(self, rows: list[dict[str, Any]]) -> np.ndarray:
        proba = np.zeros((len(rows), len(self.labels)))
        got = self.model.predict_proba(self.features(rows))
        proba[:, self.model.classes_] = got  # classes absent from training keep probability 0
        return proba

    def fit_offsets(self, held_out: list[dict[str, Any]]) -> LexicalBaseline:
        """Decision offsets maximising macro-F1 on `held_out` (rows the model was not fitted on)."""
        y = np.array([self.labels.index(r["label"]) for r in held_out])
        self.offsets = calibration.fit_offsets(self.predict_proba(held_out), y).tolist()
        return self


def baseline_for(
    student: StudentSpec, labels: list[str], rows: list[dict[str, Any]], sft: list[dict[str, Any]] | None = None
) -> LexicalBaseline:
    """The lexical baseline trained the way the student is: its class weighting, and (when the student fits
    decision offsets) offsets fitted on the validation split the student validates on (`data.validation_split`;
    `sft`: the data stage's SFT set, with `validateOn: sftSeed`). It learns from every row the student could:
    with trainingRows and no offsets, the student's validation rows too; with sftSeed, the student's own rows."""
    from kubedistill.stages.data import validation_split

    t = student.train
    mode = "balanced" if t.sampling == "balanced" and t.class_weights == "none" else t.class_weights
    offsets = student.calibration.offsets
    split = offsets or student.validate_on == "sftSeed"
    train, held_out = validation_split(rows, sft, student) if split else (rows, [])
    w = calibration.class_weights(mode, labels, [r["label"] for r in train], t.custom_class_weights)
    baseline = LexicalBaseline(labels, class_weight=None if w is None else dict(enumerate(w.tolist()))).fit(train)
    return baseline.fit_offsets(held_out) if offsets else baseline


def score_student(
    student: Any, rows: list[dict[str, Any]], truth: list[str], labels: list[str]
) -> tuple[dict[str, Any], np.ndarray]:
    """A loaded student's eval metrics as served (its temperature and decision offsets applied), with what
    calibration changed: ECE and macro-F1 of the raw argmax model beside them; and its probabilities as served."""
    raw = student.predict_proba(rows, calibrated=False)
    served = calibration.apply_temperature(raw, student.temperature)
    m = classification_metrics(truth, served, labels, student.offsets)
    before = classification_metrics(truth, raw, labels)
    m["objective"] = student.meta["objective"]
    m["calibration"] = {
        "temperature": student.temperature,
        "offsets": dict(zip(labels, student.offsets or [0.0] * len(labels), strict=True)),
        "ece_before": before["ece"],
        "macro_f1_argmax": before["macro_f1"],
        "reliability_before": before["reliability"],
    }
    return m, served


def check_runtimes(
    student: Any,
    served: np.ndarray,
    onnx: Callable[[str], Any],
    rows: list[dict[str, Any]],
    truth: list[str],
    min_macro_f1: float,
) -> dict[str, dict[str, Any]]:
    """Each runtime the student can be served with, scored on the eval pairs beside torch (the reference, whose
    probabilities as served are `served`): ONNX fp32 passes when no probability differs from torch's by more
    than `export.FP32_TOLERANCE`; ONNX int8 when fp32 passed, it keeps `minMacroF1` and it loses at most 0.5
    macro-F1 points. `onnx(runtime)` loads a scorer of the student's export (KeyError: none exported)."""
    from kubedistill.ml import export
    from kubedistill.stages.data import service_text

    labels = student.labels
    reference = classification_metrics(truth, served, labels, student.offsets)["macro_f1"]
    out: dict[str, dict[str, Any]] = {
        "torch": {"macro_f1": round(reference, 4), "passed": True, "reason": "the reference"}
    }
    queries, services = [r["query"] for r in rows], [service_text(r) for r in rows]
    for runtime in ("onnx", "onnx-int8"):
        try:
            scorer = onnx(runtime)
        except KeyError as e:
            out[runtime] = {"passed": False, "reason": f"not exported: {e.args[0] if e.args else runtime}"}
            continue
        p = scorer.predict_texts(queries, services)
        f1 = classification_metrics(truth, p, labels, student.offsets)["macro_f1"]
        diff = export.max_abs_diff(p, served)
        check: dict[str, Any] = {"macro_f1": round(f1, 4), "max_abs_diff": diff}
        if runtime == "onnx":
            ok = diff <= export.FP32_TOLERANCE
            check.update(
                passed=ok,
                reason=f"largest probability difference to torch {diff:.1e} ({'<=' if ok else '>'} "
                f"{export.FP32_TOLERANCE:.0e})",
            )
        else:
            verdict = export.int8_verdict(reference, f1)
            floor = f1 >= min_macro_f1
            check.update(
                loss_points=verdict["lossPoints"],
                passed=verdict["passed"] and floor and out["onnx"]["passed"],
                reason=verdict["reason"]
                + ("" if floor else f"; below minMacroF1 {min_macro_f1}")
                + ("" if out["onnx"]["passed"] else "; its fp32 graph failed its check"),
            )
        out[runtime] = check
    return out


def stronger_baseline(results: dict[str, dict[str, Any]]) -> str:
    """The lexical baseline a student's gain is measured against: the better of the baseline trained like
    the student and, when that one is weighted, the plain one (a weighting that costs the baseline points
    must not flatter the student)."""
    names = [n for n in ("baseline", "baseline_unweighted") if n in results]
    return max(names, key=lambda n: results[n]["macro_f1"])


def gate(
    candidate: str,
    metrics: dict[str, Any],
    min_macro_f1: float,
    min_gain: float | None = None,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The promotion verdict. Always the absolute floor (`minMacroF1`); for a student with a `baseline`
    (`{"name", "macro_f1", "interval", "resampled"}`: the paired-bootstrap interval of the gain and what it
    resampled, e.g. "65 queries") also the comparison (`minGainOverBaseline`). Passed only when every check
    passed; `checks` keeps each verdict."""
    value = metrics["macro_f1"]
    ok = value >= min_macro_f1
    checks = [
        {
            "rule": "minMacroF1",
            "threshold": min_macro_f1,
            "value": round(value, 4),
            "passed": ok,
            "reason": f"{candidate} macro-F1 {value:.4f} {'>=' if ok else '<'} minMacroF1 {min_macro_f1}",
        }
    ]
    if candidate == "student" and baseline is not None and min_gain is not None:
        gain = value - baseline["macro_f1"]
        ok = gain >= min_gain
        lo, hi = baseline["interval"]
        over = f" over {baseline['resampled']}" if baseline.get("resampled") else ""
        checks.append(
            {
                "rule": "minGainOverBaseline",
                "threshold": min_gain,
                "value": round(gain, 4),
                "passed": ok,
                "baseline": baseline["name"],
                "baseline_macro_f1": round(baseline["macro_f1"], 4),
                "interval": [round(lo, 4), round(hi, 4)],
                **({"resampled": baseline["resampled"]} if over else {}),
                "reason": f"gain over the lexical {baseline['name']} ({baseline['macro_f1']:.4f}) {gain:+.4f}, 90% "
                f"paired-bootstrap interval{over} [{lo:+.4f}, {hi:+.4f}], {'>=' if ok else '<'} "
                f"minGainOverBaseline {min_gain}",
            }
        )
    passed = all(c["passed"] for c in checks)
    return {
        "candidate": candidate,
        "metric": "macro_f1",
        "value": round(value, 4),
        "threshold": min_macro_f1,
        "passed": passed,
        "checks": checks,
        "reason": "; ".join(c["reason"] for c in checks) + f" ({'passed' if passed else 'failed'})",
    }


def comparison(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The served student beside the students trained with the comparison objectives (`student_<objective>`),
    each with its macro-F1 difference to the `ce` student; empty when there is nothing to compare."""
    students = {name: m for name, m in results.items() if name == "student" or name.startswith("student_")}
    if len(students) < 2:
        return []
    ce = next((m["macro_f1"] for m in students.values() if m.get("objective") == "ce"), None)
    return [
        {
            "objective": m["objective"],
            "served": name == "student",
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "auc_ovr": m["auc_ovr"],
            "delta_macro_f1": None if ce is None else round(m["macro_f1"] - ce, 4),
        }
        for name, m in students.items()
    ]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def plot(results: dict[str, dict[str, Any]]) -> bytes:
    """Confusion matrices and per-class F1 of every scored model, as PNG bytes."""
    plt = _pyplot()

    names = list(results)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 3.8))
    for ax, name in zip(axes, names, strict=False):  # the last axis holds the legend
        m = results[name]
        mat = np.array(m["confusion"]["matrix"])
        labels = m["confusion"]["labels"]
        ax.imshow(mat, cmap="Blues")
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: macro-F1 {m['macro_f1']:.3f}", fontsize=10)
    ax = axes[-1]
    labels = results[names[0]]["confusion"]["labels"]
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ax.bar(
            np.arange(len(labels)) + k * width,
            [results[name]["per_class"][lab]["f1"] for lab in labels],
            width,
            label=name,
        )
    ax.set_xticks(np.arange(len(labels)) + width * (len(names) - 1) / 2, labels, rotation=30, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("per-class F1", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def reliability_plot(results: dict[str, dict[str, Any]]) -> bytes:
    """Top-label reliability diagrams (accuracy against confidence per bin) of every scored model; a student's
    panel shows it before (uncalibrated) and after its fitted temperature. PNG bytes."""
    names = list(results)
    fig, axes = _pyplot().subplots(1, len(names), figsize=(3.8 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        m = results[name]
        curves = [("calibrated" if "calibration" in m else "model", m["reliability"], m["ece"])]
        if "calibration" in m:
            cal = m["calibration"]
            curves.insert(0, ("uncalibrated", cal["reliability_before"], cal["ece_before"]))
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for label, bins, ece in curves:
            ax.plot(
                [b["confidence"] for b in bins],
                [b["accuracy"] for b in bins],
                marker="o",
                label=f"{label} ECE {ece:.3f}",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top label)")
        ax.set_ylabel("accuracy")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def run_stage(ctx: StageContext) -> dict[str, Any]:
    """Score every available model on the eval set; write metrics.json and confusion.png; apply the gate."""
    from kubedistill.stages.data import read_dataset, read_sft, training_rows

    labels = ctx.spec.labels
    data = ctx.input("data")
    eval_rows = read_dataset(data.child("eval"))
    if not eval_rows:
        raise ValueError("the data stage's eval set is empty")
    train_rows, source = training_rows(ctx)  # the rows the student learns from
    ctx.log(f"baseline: BM25 features + logistic regression on {len(train_rows)} rows of {source}")
    compared: dict[str, str] = {}  # objective -> the student trained beside the run's student, as the stage wrote it
    if "student-crsd" in ctx.inputs:
        written = ctx.input_manifest("student-crsd").get("outputs") or {}
        compared = {k.removeprefix("model_"): uri for k, uri in written.items() if k.startswith("model_")}
    students = 1 + len(compared) if "student-crsd" in ctx.inputs else 0
    progress = Target.of(ctx.storage, ctx.name).start(1 + students, "models", label="scoring")
    baseline = baseline_for(ctx.spec.student, labels, train_rows, read_sft(ctx))
    truth = [r["label"] for r in eval_rows]
    proba = baseline.predict_proba(eval_rows)
    results = {"baseline": classification_metrics(truth, proba, labels, baseline.offsets)}
    predicted = {"baseline": calibration.decide(proba, baseline.offsets)}
    if baseline.offsets is not None:
        results["baseline"]["offsets"] = dict(zip(labels, baseline.offsets, strict=True))
    if baseline.weighted:  # the plain baseline too: weighting can cost it points, and a gain over it must be seen
        proba = LexicalBaseline(labels).fit(train_rows).predict_proba(eval_rows)
        results["baseline_unweighted"] = classification_metrics(truth, proba, labels)
        predicted["baseline_unweighted"] = calibration.decide(proba)
    progress.update(1)
    if "student-crsd" in ctx.inputs:
        from kubedistill.ml.export import pick_runtime
        from kubedistill.stages.student import load_onnx, load_student

        model_uri = ctx.input("student-crsd").uri("model")
        student = load_student(model_uri, ctx.storage.options)
        if student.labels != labels:
            raise ValueError(f"the student was trained on labels {student.labels}, spec.labels is {labels}")
        results["student"], served = score_student(student, eval_rows, truth, labels)
        predicted["student"] = calibration.decide(served, student.offsets)
        runtimes = check_runtimes(
            student,
            served,
            lambda runtime: load_onnx(model_uri, runtime, ctx.storage.options),
            eval_rows,
            truth,
            ctx.spec.evaluation.min_macro_f1,
        )
        runtime = pick_runtime({r: c["passed"] for r, c in runtimes.items()})
        for r, c in runtimes.items():
            ctx.log(f"runtime {r}: {c['reason']}" + (f" (macro-F1 {c['macro_f1']:.4f})" if "macro_f1" in c else ""))
        ctx.log(f"runtime to serve unless spec.serving.runtime says otherwise: {runtime}")
        progress.update(2)
        for i, (objective, uri) in enumerate(compared.items(), 3):
            other = load_student(uri, ctx.storage.options)
            results[f"student_{objective}"], _ = score_student(other, eval_rows, truth, labels)
            progress.update(i)
    progress.close()
    for name, m in results.items():
        auc = "n/a" if m["auc_ovr"] is None else f"{m['auc_ovr']:.4f}"
        cal = m.get("calibration")
        ece = f"ECE {m['ece']:.4f}" + ("" if cal is None else f" (uncalibrated {cal['ece_before']:.4f})")
        ctx.log(f"{name}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  AUC {auc}  {ece}  (n={m['n']})")
    candidate = "student" if "student" in results else "baseline"
    against = None
    if candidate == "student":
        name = stronger_baseline(results)
        y = np.array([labels.index(t) for t in truth])
        queries = [r["query"] for r in eval_rows]  # a query's pairs are resampled together
        interval = paired_gain_interval(
            y, predicted["student"], predicted[name], len(labels), seed=ctx.spec.student.seed, groups=queries
        )
        against = {
            "name": name,
            "macro_f1": results[name]["macro_f1"],
            "interval": interval,
            "resampled": f"{len(set(queries))} queries",
        }
    ev = ctx.spec.evaluation
    verdict = gate(candidate, results[candidate], ev.min_macro_f1, ev.min_gain_over_baseline, against)
    ctx.log(f"gate: {verdict['reason']}")
    report = {"eval_rows": len(eval_rows), "models": results, "gate": verdict}
    if candidate == "student":
        report["runtimes"] = runtimes
    if table := comparison(results):
        report["comparison"] = table
        ctx.log("objectives: " + ", ".join(f"{c['objective']} macro-F1 {c['macro_f1']:.4f}" for c in table))
    ctx.out.write_json("metrics.json", report)
    ctx.out.write_bytes("confusion.png", plot(results))
    ctx.out.write_bytes("reliability.png", reliability_plot(results))
    summary = {
        f"{n}_{k}": round(m[k], 4) for n, m in results.items() for k in ("accuracy", "macro_f1") if m[k] is not None
    }
    outputs = {
        "metrics": ctx.out.uri("metrics.json"),
        "plot": ctx.out.uri("confusion.png"),
        "reliability": ctx.out.uri("reliability.png"),
    }
    if candidate == "student":
        outputs["model"] = model_uri  # what serving deploys, by version, once the gate passed
        outputs["runtime"] = runtime  # the fastest runtime whose check passed
        if verdict["passed"]:
            promote(ctx, model_uri)
    checked = {"runtimes": runtimes} if candidate == "student" else {}
    return {"metrics": {**summary, "gate": verdict, **checked}, "outputs": outputs}


def promote(ctx: StageContext, model_uri: str) -> None:
    """Record the student version that passed the gate at the run's root (`_PROMOTED.json`): the student
    stage's retention keeps it while a later version fails the gate, since a RayService may still serve it."""
    student = ctx.input_manifest("student-crsd")
    ctx.storage.write_json(
        PROMOTED,
        {
            "stage": "student-crsd",
            "version": student.get("version"),
            "model": model_uri,
            "by": ctx.version,
            "at": now(),
        },
    )
