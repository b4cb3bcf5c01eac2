"""Imbalanced grades: class weights, balanced sampling and decision offsets vs the plain student (issue 27).

World: the synthetic log of the quickstart (300 services, 6 candidates per query), oracle labels, its
train / validation / eval pools query-disjoint. Each pool is subsampled, without replacement, to a grade
mix (`--mixes`): `relevant=70,partial=25,irrelevant=5` (the shape of a real product-search log, where
irrelevant is the rare grade), `balanced` (equal parts) and `natural` (the generator's own mix, what the
quickstart trains on). Validation and eval keep the training mix: a log's eval set has its skew.

Arms, all with the quickstart's student settings (MiniLM-L6, mean pooling, CE, max length 64, batch 32,
lr 2e-4) and `--epochs` (early stopping on validation macro-F1, patience 2), the same seed per arm:
- plain: unweighted CE, argmax;
- balanced: `classWeights: balanced`;
- sampling: `sampling: balanced`.
(`--arms` picks among them; every mix runs the same arms.)
Each trained arm is scored twice on eval: its argmax, and with the temperature and decision offsets fitted
on the validation split (`student.calibrate`: the stage's own code; eval never reaches the fit). The lexical
baseline gets the same treatments (weights; offsets on validation). Nothing is tuned on eval.

Fairness: every arm of a mix trains on the same rows from the same seed, with the same budget and
early stopping, and is scored on the same eval pairs; the lexical baseline gets each treatment too.

    .venv/bin/python benchmarks/imbalance.py [--seeds 0 1 2] [--mixes ...] [--tag NAME]

Prints macro-F1, every grade's recall and ECE (mean ± sd over seeds) per mix and arm, and the differences to
plain argmax per seed; writes every number, with the machine, commit and arguments, to
`benchmarks/records/imbalance[-NAME].json` after every mix (a long run that stops keeps what it measured).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import numpy as np

from kubedistill import benchrecord
from kubedistill.core.spec import StudentSpec
from kubedistill.ml.calibration import apply_temperature
from kubedistill.ml.metrics import classification_metrics
from kubedistill.stages import data
from kubedistill.stages.data import split_by_query
from kubedistill.stages.evaluate import LexicalBaseline
from kubedistill.stages.student import StudentConfig, build_model, calibrate, fit, predict_proba

LABELS = ["irrelevant", "partial", "relevant"]


def parse_mix(text: str, pool: list[dict]) -> dict[str, float]:
    """`relevant=70,partial=25,irrelevant=5` (percentages), `balanced` or `natural` → label fractions."""
    if text == "balanced":
        return {lab: 1 / len(LABELS) for lab in LABELS}
    if text == "natural":
        return {lab: sum(r["label"] == lab for r in pool) / len(pool) for lab in LABELS}
    parts = dict(p.split("=") for p in text.split(","))
    if set(parts) != set(LABELS):
        raise SystemExit(f"--mixes {text!r}: name every label of {LABELS}")
    total = sum(float(v) for v in parts.values())
    return {lab: float(parts[lab]) / total for lab in LABELS}


def subsample(rows: list[dict], mix: dict[str, float], seed: int) -> list[dict]:
    """The largest subset of `rows` with the grade fractions `mix` (rows drawn at random, order kept)."""
    by = {lab: [i for i, r in enumerate(rows) if r["label"] == lab] for lab in LABELS}
    n = min(len(by[lab]) / mix[lab] for lab in LABELS if mix[lab] > 0)
    rng = random.Random(seed)
    keep = set()
    for lab in LABELS:
        keep.update(rng.sample(by[lab], round(n * mix[lab])))
    return [r for i, r in enumerate(rows) if i in keep]


def scores(truth: list[str], proba: np.ndarray, offsets: list[float] | None = None) -> dict[str, Any]:
    m = classification_metrics(truth, proba, LABELS, offsets)
    return {
        "macro_f1": m["macro_f1"],
        "accuracy": m["accuracy"],
        "ece": m["ece"],
        "recall": {lab: m["per_class"][lab]["recall"] for lab in LABELS},
        "f1": {lab: m["per_class"][lab]["f1"] for lab in LABELS},
    }


def student_arm(arm: str, args: argparse.Namespace, seed: int, train: list, val: list, evalset: list) -> dict:
    spec = StudentSpec.model_validate(
        {
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "objective": "ce",
            "max_length": 64,
            "seed": seed,
            "patience": 2,
            "train": {
                "epochs": args.epochs,
                "batch_size": 32,
                "learning_rate": 2e-4,
                "class_weights": "balanced" if arm == "balanced" else "none",
                "sampling": "balanced" if arm == "sampling" else "shuffle",
            },
            "calibration": {"temperature": True, "offsets": True},
        }
    )
    cfg = StudentConfig(spec, LABELS)
    model, tok = build_model(cfg)
    t0 = time.monotonic()
    state = fit(cfg, model, tok, train, val)
    model.load_state_dict(state["best_state"])
    cal = calibrate(cfg, model, tok, val)
    raw = predict_proba(model, tok, evalset, cfg.student.max_length)
    truth = [r["label"] for r in evalset]
    offsets = [cal["offsets"][lab] for lab in LABELS]
    return {
        "argmax": scores(truth, raw),
        "calibrated": scores(truth, apply_temperature(raw, cal["temperature"]), offsets),
        "temperature": cal["temperature"],
        "offsets": cal["offsets"],
        "steps": state["step"],
        "seconds": round(time.monotonic() - t0, 1),
    }


def baseline_arm(arm: str, train: list, val: list, evalset: list) -> dict:
    weights = None
    if arm == "balanced":
        from kubedistill.ml.calibration import class_weights

        w = class_weights("balanced", LABELS, [r["label"] for r in train])
        weights = {i: float(x) for i, x in enumerate(w)}
    base = LexicalBaseline(LABELS, class_weight=weights).fit(train).fit_offsets(val)
    truth = [r["label"] for r in evalset]
    proba = base.predict_proba(evalset)
    return {"argmax": scores(truth, proba), "calibrated": scores(truth, proba, base.offsets), "offsets": base.offsets}


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--mixes", nargs="+", default=["relevant=70,partial=25,irrelevant=5", "natural", "balanced"])
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--queries", type=int, default=800, help="log queries (6 pairs each) before subsampling")
    ap.add_argument("--eval-pairs", type=int, default=3000, help="eval pairs before subsampling")
    ap.add_argument("--arms", nargs="+", default=["plain", "balanced", "sampling"],
                    choices=["plain", "balanced", "sampling"], help="plain is the reference; keep it")
    ap.add_argument("--tag", default="", help="record name suffix")
    args = ap.parse_args()

    gen = data.generate(LABELS, 300, args.queries, 6, 1, args.eval_pairs, seed=0)
    train_pool, val_pool = split_by_query(gen.labeled, 0.15, seed=0)
    record: dict[str, Any] = {"mixes": {}}
    print(f"machine: {benchrecord.machine()}")
    for mix_text in args.mixes:
        mix = parse_mix(mix_text, gen.labeled)
        train, val, evalset = (subsample(p, mix, 10 + k) for k, p in enumerate((train_pool, val_pool, gen.eval)))
        counts = {name: {lab: sum(r["label"] == lab for r in rows) for lab in LABELS}
                  for name, rows in (("train", train), ("val", val), ("eval", evalset))}
        print(f"\n== mix {mix_text}: {counts}", flush=True)
        arms = args.arms
        res: dict[str, Any] = {"counts": counts, "baseline": {}, "student": {a: [] for a in arms}}
        for arm in ("plain", "balanced"):
            res["baseline"][arm] = baseline_arm(arm, train, val, evalset)
        for seed in args.seeds:
            for arm in arms:
                r = student_arm(arm, args, seed, train, val, evalset)
                res["student"][arm].append({"seed": seed, **r})
                print(f"seed {seed} {arm:<9} argmax macro-F1 {r['argmax']['macro_f1']:.4f} "
                      f"(recall {r['argmax']['recall']})  +offsets {r['calibrated']['macro_f1']:.4f} "
                      f"(recall {r['calibrated']['recall']})  ECE {r['argmax']['ece']:.3f} -> "
                      f"{r['calibrated']['ece']:.3f}  T {r['temperature']:.2f}  {r['steps']} steps {r['seconds']:.0f}s",
                      flush=True)
        record["mixes"][mix_text] = res
        rare = min(LABELS, key=lambda lab: mix[lab])
        print(f"\nmix {mix_text} (rare grade: {rare})")
        print(f"{'arm':<22}{'macro-F1':<16}{'rare recall':<16}{'ECE':<16}{'Δ macro-F1 vs plain argmax (per seed)'}")
        plain = [r["argmax"]["macro_f1"] for r in res["student"]["plain"]]
        for arm in arms:
            for how in ("argmax", "calibrated"):
                rows = res["student"][arm]
                f1 = [r[how]["macro_f1"] for r in rows]
                delta = ", ".join(f"{a - b:+.3f}" for a, b in zip(f1, plain, strict=True))
                name = f"{arm} {'+ offsets' if how == 'calibrated' else 'argmax'}"
                print(f"{name:<22}{mean_sd(f1):<16}{mean_sd([r[how]['recall'][rare] for r in rows]):<16}"
                      f"{mean_sd([r[how]['ece'] for r in rows]):<16}{delta}")
        for arm, b in res["baseline"].items():
            for how in ("argmax", "calibrated"):
                name = f"lexical {arm} {'+ offsets' if how == 'calibrated' else 'argmax'}"
                print(f"{name:<30}macro-F1 {b[how]['macro_f1']:.3f}  rare recall {b[how]['recall'][rare]:.3f}  "
                      f"ECE {b[how]['ece']:.3f}")
        benchrecord.write("imbalance", vars(args), record, summary_rows(record["mixes"]), tag=args.tag)


def summary_rows(mixes: dict[str, Any]) -> list[benchrecord.Row]:
    """Per mix: balanced sampling against the plain student (argmax), over the seeds. A skewed mix (a grade
    under 15%) is judged on its rare grade; any other on what balanced sampling costs."""
    rows: list[benchrecord.Row] = []
    for mix_text, res in mixes.items():
        if "sampling" not in res["student"]:
            continue
        counts = res["counts"]["train"]
        rare = min(LABELS, key=lambda lab: counts[lab])
        skewed = counts[rare] / sum(counts.values()) < 0.15
        plain, samp = res["student"]["plain"], res["student"]["sampling"]
        f1p, f1s = [r["argmax"]["macro_f1"] for r in plain], [r["argmax"]["macro_f1"] for r in samp]
        deltas = [a - b for a, b in zip(f1s, f1p, strict=True)]
        recall = [r["argmax"]["recall"][rare] for r in samp]
        lexical = res["baseline"]["plain"]["argmax"]["macro_f1"]
        shape = "/".join(f"{100 * counts[lab] / sum(counts.values()):.0f}" for lab in reversed(LABELS))
        what = (f"imbalanced grades, {mix_text} ({shape} % relevant/partial/irrelevant): balanced sampling vs the "
                f"plain student, {len(deltas)} seeds (`imbalance.py`)")
        measured = (f"macro-F1 {mean_sd(f1p)} → {mean_sd(f1s)} ({statistics.mean(deltas):+.3f}; "
                    f"{sum(d > 0 for d in deltas)}/{len(deltas)} seeds up); lexical {lexical:.3f}")
        if skewed:
            rp = [r["argmax"]["recall"][rare] for r in plain]
            measured = f"{rare} recall {statistics.mean(rp):.2f} → {statistics.mean(recall):.2f}; " + measured
            met = statistics.mean(recall) >= 0.5 and statistics.mean(deltas) >= 0.05
            rows.append({"what": what, "target": "rare recall >= 0.5, macro-F1 >= +5 points", "measured": measured,
                         "met": "yes" if met else "no"})
        else:
            rows.append({"what": what, "target": "<= 1 point lost", "measured": measured,
                         "met": "yes" if statistics.mean(deltas) >= -0.01 else "no"})
    return rows


if __name__ == "__main__":
    main()
