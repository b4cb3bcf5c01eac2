"""What the quickstart's teacher gets wrong: its annotations against the oracle, the claims of its chains that the
pair's own service fields refute, and what a self-consistency vote does about them.

Reads a finished quickstart run (the classic synthetic world; `quickstart.py` keeps its store and prints where):

- **annotations**: every row the annotate stage wrote (the DPO teacher, greedy, as the student learns them):
  agreement with the oracle's label of the same pair, per grade, and the share whose chain makes a claim the pair
  refutes (`synthetic.refuted`: "does not offer X" when its tags hold X, "it is in D, not D", ...), with the
  agreement of those chains and of the rest;
- **each teacher** (SFT and DPO, from the run's store) on a seeded sample of the log's pairs (`--rows`): greedy
  label accuracy, macro-F1, recall per grade and refuted chains; then self-consistency (Wang et al., 2022): the
  majority label of the greedy answer and `--samples` answers sampled at `--temperature` (a tie keeps the greedy
  label), the cheapest fix a team would try first.

Fairness: the sample is the log's pairs (what annotation labels), never the eval set; nothing is chosen here, so
nothing is tuned on anything; the vote's settings were set before the run (4 samples at 0.7).

    .venv/bin/python benchmarks/teacher_errors.py --store /tmp/kd-quickstart-bench-XXXX/quickstart

Writes `benchmarks/records/teacher_errors.json`.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path
from typing import Any

from sklearn.metrics import f1_score

from kubedistill import benchrecord
from kubedistill.core.stage import must_read_manifest
from kubedistill.core.storage import Storage
from kubedistill.stages.data import read_dataset
from kubedistill.stages.synthetic import refuted_summary
from kubedistill.stages.teacher import fmt, lm


def artifact(run: Storage, stage: str) -> Storage:
    return Storage(must_read_manifest(run, stage)["artifact"])


def scores(truth: list[str], said: list[str | None], labels: list[str]) -> dict[str, Any]:
    """Label accuracy, macro-F1 (an unparsed answer counts as wrong) and recall per grade."""
    shown = [s if s is not None else "(unparsed)" for s in said]
    return {
        "accuracy": sum(t == s for t, s in zip(truth, said, strict=True)) / len(truth),
        "macro_f1": float(f1_score(truth, shown, labels=labels, average="macro", zero_division=0)),
        "recall": {
            g: sum(t == s == g for t, s in zip(truth, said, strict=True)) / max(1, truth.count(g)) for g in labels
        },
    }


def vote(greedy: str | None, samples: list[str | None]) -> str | None:
    """The majority label of the greedy answer and the samples (unparsed ones left out); a tie keeps the greedy
    label when it is among the tied."""
    counts = Counter(x for x in [greedy, *samples] if x is not None)
    if not counts:
        return None
    top = max(counts.values())
    tied = [label for label, n in counts.items() if n == top]
    return greedy if greedy in tied else tied[0]


def teacher(
    run: Storage, stage: str, rows: list[dict[str, Any]], labels: list[str], a: argparse.Namespace
) -> dict[str, Any]:
    model, tok = lm.load(artifact(run, stage).uri("model"), f"{stage} model")
    prompts = [fmt.prompt(r) for r in rows]
    truth = [r["label"] for r in rows]

    def answers(temperature: float, seed: int) -> list[fmt.Parsed | None]:
        out = lm.generate(
            model, tok, prompts, max_new_tokens=a.max_tokens, temperature=temperature, batch_size=300, seed=seed
        )
        return [fmt.try_parse(t, labels) for t in out]

    greedy = answers(0.0, 0)
    said = [p.label if p else None for p in greedy]
    sampled = [[p.label if p else None for p in answers(a.temperature, s)] for s in range(1, a.samples + 1)]
    voted = [vote(g, [s[i] for s in sampled]) for i, g in enumerate(said)]
    answered = [
        {**r, "label": p.label if p else None, "reasoning": p.reasoning if p else ""}
        for r, p in zip(rows, greedy, strict=True)
    ]
    return {
        "greedy": {**scores(truth, said, labels), "parse_rate": sum(p is not None for p in greedy) / len(rows)},
        "chains": refuted_summary(answered, {r["pair_id"]: r["label"] for r in rows}),
        "one_sample": scores(truth, sampled[0], labels),
        "vote": scores(truth, voted, labels),
    }


def students(
    sample: str,
    annotated: list[dict[str, Any]],
    oracle: dict[str, dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    labels: list[str],
    seeds: list[int],
) -> dict[str, Any]:
    """What the refuted chains cost the student: the quickstart's student (its spec.student as shipped, its
    objective, a seed per `seeds`) trained on all the annotations, on the annotations whose chain its pair does
    not refute, and on the oracle's labels of the same rows as the first; each scored on the run's eval set beside
    the lexical baseline trained on the same rows (the evaluate stage's), the gain's interval resampling queries.
    The filter reads the oracle world's phrasing: what a verifier of chains could buy at most, not a stage."""
    import numpy as np
    import torch
    import yaml

    from kubedistill.core import spec
    from kubedistill.ml import calibration
    from kubedistill.ml.metrics import classification_metrics, paired_gain_interval
    from kubedistill.stages.data import split_by_query
    from kubedistill.stages.evaluate import baseline_for
    from kubedistill.stages.student import StudentConfig, build_model, fit, predict_proba
    from kubedistill.stages.synthetic import refuted

    shipped = spec.parse_run(yaml.safe_load(Path(sample).read_text())).spec.student
    arms = {
        "annotations": annotated,
        "unrefuted annotations": [r for r in annotated if not refuted(r["reasoning"], r)],
        "oracle labels": [
            {**r, "label": oracle[r["pair_id"]]["label"], "reasoning": oracle[r["pair_id"]]["reasoning"]}
            for r in annotated
        ],
    }
    truth = [r["label"] for r in eval_rows]
    y = np.array([labels.index(t) for t in truth])
    queries = [r["query"] for r in eval_rows]
    out: dict[str, Any] = {
        "objective": shipped.objective,
        "seeds": seeds,
        "eval_queries": len(set(queries)),
        "arms": {},
    }
    for arm, rows in arms.items():
        runs = []
        for seed in seeds:
            st = shipped.model_copy(update={"seed": seed})
            cfg = StudentConfig(st, labels)
            train, val = split_by_query(rows, st.validation_fraction, seed)
            torch.manual_seed(seed)
            model, tok = build_model(cfg)
            state = fit(cfg, model, tok, train, val)
            model.load_state_dict(state["best_state"])
            probs = predict_proba(model, tok, eval_rows, st.max_length)
            base = baseline_for(st, labels, rows)
            base_probs = base.predict_proba(eval_rows)
            m = classification_metrics(truth, probs, labels)["macro_f1"]
            b = classification_metrics(truth, base_probs, labels, base.offsets)["macro_f1"]
            lo, hi = paired_gain_interval(
                y,
                calibration.decide(probs),
                calibration.decide(base_probs, base.offsets),
                len(labels),
                seed=seed,
                groups=queries,
            )
            runs.append(
                {
                    "seed": seed,
                    "val_macro_f1": state["metrics"]["best_val_macro_f1"],
                    "macro_f1": m,
                    "lexical_macro_f1": b,
                    "gain": m - b,
                    "interval": [lo, hi],
                    "steps": state["step"],
                }
            )
            print(f"{arm} seed {seed}: student {m:.4f} lexical {b:.4f} gain {m - b:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        out["arms"][arm] = {"rows": len(rows), "runs": runs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a finished quickstart run's directory (classic world)")
    ap.add_argument("--rows", type=int, default=600, help="log pairs each teacher answers (a seeded sample)")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers beside the greedy one in the vote")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=96, help="as the quickstart's spec.annotation.maxTokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--students",
        nargs="*",
        type=int,
        default=None,
        metavar="SEED",
        help="also train the quickstart's student on all / unrefuted annotations / the oracle's labels, "
        "once per seed (e.g. --students 0 1 2)",
    )
    ap.add_argument(
        "--sample", default="manifests/samples/quickstart.yaml", help="whose spec.student --students trains"
    )
    ap.add_argument("--labels", nargs="+", default=["irrelevant", "partial", "relevant"], help="the run's spec.labels")
    a = ap.parse_args()
    run = Storage(a.store)
    data = must_read_manifest(run, "data")
    if data["metrics"].get("world") != "classic":
        raise SystemExit(f"{a.store}: not a run on the classic synthetic world (refuted() reads its chains' phrasing)")
    labels = a.labels
    oracle = {r["pair_id"]: r for r in read_dataset(artifact(run, "data").child("labeled"))}

    annotated = read_dataset(artifact(run, "annotate").child("labeled"))
    truth = [oracle[r["pair_id"]]["label"] for r in annotated]
    said = [r["label"] for r in annotated]
    results: dict[str, Any] = {
        "annotations": {
            **scores(truth, said, labels),
            "oracle_labels": dict(Counter(truth)),
            "teacher_labels": dict(Counter(said)),
            "chains": refuted_summary(annotated, {k: r["label"] for k, r in oracle.items()}),
        }
    }
    sample = sorted(oracle.values(), key=lambda r: r["pair_id"])
    random.Random(a.seed).shuffle(sample)
    sample = sample[: a.rows]
    for stage in ("teacher-sft", "teacher-dpo"):
        results[stage] = teacher(run, stage, sample, labels, a)
        g = results[stage]
        print(
            f"{stage}: greedy {g['greedy']['accuracy']:.1%}, refuted chains {g['chains']['share']:.1%}, "
            f"vote {g['vote']['accuracy']:.1%}"
        )

    if a.students:
        eval_rows = read_dataset(artifact(run, "data").child("eval"))
        results["students"] = students(a.sample, annotated, oracle, eval_rows, labels, a.students)
    an = results["annotations"]
    c = an["chains"]
    rows: list[benchrecord.Row] = [
        {
            "what": f"quickstart annotations (the DPO teacher, greedy) whose chain makes a claim the pair's own fields "
            f"refute, of {c['chains']:,} (`teacher_errors.py`)",
            "target": "none (the oracle's chains: 0)",
            "measured": f"{c['share']:.1%} ({c['refuted']:,}); they agree with the oracle on "
            f"{c['agreement_refuted']:.1%}, the rest on {c['agreement_rest']:.1%}; all annotations "
            f"{an['accuracy']:.1%}, relevant recall {an['recall']['relevant']:.1%}; claims: "
            + ", ".join(f"{k} {n}" for k, n in c["claims"].items()),
            "met": "no" if c["refuted"] else "yes",
        }
    ]
    for stage in ("teacher-sft", "teacher-dpo"):
        g = results[stage]
        rows.append(
            {
                "what": f"{stage} on {a.rows} log pairs: greedy vs a vote of greedy + {a.samples} samples at "
                f"{a.temperature} (`teacher_errors.py`)",
                "target": "the vote above greedy (self-consistency)",
                "measured": f"greedy {g['greedy']['accuracy']:.1%} (macro-F1 {g['greedy']['macro_f1']:.3f}, relevant "
                f"recall {g['greedy']['recall']['relevant']:.1%}, refuted chains "
                f"{g['chains']['share']:.1%}); one sample {g['one_sample']['accuracy']:.1%}; vote "
                f"{g['vote']['accuracy']:.1%} (macro-F1 {g['vote']['macro_f1']:.3f})",
                "met": "yes" if g["vote"]["accuracy"] > g["greedy"]["accuracy"] + 0.01 else "no",
            }
        )
    if "students" in results:
        import statistics

        arms = results["students"]["arms"]

        def spread(arm: str, key: str) -> str:
            xs = [r[key] for r in arms[arm]["runs"]]
            return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")

        for arm, got in arms.items():
            gains = ", ".join(f"{r['gain'] * 100:+.1f}" for r in got["runs"])
            rows.append(
                {
                    "what": f"the quickstart's student ({results['students']['objective']}) on {arm} ({got['rows']:,} rows), "
                    f"eval macro-F1 over seeds {a.students} vs the lexical baseline on the same rows "
                    "(`teacher_errors.py --students`)",
                    "target": ">= lexical + 5 points (issue 20)",
                    "measured": f"student {spread(arm, 'macro_f1')}, lexical {spread(arm, 'lexical_macro_f1')}; gain per "
                    f"seed {gains} points",
                    "met": "yes" if all(r["gain"] >= 0.05 for r in got["runs"]) else "no",
                }
            )
    benchrecord.write("teacher_errors", {k: v for k, v in vars(a).items() if k != "store"}, results, rows)


if __name__ == "__main__":
    main()
