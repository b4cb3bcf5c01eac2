"""The run report: one self-contained HTML page, built from what the stages wrote to storage.

Everything on the page comes from the run's storage: each stage's manifest (`_SUCCESS.json`: metrics,
config hash, input digests, artifact) or failure (`_FAILED.json`), the run's status, the evaluate
stage's `metrics.json` and the two plots (embedded, so the page can be mailed or attached to a
ticket). Sections: stages, the evaluation gate and every scored model (the objectives compared
when the student stage trained comparison objectives), the teacher, annotation, pruning, serving,
every stage's metrics, and lineage (which artifact came from which stage, config hash and inputs).

`write` puts it at `<storage.uri>/<run>/report.html`; `kubedistill run` writes it when a run ends
(succeeded or failed) and `kubedistill report FILE` writes it on demand.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable
from typing import Any

from kubedistill.core import driverlog
from kubedistill.core.spec import RunStatus, to_wire
from kubedistill.core.stage import FAILURE, now, read_manifest
from kubedistill.core.storage import Storage

REPORT_FILE = "report.html"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#1d232a;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.n{text-align:right;font-variant-numeric:tabular-nums} code{font-size:.92em}
.ok{color:#1a7f37;font-weight:600} .bad{color:#cf222e;font-weight:600} .muted{color:#656d76}
img{max-width:100%;border:1px solid #d0d7de;margin:.5em 0} details{margin:.3em 0}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return _e(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return _e(v)


def _table(header: list[str], rows: Iterable[list[Any]], raw: bool = False) -> str:
    """A table; cells are escaped unless `raw` (then they are trusted HTML made here)."""
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for v in row:
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f"<td class='n'>{_fmt(v)}</td>" if num else f"<td>{v if raw else _fmt(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested metrics as (dotted key, scalar) pairs; lists of scalars are shown as they are."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(flatten(v, key + "."))
        elif isinstance(v, list):
            out.append(
                (
                    key,
                    ", ".join(_fmt(x) for x in v) if all(not isinstance(x, (dict, list)) for x in v) else json.dumps(v),
                )
            )
        else:
            out.append((key, v))
    return out


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) and not isinstance(v, bool) else _e(v)


def _signed_pct(v: Any) -> str:
    return f"{v:+.1f}%" if isinstance(v, (int, float)) else "n/a"


def _image(storage: Storage, path: str, alt: str) -> str:
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return f"<p class='muted'>({_e(path)} not found)</p>"
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"


def _read(storage: Storage, path: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(path)
    except FileNotFoundError:
        return None


def _version(storage: Storage, manifest: dict[str, Any]) -> Storage:
    """The outputs of a stage: the version its manifest names."""
    return Storage(manifest["artifact"], storage.options)


def collect(storage: Storage, stages: list[str]) -> dict[str, dict[str, Any]]:
    """Per stage: its manifest or failure record (whichever exists) and its kept driver logs, newest first."""
    return {
        s: {
            "manifest": read_manifest(storage, s),
            "failure": _read(storage, f"{s}/{FAILURE}"),
            "logs": driverlog.stage_logs(storage, s),
        }
        for s in stages
    }


def _section_stages(status: dict[str, Any] | None, found: dict[str, dict[str, Any]]) -> str:
    by_name = {s["name"]: s for s in (status or {}).get("stages", [])}
    rows = []
    for name, f in found.items():
        st = by_name.get(name, {})
        m, fail = f["manifest"], f["failure"]
        phase = st.get("phase") or ("Succeeded" if m else "Failed" if fail else "Pending")
        cls = {"Succeeded": "ok", "Failed": "bad"}.get(phase, "muted")
        note = st.get("message") or (fail["error"] if fail and not m else "")
        # relative links: the report sits at the run's root, beside the stages' prefixes
        logs = " ".join(
            f"<a href='{_e(name)}/{driverlog.LOGS_DIR}/{_e(log)}'>{'latest' if i == 0 else i + 1}</a>"
            for i, log in enumerate(f.get("logs", [])[:3])
        )
        rows.append(
            [
                _e(name),
                f"<span class='{cls}'>{_e(phase)}</span>",
                _fmt(m["seconds"]) if m else "",
                _e(m["finishedAt"] if m else st.get("finishedAt") or ""),
                logs,
                _e(note),
            ]
        )
    return "<h2>Stages</h2>" + _table(["stage", "phase", "seconds", "finished", "driver log", "note"], rows, raw=True)


def _baseline_name(name: str, models: dict[str, Any]) -> str:
    if name == "baseline_unweighted":
        return "the same, unweighted"
    if name != "baseline":
        return ""
    return "lexical BM25 + logistic regression" + (
        " (weighted like the student)" if "baseline_unweighted" in models else ""
    )


def _headline(found: dict[str, dict[str, Any]]) -> str:
    """The report's first line: the run's student against the lexical baseline on held-out pairs, the gain's
    interval, and whether the gate passed (nothing when the run has not compared them)."""
    m = found.get("evaluate", {}).get("manifest")
    checks = (m or {}).get("metrics", {}).get("gate", {}).get("checks") or []
    vs = next((c for c in checks if c["rule"] == "minGainOverBaseline"), None)
    floor = next((c for c in checks if c["rule"] == "minMacroF1"), None)
    if m is None or vs is None or floor is None:
        return ""
    lo, hi = vs["interval"]
    over = f" over {vs['resampled']}" if vs.get("resampled") else ""
    passed = m["metrics"]["gate"]["passed"]
    return (
        f"<p class='{'ok' if passed else 'bad'}'><b>The student scores macro-F1 {floor['value']:.3f} on held-out pairs, "
        f"the lexical baseline {vs['baseline_macro_f1']:.3f}: {vs['value'] * 100:+.1f} points</b> (90% paired-bootstrap "
        f"interval{over} {lo * 100:+.1f} to {hi * 100:+.1f}); the gate {'passed' if passed else 'did not pass'}.</p>"
    )


def _section_evaluation(storage: Storage, found: dict[str, dict[str, Any]]) -> str:
    m = found.get("evaluate", {}).get("manifest")
    if not m:
        return ""
    out = ["<h2>Evaluation</h2>"]
    gate = m["metrics"]["gate"]
    cls = "ok" if gate["passed"] else "bad"
    out.append(
        f"<p>Gate (<code>evaluation.minMacroF1</code> {gate['threshold']}): "
        f"<span class='{cls}'>{'passed' if gate['passed'] else 'not passed'}</span> — {_e(gate['reason'])}</p>"
    )
    if checks := gate.get("checks"):  # each rule's own verdict (a manifest from before checks has only the above)
        items = "".join(
            f"<li><code>evaluation.{_e(c['rule'])}</code> {c['threshold']}: "
            f"<span class='{'ok' if c['passed'] else 'bad'}'>{'passed' if c['passed'] else 'failed'}</span> — "
            f"{_e(c['reason'])}</li>"
            for c in checks
        )
        out.append(f"<ul>{items}</ul>")
    detail = _read(_version(storage, m), "metrics.json") or {}  # the version the manifest names
    models = detail.get("models", {})
    if models:
        rows = [
            [
                _e(name),
                _e(r.get("objective", _baseline_name(name, models))),
                r["accuracy"],
                r["macro_f1"],
                r["auc_ovr"] if r["auc_ovr"] is not None else "n/a",
                r["ece"] if r.get("ece") is not None else "n/a",
                r["n"],
            ]
            for name, r in models.items()
        ]
        out.append(f"<p>{_fmt(detail.get('eval_rows'))} held-out eval pairs, standard input only.</p>")
        student = (found.get("student-crsd", {}).get("manifest") or {}).get("metrics") or {}
        if rows_from := student.get("rows_from"):  # spec.student.trainOn: human labels, teacher annotations, or both
            names = {"annotations": "teacher annotations", "labels": "labeled pairs"}
            said = " and ".join(f"{_fmt(n)} {_e(names.get(src, src))}" for src, n in rows_from.items())
            if "rows_rationalized" in student:  # spec.annotation.mode: rationalize
                said += (
                    f"; {_fmt(student['rows_rationalized'])} labeled pairs carried the annotating model's reasoning"
                    + (
                        f", {_fmt(student['rows_unexplained_left_out'])} it disagreed with were left out"
                        if student.get("rows_unexplained_left_out")
                        else ""
                    )
                )
            out.append(f"<p>The student and the baseline learned from {said} (<code>student.trainOn</code>).</p>")
        out.append(
            _table(["model", "objective", "accuracy", "macro-F1", "AUC (one-vs-rest)", "ECE", "pairs"], rows, raw=True)
        )
        out.append(_calibration(models))
    comparison = detail.get("comparison")
    if comparison:
        trained = (found.get("student-crsd", {}).get("manifest") or {}).get("metrics", {})
        selected = trained.get("selected") or {"by": "objective"}
        chosen = (
            "the best validation macro-F1 (<code>student.select: validation</code>)"
            if selected["by"] == "validation"
            else "the one trained with <code>student.objective</code>"
        )
        out.append(
            "<h3>Objectives compared</h3><p>Students trained on the same rows, seed and budget with each objective "
            f"(<code>student.compareObjectives</code>); the gate judges, and serving takes, the run's student: {chosen}. "
            "Eval scores each once, after the choice."
            + (f" Validation: {_e(trained['validated_on'])}." if trained.get("validated_on") else "")
            + "</p>"
        )
        per_objective = {trained.get("objective"): trained, **trained.get("compared", {})}
        rows = [
            [
                _e(c["objective"]) + (" (the run's student)" if c["served"] else ""),
                per_objective.get(c["objective"], {}).get("best_val_macro_f1") or "—",
                c["macro_f1"],
                c["auc_ovr"] if c["auc_ovr"] is not None else "n/a",
                c["accuracy"],
                per_objective.get(c["objective"], {}).get("seconds_per_step") or "—",
                "—" if c["delta_macro_f1"] is None else f"{c['delta_macro_f1']:+.4f}",
            ]
            for c in comparison
        ]
        header = ["objective", "validation macro-F1", "macro-F1", "AUC", "accuracy", "s / step", "macro-F1 vs ce"]
        out.append(_table(header, rows, raw=True))
    out.append(_image(_version(storage, m), "confusion.png", "confusion matrices"))
    out.append(_image(_version(storage, m), "reliability.png", "reliability diagrams"))
    return "".join(out)


def _calibration(models: dict[str, Any]) -> str:
    """What calibration did to the student (ECE, the offsets' effect on macro-F1), and every grade a model
    never predicts although the eval set holds it (the symptom of imbalanced training data)."""
    out = []
    cal = models.get("student", {}).get("calibration")
    if cal:
        offsets = {k: v for k, v in cal["offsets"].items() if v}
        said = (
            f"decision offsets {', '.join(f'{_e(k)} {v:+g}' for k, v in offsets.items())} moved macro-F1 from "
            f"{cal['macro_f1_argmax']:.4f} (argmax) to {models['student']['macro_f1']:.4f}"
            if offsets
            else "no decision offsets (labels are the argmax)"
        )
        out.append(
            f"<p>Student calibration (<code>student.calibration</code>, fitted on the validation split): temperature "
            f"{cal['temperature']:.3f} took the expected calibration error from {cal['ece_before']:.4f} to "
            f"{models['student']['ece']:.4f}; {said}.</p>"
        )
    for name, r in models.items():
        never = [lab for lab, c in r.get("per_class", {}).items() if c["support"] and not c["recall"]]
        if never:
            out.append(
                f"<p class='bad'>{_e(name)} never predicts {', '.join(_e(x) for x in never)} although the eval set "
                "holds it: with imbalanced grades, try <code>student.train.classWeights: balanced</code> and "
                "<code>student.calibration.offsets: true</code>.</p>"
            )
    return "".join(out)


def _section_teacher(found: dict[str, dict[str, Any]]) -> str:
    rows = []
    if m := found.get("teacher-dapt", {}).get("manifest"):
        x = m["metrics"]
        rows.append(
            [
                "teacher-dapt",
                f"held-out perplexity {_fmt(x.get('perplexity_before'))} → {_fmt(x.get('perplexity_after'))}",
            ]
        )
    if m := found.get("teacher-sft", {}).get("manifest"):
        ev = m["metrics"].get("eval", {})
        rows.append(
            [
                "teacher-sft",
                f"eval prompts: parse rate {_fmt(ev.get('parse_rate'))}, label accuracy {_fmt(ev.get('label_accuracy'))}",
            ]
        )
    if m := found.get("reward-model", {}).get("manifest"):
        x = m["metrics"]
        dims = ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in (x.get("pairwise_accuracy") or {}).items())
        own = x.get("own_answers_accuracy")
        rows.append(
            [
                "reward-model",
                f"held-out pairwise accuracy: {dims}; combined {_fmt(x.get('combined_pairwise_accuracy'))}"
                + (f"; on the teacher's own answers (held-out queries) {_fmt(own)}" if own is not None else ""),
            ]
        )
    if m := found.get("teacher-dpo", {}).get("manifest"):
        x = m["metrics"]
        b, a = x.get("before", {}), x.get("after", {})
        text = (
            f"mean reward {_fmt(b.get('mean_reward'))} → {_fmt(a.get('mean_reward'))}, label accuracy "
            f"{_fmt(b.get('label_accuracy'))} → {_fmt(a.get('label_accuracy'))}, parse rate {_fmt(b.get('parse_rate'))} → {_fmt(a.get('parse_rate'))}"
        )
        if (auc := b.get("reward_auc")) is not None:
            text += (
                f". The reward ranks the SFT teacher's right answers over its wrong ones with AUC {auc:.2f} (0.5 is "
                f"chance){' — it cannot judge this teacher, and DPO by reward learns little but noise' if auc < 0.6 else ''}"
            )
        if truth := x.get("preference_truth"):
            text += f"; the chosen response of DPO's {_fmt(x.get('preference_pairs'))} pairs gives the prompt's label in {truth['chosen_right']:.0%}, the rejected in {truth['rejected_right']:.0%}"
        rows.append(["teacher-dpo", text])
    return "<h2>Teacher</h2>" + _table(["stage", "result"], rows, raw=True) if rows else ""


def _section_rationalize(found: dict[str, dict[str, Any]]) -> str:
    m = found.get("rationalize", {}).get("manifest")
    if not m:
        return ""
    x = m["metrics"]
    agree = x["agreement_with_labels"]
    reasons = ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in (x.get("quarantine_reasons") or {}).items()) or "none"
    return (
        "<h2>Rationalization</h2>"
        f"<p>The annotating model was asked why each of {_fmt(x['rows_in'])} labeled pairs has its label "
        f"(<code>annotation.mode</code>). Its own label agreed on {_pct(agree['rate'])} of the "
        f"{_fmt(agree['answered'])} it answered: {_fmt(x['labeled'])} pairs carry its reasoning. "
        f"Quarantined because: {reasons}.</p>"
    )


def _section_annotate(found: dict[str, dict[str, Any]]) -> str:
    m = found.get("annotate", {}).get("manifest")
    if not m:
        return ""
    x = m["metrics"]
    rows = [
        [k, x[k]]
        for k in (
            "rows_in",
            "labeled",
            "quarantined",
            "parse_rate",
            "parse_rate_first_try",
            "engine",
            "generated_tokens",
            "tokens_per_s",
            "tokens_per_s_after_startup",
            "rows_per_s",
        )
        if k in x
    ]
    labels = ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in (x.get("labels") or {}).items())
    reasons = ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in (x.get("quarantine_reasons") or {}).items()) or "none"
    agree = x.get("agreement_with_reference")
    said = ""
    if agree:
        worst = sorted(agree.get("disagreements", {}).items(), key=lambda kv: -kv[1])
        off = ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in worst) or "none"
        said = (
            f"<p>The teacher agrees with the data stage's reference labels on {_pct(agree['accuracy'])} of "
            f"{_fmt(agree['pairs'])} pairs (reference → teacher disagreements: {off}).</p>"
        )
        if ref := agree.get("refuted_chains"):
            kinds = ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in ref["claims"].items())
            said += (
                f"<p>{_pct(ref['share'])} of its chains ({_fmt(ref['refuted'])} of {_fmt(ref['chains'])}) make a claim "
                f"the pair's own service fields refute ({kinds or 'none'}); they agree with the reference on "
                f"{_pct(ref['agreement_refuted'])}, the other chains on {_pct(ref['agreement_rest'])}."
                + (f" For example: <code>{_e(ref['example'])}</code>" if ref["example"] else "")
                + "</p>"
            )
    if v := x.get("votes"):
        said += (
            f"<p>Votes (<code>annotation.votes</code>): the teacher answered each labeled pair "
            f"{v['sampled'] / max(1, x['labeled']):.3g} more time(s); {_pct(v['parse_rate'])} of the votes "
            f"parsed. Every parsed vote gave the annotation's label on {_pct(v['unanimous'])} of the pairs; the "
            f"largest label share averages {_pct(v['mean_top_share'])}. A pair's shares are its "
            "<code>label_probs</code>, what student objective kd learns.</p>"
        )
    return (
        "<h2>Annotation</h2>"
        + _table(["metric", "value"], rows)
        + f"<p>Labels: {labels}. Quarantined because: {reasons}.</p>"
        + (f"<p><strong>{_e(x['advice'])}</strong></p>" if x.get("advice") else "")
        + said
    )


def _section_pruning(storage: Storage, found: dict[str, dict[str, Any]]) -> str:
    m = found.get("prune-search", {}).get("manifest")
    if not m:
        return ""
    x = m["metrics"]
    rows = []
    for name in ("base", "uniform", "searched"):
        r = x.get(name) or {}
        rows.append(
            [
                name,
                r.get("params", ""),
                r.get("removed_fraction", 0.0 if name == "base" else ""),
                r.get("perplexity", ""),
                r.get("label_accuracy", ""),
            ]
        )
    p = x.get("predictor", {})
    fit = (
        f"on {_fmt(p.get('n_test'))} architectures out of fold: R² {_fmt(p.get('r2'))}, Kendall τ "
        f"{_fmt(p.get('kendall_tau'))}"
        if p.get("r2") is not None
        else _e(p.get("fit") or "no fit reported")
    )
    return (
        "<h2>Pruning</h2>" + f"<p>Target: remove {_pct(x.get('target_ratio'))} of the teacher's parameters, objective "
        f"{_e(x.get('objective'))}; {_fmt(x.get('evaluated'))} architectures evaluated for real "
        f"({_fmt(x.get('sampled'))} sampled, {_fmt(x.get('proposed'))} proposed by the predictor). Searched vs uniform "
        f"perplexity: {_signed_pct(x.get('perplexity_vs_uniform_pct'))}. Predictor ({_e(p.get('kind'))}) {fit}.</p>"
        + _table(["model (the search's prompts)", "parameters", "removed", "perplexity", "label accuracy"], rows)
        + _pruning_held_out(x.get("held_out"), x.get("recovery") or {})
        + _image(_version(storage, m), "predicted_vs_measured.png", "predicted vs measured")
    )


def _pruning_held_out(held: dict[str, Any] | None, recovery: dict[str, Any]) -> str:
    """Base and each pruned model before and after recovery, on prompts the search never saw."""
    if not held:
        return ""
    rows = [
        [
            "base",
            "",
            _fmt(held["base"].get("label_accuracy")),
            _fmt(held["base"].get("perplexity")),
            _fmt(held["base"].get("generated_tokens_per_s")),
        ]
    ]
    for name in ("searched", "uniform"):
        for when in ("pruned", "recovered"):
            r = (held.get(name) or {}).get(when)
            if r:
                rows.append(
                    [
                        name,
                        when,
                        _fmt(r.get("label_accuracy")),
                        _fmt(r.get("perplexity")),
                        _fmt(r.get("generated_tokens_per_s")),
                    ]
                )
    budget = (
        f"Recovery: LoRA rank {_fmt(recovery.get('rank'))} on every projection, {_fmt(recovery.get('steps'))} steps "
        "on the SFT set, the same for both models."
        if recovery.get("enabled")
        else "Recovery off (spec.pruning.recovery.enabled): the pruned weights as they are."
    )
    where = "prompts the search never saw" if held.get("disjoint_from_search") else "the search's own prompts"
    return f"<p>On {_fmt(held.get('prompts'))} held-out eval prompts ({where}). {budget}</p>" + _table(
        ["model", "", "label accuracy", "perplexity", "generated tokens/s"], rows
    )


def _section_serve(found: dict[str, dict[str, Any]]) -> str:
    m = found.get("serve", {}).get("manifest")
    if not m:
        return ""
    o = m["outputs"]
    return (
        f"<h2>Serving</h2><p>Model <code>{_e(o.get('modelVersion'))}</code> from <code>{_e(o.get('model'))}</code> "
        f"at <code>{_e(o.get('url'))}</code> (probe {_fmt(m['metrics'].get('probeLatencyMs'))} ms).</p>"
    )


def _section_metrics(found: dict[str, dict[str, Any]]) -> str:
    out = ["<h2>Every stage's metrics</h2>"]
    for name, f in found.items():
        if f["manifest"]:
            rows = [[k, v] for k, v in flatten(f["manifest"]["metrics"])]
            out.append(
                f"<details><summary><b>{_e(name)}</b> ({len(rows)} values)</summary>{_table(['metric', 'value'], rows)}</details>"
            )
        elif f["failure"]:
            out.append(
                f"<details open><summary><b>{_e(name)}</b> <span class='bad'>failed</span></summary>"
                f"<pre>{_e(f['failure'].get('traceback') or f['failure']['error'])}</pre></details>"
            )
    return "".join(out)


def _section_lineage(found: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, f in found.items():
        m = f["manifest"]
        if not m:
            continue
        inputs = "<br>".join(f"{_e(k)} @ <code>{_e(v)}</code>" for k, v in m["inputs"].items()) or "—"
        outputs = (
            "<br>".join(f"{_e(k)}: <code>{_e(v)}</code>" for k, v in m["outputs"].items() if isinstance(v, str))
            or f"<code>{_e(m['artifact'])}</code>"
        )
        rows.append(
            [_e(name), f"<code>{_e(m['configHash'])}</code>", f"<code>{_e(m['digest'])}</code>", inputs, outputs]
        )
    if not rows:
        return ""
    return (
        "<h2>Lineage</h2><p>Each stage's config hash (its resolved spec section and inputs), the digest of its "
        "manifest, the manifests it was built from (stage @ digest), and what it wrote.</p>"
        + _table(["stage", "config hash", "digest", "built from", "artifacts"], rows, raw=True)
    )


def render(run: str, uri: str, stages: list[str], storage: Storage, status: dict[str, Any] | None = None) -> str:
    """The report's HTML for `stages` (in pipeline order) of the run stored at `storage`."""
    found = collect(storage, stages)
    phase = (status or {}).get("phase") or ("Succeeded" if all(f["manifest"] for f in found.values()) else "Incomplete")
    cls = {"Succeeded": "ok", "Failed": "bad"}.get(phase, "muted")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>kubedistill run {_e(run)}</title><style>{_CSS}</style></head><body>",
        f"<h1>DistillationRun <code>{_e(run)}</code></h1>",
        f"<p><span class='{cls}'>{_e(phase)}</span> · storage <code>{_e(uri)}</code> · report written {_e(now())}</p>",
        _headline(found),
        _section_stages(status, found),
        _section_evaluation(storage, found),
        _section_teacher(found),
        _section_annotate(found),
        _section_rationalize(found),
        _section_pruning(storage, found),
        _section_serve(found),
        _section_metrics(found),
        _section_lineage(found),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write(storage: Storage, run: str, stages: list[str], status: RunStatus | dict[str, Any] | None = None) -> str:
    """Render and store the report at `<run storage>/report.html`; returns its URI."""
    wire = to_wire(status) if isinstance(status, RunStatus) else status
    storage.write_bytes(REPORT_FILE, render(run, storage.uri(), stages, storage, wire).encode())
    return storage.uri(REPORT_FILE)
