"""What DPO's preference pairs need: a reward model that reads the chain against its prompt, or the SFT set's labels?

`teacher_errors.py` found the quickstart teacher's wrong labels are nearly all chains that misread their own
prompt ("It offers ramen, but it is in Northgate, not Northgate."), that its reward model ranks held-out pairs at
chance on label and consistency after the quickstart's 40 steps, and that DPO then makes the teacher worse. Two
candidate fixes: the reward model's `grounding` dimension (`teacher.pairs.misread_service`: the chain's own
description of the service, then another service's verdict and label for the same query: the pair that has the
teacher's error), and preference
pairs judged by the SFT set's known label of each prompt (`dpo.prefer: label`: a sample with the wrong label
rejected, a right one chosen; the reward model ranks within each side).

One world (the quickstart's, classic), one teacher: data, teacher-dapt and teacher-sft run once; then each arm
runs the reward-model and teacher-dpo stages on that SFT teacher (the real stages' job entrypoints on a local Ray;
the step policy keeps what an arm does not change):

- `shipped`: the quickstart's reward model and DPO as shipped (40 steps, 64 prompts; dimensions label,
  consistency, faithfulness, format; pairs by reward);
- `longer`: the same dimensions, `--rm-steps` reward-model steps and `--dpo-prompts` DPO prompts;
- `grounding`: as `longer`, with the `grounding` dimension at weight `--grounding-weight`;
- `label`: as `longer`, pairs judged by the SFT set's labels (`dpo.prefer: label`);
- `own`: as `longer`, the reward model also learning label pairs of the SFT teacher's own answers to
  `--own-answers` SFT prompts (`rewardModel.ownAnswers`: a sample with the prompt's label over one without);
- `heldout`: as `label`, but the SFT teacher does not train on `--holdout` of the SFT set's queries and DPO's
  prompts come from those (`teacher.preferenceHoldout`): its samples' errors are then the ones it makes on pairs it
  has not learned by heart. Its own SFT teacher is scored too: the arm is judged against it (what DPO adds) and
  against the whole set's SFT teacher (what holding the queries out costs or gains).

Each arm is scored by checks the reward model does not make: the teachers' greedy answers to `--rows` log pairs
(a seeded sample, the rows `teacher_errors.py` scores; query-disjoint from the SFT set the reward model and DPO
learn from) against the oracle's labels, and the share of their chains the pair's own fields refute
(`synthetic.refuted`); and each reward model on the SFT teacher's own answers to those pairs (how well its
combined reward and each dimension separate right labels from wrong ones, as AUC). Fairness: every arm starts
from the same SFT teacher and is scored on the same rows; settings were fixed before the run (the quickstart's
DPO learning rate and beta; 400 DPO prompts; the reward model's 1,600 steps, chosen on its own held-out pairs: at
400 the grounding dimension ranked 57% of them, at 1,600 93%); nothing is chosen on these rows. One teacher seed:
the spread of a teacher's training draw is not measured here, and 600 rows give a label accuracy a standard error
of about 1.5 points.

    .venv/bin/python benchmarks/teacher_dpo.py [--store DIR] [--arms ARM ...] [--teacher-seed N] [--tag T]

`--dpo-lr X` sets DPO's learning rate in every arm but `shipped` (to choose it on the DPO stage's held-out prompts).
`--teacher-seed N` trains the teacher (DAPT, SFT), the reward model and DPO again with seed N on the same world and
scores them on the same log pairs: one teacher's draw against another's.

Writes `benchmarks/records/teacher_dpo.json`.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from sklearn.metrics import f1_score

from kubedistill import benchrecord, runner
from kubedistill.core.spec import RewardModelSpec, parse_run
from kubedistill.core.storage import Storage
from kubedistill.stages.data import read_dataset
from kubedistill.stages.synthetic import refuted_summary
from kubedistill.stages.teacher import fmt, lm
from kubedistill.stages.teacher.pairs import ranking_auc
from kubedistill.stages.teacher.stages import load_reward_model, reward_scores
from kubedistill.stages.teacher.train import combined

QUICKSTART = Path(__file__).resolve().parent.parent / "manifests" / "samples" / "quickstart.yaml"
TEACHER = ("data", "teacher-dapt", "teacher-sft")
ARM_STAGES = ("teacher-sft", "reward-model", "teacher-dpo")  # the step policy keeps teacher-sft unless an arm moves it
ARMS = ("shipped", "longer", "grounding", "label", "own", "heldout")
SHIPPED_DIMENSIONS = RewardModelSpec().dimensions  # the spec's default, which the quickstart ships


def arms(doc: dict[str, Any], a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The run document of each arm: the same run (so the same data and SFT teacher), other reward-model and
    DPO settings."""
    out = {"shipped": doc}
    longer = copy.deepcopy(doc)
    longer["spec"]["teacher"]["rewardModel"]["maxSteps"] = a.rm_steps
    longer["spec"]["teacher"]["rewardModel"]["dimensions"] = dict(SHIPPED_DIMENSIONS)
    longer["spec"]["teacher"]["dpo"]["prompts"] = a.dpo_prompts
    if a.dpo_lr is not None:
        longer["spec"]["teacher"]["dpo"]["learningRate"] = a.dpo_lr
    out["longer"] = longer
    grounding = copy.deepcopy(longer)
    grounding["spec"]["teacher"]["rewardModel"]["dimensions"]["grounding"] = a.grounding_weight
    out["grounding"] = grounding
    label = copy.deepcopy(longer)
    label["spec"]["teacher"]["dpo"]["prefer"] = "label"
    out["label"] = label
    own = copy.deepcopy(longer)
    own["spec"]["teacher"]["rewardModel"]["ownAnswers"] = a.own_answers
    out["own"] = own
    heldout = copy.deepcopy(label)
    heldout["spec"]["teacher"]["preferenceHoldout"] = a.holdout
    out["heldout"] = heldout
    return out


