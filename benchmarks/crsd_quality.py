"""Eval quality of the student objectives with the same seeds, data and budget: `ce` vs `crsd`.

Trains each objective on the synthetic log (the quickstart's data: oracle labels and reasoning),
early-stops on held-out queries, and scores the best weights on the held-out eval set from the
standard input only. Prints macro-F1 and AUC per seed, their means and the CRSD - CE difference.

    .venv/bin/python benchmarks/crsd_quality.py [--seeds 0 1 2] [--epochs 2] [--variants ce crsd crsd-full]

Every knob that has changed this result is an option (pooling, sampling and class weights included), and
every variant and seed runs in one invocation: the record (`benchmarks/records/crsd_quality[-TAG].json`)
holds the complete `StudentSpec` of each variant, so a rerun with the record's arguments measures the same
models. Defaults are the spec's own (pooling, sampling), except those the quickstart-sized run fixes here.

Variants (kd needs the teacher's label distribution, which the synthetic oracle does not give): ce;
crsd (the spec's defaults: forward-only reasoning view, teacherGrad false); crsd-full (teacherGrad
true: the reasoning view's CE trains the encoder too); crsd-nosg (crsd-full without stop-gradient
in the alignment terms).

Fairness: every variant trains from the same initial weights (the seed), on the same rows, splits and
batches, for the same steps, and is scored on the same eval pairs from the standard input only; the lexical
baseline learns from the same training rows.

`--reasoning` rewrites the training reasoning to test how much its content matters (the eval set is
scored from the standard input, so only training changes): full (the oracle's chain); noverdict (the
concluding phrases removed: "meets every constraint", "unrelated to the query", ...); evidence (only
the restated query intent and service facts, no inference at all); shuffled (another pair's chain:
a control in which the reasoning carries no information about this pair).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time

import torch

from kubedistill import benchrecord
from kubedistill.core.spec import StudentSpec, StudentTrainSpec
from kubedistill.stages import data
from kubedistill.stages.data import split_by_query
from kubedistill.stages.evaluate import LexicalBaseline, classification_metrics
from kubedistill.stages.student import StudentConfig, build_model, fit, predict_proba

LABELS = ["irrelevant", "partial", "relevant"]
VARIANTS = {
    "ce": {"objective": "ce"},
    "crsd": {"objective": "crsd"},  # the spec's defaults: stopGradient true, teacherGrad false
    "crsd-full": {"objective": "crsd", "crsd": {"teacher_grad": True}},
    "crsd-nosg": {"objective": "crsd", "crsd": {"stop_gradient": False, "teacher_grad": True}},
}


_VERDICTS = re.compile(r"( and meets every constraint|; unrelated to the query|; the overlap is misleading)")


def rewrite_reasoning(rows: list[dict], mode: str, seed: int = 0) -> list[dict]:
    """The training rows with their reasoning rewritten by `mode` (see the module docstring)."""
    if mode == "full":
        return rows
    if mode == "shuffled":
        chains = [r["reasoning"] for r in rows]
        random.Random(seed).shuffle(chains)
        return [{**r, "reasoning": c} for r, c in zip(rows, chains)]
    if mode == "noverdict":
        return [{**r, "reasoning": _VERDICTS.sub("", r["reasoning"])} for r in rows]
    if mode == "evidence":
        return [{**r, "reasoning": ". ".join(r["reasoning"].split(". ")[:2]) + "."} for r in rows]
    raise ValueError(f"--reasoning: expected full, noverdict, evidence or shuffled, got {mode!r}")


def train_and_score(student: dict, train: list[dict], val: list[dict], evalset: list[dict]) -> dict:
    """Train a student (`StudentSpec` fields) on `train`, early-stopped on `val`; score its best weights on
    `evalset` from the standard input only."""
    cfg = StudentConfig(StudentSpec.model_validate(student), LABELS)
    torch.manual_seed(cfg.student.seed)
    model, tok = build_model(cfg)
    t0 = time.monotonic()
    state = fit(cfg, model, tok, train, val)
    model.load_state_dict(state["best_state"])
    probs = predict_proba(model, tok, evalset, cfg.student.max_length)
    m = classification_metrics([r["label"] for r in evalset], probs, LABELS)
    return {"macro_f1": m["macro_f1"], "auc": m["auc_ovr"], "accuracy": m["accuracy"], "steps": state["step"],
            "seconds": time.monotonic() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["ce", "crsd"], choices=list(VARIANTS))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-reasoning-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--align-weight", type=float, default=1.0)
    ap.add_argument("--contrast-weight", type=float, default=1.0)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--reasoning", default="full", choices=["full", "noverdict", "evidence", "shuffled"])
    ap.add_argument("--pooling", choices=["mean", "cls"], default=StudentSpec().pooling)
    ap.add_argument("--sampling", choices=["balanced", "shuffle"], default=StudentTrainSpec().sampling)
    ap.add_argument("--class-weights", choices=["none", "balanced"], default=StudentTrainSpec().class_weights)
    ap.add_argument("--tag", default="", help="record name suffix (benchmarks/records/crsd_quality-TAG.json)")
    args = ap.parse_args()

    gen = data.generate(LABELS, 300, args.queries, 6, 1, 400, seed=0)
    train, val = split_by_query(gen.labeled, 0.1, seed=0)
    train, val = rewrite_reasoning(train, args.reasoning), rewrite_reasoning(val, args.reasoning, seed=1)
    print(f"reasoning: {args.reasoning}, e.g. {train[0]['reasoning']!r}")
    truth = [r["label"] for r in gen.eval]
    base = LexicalBaseline(LABELS).fit(train)
    floor = classification_metrics(truth, base.predict_proba(gen.eval), LABELS)
    print(f"data: {len(train)} train / {len(val)} val / {len(gen.eval)} eval pairs; torch threads {torch.get_num_threads()}")
    print(f"lexical baseline: macro-F1 {floor['macro_f1']:.4f}  AUC {floor['auc_ovr']:.4f}")
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            v = VARIANTS[variant]
            crsd = {"temperature": args.temperature, "align_weight": args.align_weight,
                    "contrast_weight": args.contrast_weight, **v.get("crsd", {})}
            student = {
                "base_model": "sentence-transformers/all-MiniLM-L6-v2", "objective": v["objective"], "crsd": crsd,
                "train": {"epochs": args.epochs, "batch_size": args.batch, "learning_rate": args.lr,
                          "sampling": args.sampling, "class_weights": args.class_weights},
                "seed": seed, "patience": 2, "max_length": args.max_length, "pooling": args.pooling,
                "max_reasoning_tokens": args.max_reasoning_tokens}
            m = train_and_score(student, train, val, gen.eval)
            row = {"seed": seed, **m, "student": StudentSpec.model_validate(student).model_dump(mode="json")}
            results[variant].append(row)
            print(f"seed {seed} {variant:<10} macro-F1 {m['macro_f1']:.4f}  AUC {m['auc']:.4f}  "
                  f"acc {m['accuracy']:.4f}  ({m['steps']} steps, {row['seconds']:.0f}s)", flush=True)

    def mean_sd(v: str, k: str) -> str:
        xs = [r[k] for r in results[v]]
        return f"{statistics.mean(xs):.4f} ± {sd(xs):.4f}"

    print("\nvariant     macro-F1 (mean ± sd)   AUC (mean ± sd)")
    for v in args.variants:
        print(f"{v:<10}  {mean_sd(v, 'macro_f1'):<21}  {mean_sd(v, 'auc')}")
    diffs: dict[str, dict] = {}
    if "ce" in results:
        for v in args.variants:
            if v == "ce":
                continue
            d_f1 = [a["macro_f1"] - b["macro_f1"] for a, b in zip(results[v], results["ce"])]
            d_auc = [a["auc"] - b["auc"] for a, b in zip(results[v], results["ce"])]
            diffs[v] = {"macro_f1": d_f1, "auc": d_auc}
            print(f"{v} - ce: macro-F1 {statistics.mean(d_f1):+.4f} (per seed {', '.join(f'{x:+.4f}' for x in d_f1)}), "
                  f"AUC {statistics.mean(d_auc):+.4f}")
    summary = {v: {k: {"mean": statistics.mean(r[k] for r in results[v]), "sd": sd([r[k] for r in results[v]])}
                   for k in ("macro_f1", "auc")} for v in args.variants}
    benchrecord.write("crsd_quality", vars(args),
                      {"data": {"train": len(train), "validation": len(val), "eval": len(gen.eval)},
                       "baseline": {"macro_f1": floor["macro_f1"], "auc": floor["auc_ovr"]},
                       "runs": results, "summary": summary, "minus_ce": diffs},
                      summary_rows(args, summary, diffs, floor["macro_f1"]), tag=args.tag)


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summary_rows(args: argparse.Namespace, summary: dict, diffs: dict, lexical: float) -> list[benchrecord.Row]:
    """One row per non-CE variant: its macro-F1 and AUC difference to CE, per seed."""
    rows: list[benchrecord.Row] = []
    for v, d in diffs.items():
        f1 = d["macro_f1"]
        better = all(x > 0 for x in f1)
        rows.append({
            "what": f"{v} vs CE student quality, oracle data ({args.reasoning} reasoning), {len(f1)} seeds, "
                    f"{args.pooling} pooling, {args.sampling} sampling (`crsd_quality.py`)",
            "target": f"{v} better",
            "measured": f"macro-F1 {statistics.mean(f1):+.4f} (per seed {', '.join(f'{x:+.3f}' for x in f1)}; "
                        f"ce {summary['ce']['macro_f1']['mean']:.3f} ± {summary['ce']['macro_f1']['sd']:.3f}), "
                        f"AUC {statistics.mean(d['auc']):+.4f}; lexical {lexical:.3f}",
            "met": "yes" if better else "no (not better on every seed)"})
    return rows


if __name__ == "__main__":
    main()
