"""The quickstart student's training settings, chosen again on true-label validation, and what the switch to
`validateOn: sftSeed` owes to its validation labels and to its extra training rows.

Reads finished quickstart runs that validated on the SFT set (`quickstart.py --validate-on sftSeed`, each store
kept and printed), and trains the sample's student in-process on each run's own splits (the student stage's
`splits/train` and `splits/val`: every annotated log pair, and held-out SFT queries with their true labels), once
per arm, with the run's student seed (given beside each store). An arm overrides `spec.student.train` (`batchSize=16,learningRate=2e-4`)
and may train on `rows=trainingRows`: the 90% of the log's queries that `validateOn: trainingRows` keeps (its
split, its seed), still validated on the SFT queries, which separates the two changes of that switch.

Fairness: the pick is the arm with the best mean validation macro-F1 over the runs (true labels, queries disjoint
from the eval set's); the eval set scores every arm once after training and only reports. The lexical baseline is
each run's own (its evaluate stage, trained on every annotated pair). The shipped arm is the stage's student trained
again, and the record says whether it reproduced the stage's validation score (`reproduces_stage`).

    .venv/bin/python benchmarks/student_settings.py /tmp/kd-quickstart-bench-XXXX/quickstart:0 [...] \
        --arm bs16-lr2e-4=batchSize=16,learningRate=2e-4 --arm rows90=rows=trainingRows

`--objective kd` trains the KD student on the vote shares the run's annotate stage wrote (`annotation.votes`), and
an arm may set its softmax temperature (`kdTemperature=1`). `--tag T` writes `student_settings-T.json`.

Writes `benchmarks/records/student_settings.json`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from kubedistill import benchrecord
from kubedistill.core.stage import must_read_manifest
from kubedistill.core.storage import Storage

SAMPLE = Path(__file__).resolve().parent.parent / "manifests/samples/quickstart.yaml"
TRAIN_KEYS = {"batchSize": ("batch_size", int), "learningRate": ("learning_rate", float), "epochs": ("epochs", float)}
#: arm keys that override `spec.student` itself, not its `train`
STUDENT_KEYS = {"kdTemperature": ("kd_temperature", float)}
STUDENT_FIELDS = {field for field, _ in STUDENT_KEYS.values()}
ARM_KEYS = {**TRAIN_KEYS, **STUDENT_KEYS}


def parse_arm(text: str) -> tuple[str, dict[str, Any], str]:
    """`name=key=value,key=value` -> (name, overrides by spec field name, rows): spec.student.train's (batchSize,
    learningRate, epochs) and spec.student's own (kdTemperature)."""
    name, _, body = text.partition("=")
    if not name or not body:
        raise SystemExit(f"--arm {text!r}: expected NAME=key=value[,key=value]")
    train: dict[str, Any] = {}
    rows = "all"
    for item in body.split(","):
        key, _, value = item.partition("=")
        if key == "rows" and value in ("all", "trainingRows"):
            rows = value
        elif key in ARM_KEYS:
            field, kind = ARM_KEYS[key]
            train[field] = kind(value)
        else:
            raise SystemExit(
                f"--arm {text!r}: {key!r} is not one of {[*ARM_KEYS, 'rows']} (rows: all or "
                "trainingRows)"
            )
    return name, train, rows