def answer(model_uri: str, rows: list[dict[str, Any]], labels: list[str], max_tokens: int) -> dict[str, Any]:
    """A teacher's greedy answers to `rows`: label accuracy, macro-F1, recall per grade, refuted chains."""
    model, tok = lm.load(model_uri, "teacher model")
    texts = lm.generate(model, tok, [fmt.prompt(r) for r in rows], max_new_tokens=max_tokens, batch_size=300)
    parsed = [fmt.try_parse(t, labels) for t in texts]
    truth = [r["label"] for r in rows]
    said = [p.label if p else "(unparsed)" for p in parsed]
    answered = [
        {**r, "label": p.label if p else None, "reasoning": p.reasoning if p else ""}
        for r, p in zip(rows, parsed, strict=True)
    ]
    return {
        "texts": texts,
        "accuracy": sum(t == s for t, s in zip(truth, said, strict=True)) / len(rows),
        "macro_f1": float(f1_score(truth, said, labels=labels, average="macro", zero_division=0)),
        "recall": {
            g: sum(t == s == g for t, s in zip(truth, said, strict=True)) / max(1, truth.count(g)) for g in labels
        },
        "chains": refuted_summary(answered, {r["pair_id"]: r["label"] for r in rows}),
    }


def reward_on_answers(rm_uri: str, rows: list[dict[str, Any]], texts: list[str], labels: list[str]) -> dict[str, Any]:
    """How well a reward model's combined reward (and each dimension's) separates the SFT teacher's right answers
    from its wrong ones (AUC; 0.5: no better than chance)."""
    rm, tok, weights = load_reward_model(rm_uri, None)
    scores = reward_scores(rm, tok, [fmt.prompt(r) for r in rows], texts)
    right = [fmt.gives(t, r["label"], labels) for t, r in zip(texts, rows, strict=True)]
    out = {"combined": ranking_auc(combined(scores, rm.dimensions, weights).tolist(), right)}
    for i, d in enumerate(rm.dimensions):
        out[d] = ranking_auc(scores[:, i].tolist(), right)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="an earlier invocation's store (its finished stages are kept)")
    ap.add_argument("--rm-steps", type=int, default=1600, help="reward-model steps of every arm but shipped")
    ap.add_argument("--dpo-prompts", type=int, default=400, help="DPO prompts of every arm but shipped")
    ap.add_argument("--dpo-lr", type=float, default=None,
                    help="DPO's learning rate in every arm but shipped (default: the quickstart's)")
    ap.add_argument("--grounding-weight", type=float, default=1.0, help="the grounding dimension's weight")
    ap.add_argument("--own-answers", type=int, default=4000, help="the own arm's rewardModel.ownAnswers")
    ap.add_argument("--holdout", type=float, default=0.2, help="the heldout arm's teacher.preferenceHoldout")
    ap.add_argument("--rows", type=int, default=600, help="log pairs each teacher answers (a seeded sample)")
    ap.add_argument("--max-tokens", type=int, default=96, help="as the quickstart's spec.annotation.maxTokens")
    ap.add_argument("--seed", type=int, default=0, help="the seed of the log pairs' sample")
    ap.add_argument("--teacher-seed", type=int, default=None,
                    help="spec.teacher.seed: another draw of the SFT teacher, reward model and DPO (default: the sample's)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--tag", default="", help="writes teacher_dpo-<tag>.json")
    a = ap.parse_args()
    store = Path(a.store or tempfile.mkdtemp(prefix="kd-teacher-dpo-"))
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["metadata"]["name"] = "grounding"
    doc["spec"]["storage"]["uri"] = str(store)
    if a.teacher_seed is not None:
        doc["spec"]["teacher"]["seed"] = a.teacher_seed
    labels = doc["spec"]["labels"]
    docs = {k: v for k, v in arms(doc, a).items() if k in a.arms}
    print(f"arms {list(docs)}; store {store}", flush=True)

    results: dict[str, Any] = {"arms": {}}
    with runner.local_ray() as session:
        address = session.dashboard
        t0 = time.monotonic()
        m = runner.run_stages(parse_run(doc), TEACHER, address)
        results["teacher_minutes"] = round((time.monotonic() - t0) / 60, 1)
        oracle = read_dataset(Storage(m["data"]["artifact"]).child("labeled"))
        sample = sorted(oracle, key=lambda r: r["pair_id"])
        random.Random(a.seed).shuffle(sample)
        rows = sample[: a.rows]
        base_sft = m["teacher-sft"]["outputs"]["model"]
        sft = answer(base_sft, rows, labels, a.max_tokens)
        results["teacher-sft"] = {k: v for k, v in sft.items() if k != "texts"}
        print(f"teacher-sft: {sft['accuracy']:.1%}, refuted chains {sft['chains']['share']:.1%}", flush=True)
        for arm, arm_doc in docs.items():
            t0 = time.monotonic()
            m = runner.run_stages(parse_run(arm_doc), ARM_STAGES, address)
            rm, dpo = m["reward-model"]["metrics"], m["teacher-dpo"]["metrics"]
            got = answer(m["teacher-dpo"]["outputs"]["model"], rows, labels, a.max_tokens)
            own_sft = m["teacher-sft"]["outputs"]["model"] != base_sft
            arm_sft = answer(m["teacher-sft"]["outputs"]["model"], rows, labels, a.max_tokens) if own_sft else sft
            results["arms"][arm] = {
                "teacher-sft": {
                    "own": own_sft,
                    "sft_rows": m["teacher-sft"]["metrics"]["sft_rows"],
                    "eval_label_accuracy": m["teacher-sft"]["metrics"]["eval"]["label_accuracy"],
                    **{k: v for k, v in arm_sft.items() if k != "texts"},
                },
                "reward_model": {
                    "steps": rm["step"],
                    "own_answers_accuracy": rm.get("own_answers_accuracy"),
                    "own_answer_pairs": rm.get("own_answer_pairs"),
                    "pairwise_accuracy": rm["pairwise_accuracy"],
                    "combined_pairwise_accuracy": rm["combined_pairwise_accuracy"],
                },
                "reward_on_sft_answers": reward_on_answers(
                    m["reward-model"]["outputs"]["model"], rows, arm_sft["texts"], labels
                ),
                "dpo": {k: dpo[k] for k in ("preference_pairs", "preference_truth", "before", "after")},
                "teacher-dpo": {k: v for k, v in got.items() if k != "texts"},
                "minutes": round((time.monotonic() - t0) / 60, 1),
            }
            r = results["arms"][arm]
            print(
                f"{arm}: reward model {r['reward_model']['pairwise_accuracy']}, on the SFT teacher's answers "
                f"{r['reward_on_sft_answers']}; DPO {got['accuracy']:.1%}, refuted {got['chains']['share']:.1%} "
                f"({dpo['preference_pairs']} pairs, chosen right {dpo['preference_truth']['chosen_right']:.0%})",
                flush=True,
            )

    rows_out: list[benchrecord.Row] = []
    for arm, r in results["arms"].items():
        s = r["teacher-sft"]
        acc = r["reward_model"]["pairwise_accuracy"]
        rows_out.append(
            {
                "what": f"reward model `{arm}` ({r['reward_model']['steps']} steps, DPO {a.dpo_prompts if arm != 'shipped' else 64} prompts), held-out pairwise accuracy per "
                "dimension, quickstart world (`teacher_dpo.py`)",
                "target": ">= 80% on each",
                "measured": ", ".join(f"{d} {x:.1%}" for d, x in acc.items()),
                "met": "yes" if all(x >= 0.8 for x in acc.values()) else "no",
            }
        )
        on = r["reward_on_sft_answers"]
        rows_out.append(
            {
                "what": f"reward model `{arm}` on the SFT teacher's own answers to {a.rows} log pairs: AUC of right "
                "labels over wrong ones (`teacher_dpo.py`)",
                "target": "well above 0.5 (it can rank the teacher's answers)",
                "measured": f"combined {on['combined']:.3f}; "
                + ", ".join(f"{d} {x:.3f}" for d, x in on.items() if d != "combined"),
                "met": "yes" if on["combined"] >= 0.7 else "no",
            }
        )
        d = r["teacher-dpo"]
        gain = d["accuracy"] - s["accuracy"]
        rows_out.append(
            {
                "what": f"DPO teacher `{arm}` ({r['dpo']['preference_pairs']} preference pairs) vs its SFT teacher, "
                f"{a.rows} log pairs: label accuracy / chains their pair refutes (`teacher_dpo.py`)",
                "target": "DPO >= SFT + 2 points, no more refuted chains",
                "measured": f"{d['accuracy']:.1%} vs {s['accuracy']:.1%} ({gain * 100:+.1f} points; macro-F1 "
                f"{d['macro_f1']:.3f} vs {s['macro_f1']:.3f}) / {d['chains']['share']:.1%} vs {s['chains']['share']:.1%}",
                "met": "yes" if gain >= 0.02 and d["chains"]["share"] <= s["chains"]["share"] else "no",
            }
        )
        if s["own"]:  # the arm trained its own SFT teacher: what it costs against the whole set's
            w, v = results["teacher-sft"], r["dpo"]
            rows_out.append(
                {
                    "what": f"`{arm}`: its SFT teacher ({s['sft_rows']} pairs) and DPO teacher vs the whole set's SFT "
                    f"teacher, {a.rows} log pairs: label accuracy / chains their pair refutes; validation: the DPO "
                    "stage's held-out prompts (`teacher_dpo.py`)",
                    "target": "DPO >= SFT + 2 points, no more refuted chains",
                    "measured": f"SFT {s['accuracy']:.1%} / {s['chains']['share']:.1%}, DPO {d['accuracy']:.1%} / "
                    f"{d['chains']['share']:.1%} vs {w['accuracy']:.1%} / {w['chains']['share']:.1%}; validation "
                    f"{v['before']['label_accuracy']:.1%} -> {v['after']['label_accuracy']:.1%}",
                    "met": "yes"
                    if d["accuracy"] - w["accuracy"] >= 0.02 and d["chains"]["share"] <= w["chains"]["share"]
                    else "no",
                }
            )
    benchrecord.write("teacher_dpo", {k: v for k, v in vars(a).items() if k != "store"}, results, rows_out, tag=a.tag)


if __name__ == "__main__":
    main()
