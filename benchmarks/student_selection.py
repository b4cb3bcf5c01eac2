"""Which student should a run serve? The choice on the teacher-labeled validation split (`student.select:
validation`) against a choice on gold-labeled pairs no student learned from, each judged by which student the
held-out eval set prefers.

Reads finished quickstart runs (`quickstart.py` keeps each store and prints where; both worlds) whose student stage
trained more than one objective (`compareObjectives`). For each run: the validation macro-F1 the stage chose by
(teacher labels, 10% of the annotated log's queries), each student's macro-F1 as served on up to `--pairs` pairs of
the data stage's SFT set (gold labels: the human-labeled set in production; whole queries in a seeded order; the
students learn from the log's annotations and never see these pairs, and their queries are disjoint from eval's,
checked here), and each student's eval macro-F1 from the run's evaluate stage.

Fairness: both choices are made without the eval set, which only judges them; a tie on either goes to the run's
objective, as `select: validation` breaks ties. The SFT pairs taught the teacher (not the students): a student that
copies its teacher's view of them is not told their labels. Nothing is tuned here.

    .venv/bin/python benchmarks/student_selection.py /tmp/kd-quickstart-bench-XXXX/quickstart [...]

Writes `benchmarks/records/student_selection.json`.
"""

from __future__ import annotations

import argparse
from typing import Any

from kubedistill import benchrecord
from kubedistill.core.stage import must_read_manifest
from kubedistill.core.storage import Storage
from kubedistill.stages.data import read_dataset, split_by_query
from kubedistill.stages.evaluate import score_student
from kubedistill.stages.student import load_student, select_student


def one_run(store: str, n: int, seed: int) -> dict[str, Any]:
    st = Storage(store)
    data = must_read_manifest(st, "data")
    student = must_read_manifest(st, "student-crsd")
    evaluate = must_read_manifest(st, "evaluate")
    sft = read_dataset(Storage(data["artifact"]).child("sft"))
    eval_queries = {r["query"] for r in read_dataset(Storage(data["artifact"]).child("eval"))}
    if {r["query"] for r in sft} & eval_queries:
        raise SystemExit(f"{store}: the SFT set shares queries with eval; these pairs cannot judge students")
    rows = split_by_query(sft, n / len(sft), seed)[1]  # whole queries, about n pairs
    truth = [r["label"] for r in rows]
    models = Storage(evaluate["artifact"]).read_json("metrics.json")["models"]
    gold, evals = {}, {}
    for key, uri in student["outputs"].items():
        if not key.startswith("model"):
            continue
        loaded = load_student(uri)
        name = loaded.meta["objective"]
        gold[name] = score_student(loaded, rows, truth, list(loaded.labels))[0]["macro_f1"]
        evals[name] = models["student" if key == "model" else f"student_{name}"]["macro_f1"]
    if len(gold) < 2:
        raise SystemExit(f"{store}: one student; nothing to choose between (set student.compareObjectives)")
    validation = student["metrics"]["selected"]["best_val_macro_f1"]
    first = next(iter(validation))  # spec.student.objective: the stage writes it first
    return {
        "store": store,
        "world": data["metrics"]["world"],
        "objective": first,
        "gold_pairs": len(rows),
        "validation": validation,
        "gold": gold,
        "eval": evals,
        "by_validation": student["metrics"]["selected"]["objective"],
        "by_gold": select_student("validation", first, gold),  # the stage's rule: best score, a tie to the objective
        "eval_best": select_student("validation", first, evals),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+", help="finished quickstart runs (<store>/<run name>)")
    ap.add_argument("--pairs", type=int, default=1000, help="gold-labeled SFT pairs each student is scored on")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    runs = [one_run(s, a.pairs, a.seed) for s in a.stores]
    for r in runs:
        print(
            f"{r['world']:9s} validation {r['by_validation']:4s} gold {r['by_gold']:4s} eval-best {r['eval_best']:4s} | "
            + "  ".join(f"{o}: val {r['validation'][o]:.3f} gold {r['gold'][o]:.3f} eval {r['eval'][o]:.3f}" for o in r["gold"])
        )
    rows: list[benchrecord.Row] = []
    for world in [*sorted({r["world"] for r in runs}), "all"]:
        these = [r for r in runs if world in ("all", r["world"])]
        hit_v = sum(r["by_validation"] == r["eval_best"] for r in these)
        hit_g = sum(r["by_gold"] == r["eval_best"] for r in these)
        lost = [r["eval"][r["eval_best"]] - r["eval"][r["by_gold"]] for r in these]
        rows.append({
            "what": f"the run's student chosen on ~{a.pairs} gold-labeled SFT pairs vs on the teacher-labeled validation "
                    f"split, judged by the eval set's better student, {len(these)} quickstart run(s), "
                    f"{'both worlds' if world == 'all' else world + ' world'} (`student_selection.py`)",
            "target": "- (a diagnosis: is the teacher-labeled validation split the one to choose on?)",
            "measured": f"gold picks the eval-better student in {hit_g} of {len(these)}, validation in {hit_v} of "
                        f"{len(these)}; gold's picks lose at most {max(lost) * 100:.1f} eval points",
            "met": "-",
        })
    for row in rows:
        print(row["measured"])
    benchrecord.write("student_selection", {k: v for k, v in vars(a).items() if k != "stores"}, {"runs": runs}, rows)


if __name__ == "__main__":
    main()