def one_run(
    store: str, seed: int, shipped: Any, arms: list[tuple[str, dict[str, Any], str]], objective: str
) -> dict[str, Any]:
    """Every arm trained on one finished run's splits (`shipped`: the sample's parsed spec)."""
    import torch

    from kubedistill.ml.metrics import classification_metrics
    from kubedistill.stages.data import read_dataset, validation_split
    from kubedistill.stages.student import StudentConfig, build_model, fit, predict_proba

    st = Storage(store)
    student = must_read_manifest(st, "student-crsd")
    if "sftSeed" not in str(student["metrics"].get("validated_on")):
        raise SystemExit(f"{store}: its students validated on {student['metrics'].get('validated_on')!r}, not sftSeed")
    data = must_read_manifest(st, "data")
    splits = Storage(student["artifact"])
    every, val = read_dataset(splits.child("splits/train")), read_dataset(splits.child("splits/val"))
    eval_rows = read_dataset(Storage(data["artifact"]).child("eval"))
    lexical = must_read_manifest(st, "evaluate")["metrics"]["baseline_macro_f1"]
    labels = shipped.labels
    truth = [r["label"] for r in eval_rows]
    out: dict[str, Any] = {"store": store, "seed": seed, "lexical_macro_f1": lexical, "arms": {}}
    for name, overrides, rows in arms:
        train = {k: v for k, v in overrides.items() if k not in STUDENT_FIELDS}
        own = {k: v for k, v in overrides.items() if k in STUDENT_FIELDS}
        stu = shipped.student.model_copy(
            update={"seed": seed, "objective": objective, "train": shipped.student.train.model_copy(update=train), **own}
        )
        cfg = StudentConfig(stu, labels)
        if rows == "trainingRows":  # the rows that split trains on: the stage's own rule, not a copy of it
            trains = validation_split(every, None, stu.model_copy(update={"validate_on": "trainingRows"}))[0]
        else:
            trains = every
        rounds: list[list[float]] = []
        torch.manual_seed(seed)
        model, tok = build_model(cfg)
        started = time.perf_counter()
        state = fit(
            cfg,
            model,
            tok,
            trains,
            val,
            on_round=lambda r, rounds=rounds: rounds.append([r.metrics["step"], r.metrics["val_macro_f1"]]),
        )
        seconds = time.perf_counter() - started
        model.load_state_dict(state["best_state"])
        f1 = classification_metrics(truth, predict_proba(model, tok, eval_rows, stu.max_length), labels)["macro_f1"]
        if name == "shipped":  # the stage's own student, trained again: the check that this loop is the stage's
            stage_val = student["metrics"].get("selected", {}).get("best_val_macro_f1", {}).get(objective)
            out["reproduces_stage"] = stage_val is not None and abs(stage_val - state["best_f1"]) < 1e-6
            if not out["reproduces_stage"]:
                print(
                    f"{store}: the shipped arm's validation {state['best_f1']:.4f} is not the stage's {stage_val} "
                    "(another seed, sample or code?)",
                    flush=True,
                )
        out["arms"][name] = {
            "train_rows": len(trains),
            "val_macro_f1": state["best_f1"],
            "best_step": state["best_step"],
            "rounds": rounds,
            "macro_f1": f1,
            "gain": f1 - lexical,
            "seconds": seconds,
        }
        print(
            f"{store} seed {seed} {name:14s} rows {len(trains)} val {state['best_f1']:.4f} eval {f1:.4f} "
            f"gain {f1 - lexical:+.4f} ({seconds:.0f} s)",
            flush=True,
        )
    return out


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "stores",
        nargs="+",
        help="STORE:SEED, a finished quickstart run validated on sftSeed (<store>/<run name>) "
        "and the student seed it ran with (quickstart.py --seed; 0 without)",
    )
    ap.add_argument("--arm", action="append", default=[], help="NAME=key=value[,key=value] (see the docstring)")
    ap.add_argument("--objective", default="ce", choices=["ce", "kd", "crsd"],
                    help="kd reads the teacher's vote shares from the run's splits (a run with annotation.votes)")
    ap.add_argument("--tag", default="", help="the record's tag: student_settings-<tag>.json")
    a = ap.parse_args()
    import yaml

    from kubedistill.core import spec

    shipped = spec.parse_run(yaml.safe_load(SAMPLE.read_text())).spec
    arms = [("shipped", {}, "all"), *(parse_arm(t) for t in a.arm)]
    if len({n for n, _, _ in arms}) != len(arms):
        raise SystemExit("--arm: every arm needs its own name (shipped is the sample's settings)")
    runs = []
    for given in a.stores:
        store, _, seed = given.rpartition(":")
        runs.append(one_run(store, int(seed), shipped, arms, a.objective))
    by_val = {n: statistics.mean(r["arms"][n]["val_macro_f1"] for r in runs) for n, _, _ in arms}
    pick = max(by_val, key=lambda n: (by_val[n], n == "shipped"))
    rows: list[benchrecord.Row] = []
    for name, train, kind in arms:
        got = [r["arms"][name] for r in runs]
        rows.append(
            {
                "what": f"the quickstart's {a.objective} student, {name} ({train or 'the sample as shipped'}"
                f"{', on the 90% of the log trainingRows keeps' if kind == 'trainingRows' else ''}), {len(runs)} "
                "draws' own splits, validated on held-out SFT queries (`student_settings.py`)",
                "target": "the pick: best mean validation macro-F1" if name == pick else "-",
                "measured": f"validation {mean_sd([g['val_macro_f1'] for g in got])}; eval {mean_sd([g['macro_f1'] for g in got])}; "
                "gain over lexical, points: "
                + " / ".join(f"{g['gain'] * 100:+.1f}" for g in got)
                + f"; {statistics.mean(g['seconds'] for g in got):.0f} s a training",
                "met": "picked" if name == pick else "-",
            }
        )
    for row in rows:
        print(row["what"], "|", row["measured"], "|", row["met"])
    benchrecord.write(
        "student_settings", {"arms": a.arm, "objective": a.objective}, {"pick": pick, "runs": runs}, rows, tag=a.tag
    )


if __name__ == "__main__":
    main()
