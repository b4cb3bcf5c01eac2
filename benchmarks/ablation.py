"""Where distillation earns its place: students on the knowledge world, by objective and training-set size.

Issue 20's ablation, its student part: on the `knowledge` world (`kubedistill/stages/world.py`: house names,
streets and price cues that the corpus states and a label rarely shows), students with each objective learn
from the same labeled pairs at several training-set sizes, and a lexical baseline learns from the same rows.
With `--teacher oracle` the labels and reasoning chains are the world's oracle's: the ceiling of what a teacher
can hand down, and what separates the objectives from the teacher's own errors (`kd` needs a teacher's label
distribution, which an oracle does not have). With `--teacher annotations` they are a teacher's: the quickstart's
stages up to annotate run on a local Ray (the knowledge world, its log sized for the largest size), the DPO
teacher labels and explains the log, and each annotated row gets the teacher's label distribution for `kd`: the
shares of its labels over `--kd-samples` answers sampled at temperature 1 and the annotation (the annotate stage's
own `spec.annotation.votes`; the label given its own chain, `teacher.train.label_probabilities`, is all but certain
and only recorded);
`ce-oracle` is a control, CE on the oracle's labels of the same rows, and the teacher's own answers to the eval
prompts are scored beside the students.

    .venv/bin/python benchmarks/ablation.py [--sizes 500 1500 4500] [--seeds 0 1 2] [--objectives ce crsd]
    .venv/bin/python benchmarks/ablation.py --teacher annotations --objectives ce kd crsd ce-oracle [--store S]
    .venv/bin/python benchmarks/ablation.py --teacher annotations --validate-on sftSeed --sizes 1000 4000 8000 \
        --objectives ce crsd --kd-samples 0 --layers 3 --lr 4e-4 --max-reasoning-tokens 48 --tag students-sizes-sftseed
    .venv/bin/python benchmarks/ablation.py --part teacher [--seeds 0 1 2] [--corpus-only-share 0.25] [--tag T]
    .venv/bin/python benchmarks/ablation.py --part teacher-seeds --seeds 0 1 2 --sizes 500 1000 2000

The teacher's part (`--part teacher`, record `ablation-teacher.json`) runs the real stages on a local Ray
(data, teacher-dapt, teacher-sft, reward-model, teacher-dpo) with the quickstart's teacher settings on the
knowledge world, with and without DAPT (one step: a scratch model needs the stage for its tokenizer), one
world per seed. By default a quarter of the world's house names and streets are corpus-only
(`--corpus-only-share 0.25`, `spec.data.synthetic.corpusOnlyShare`): no SFT pair shows a place that uses
one, so only the corpus states those facts, and the held-out prompts that need one (a third of them) are
scored apart; `--corpus-only-share 0` is the first record's world (`ablation-teacher.json`), where the SFT
chains spell out every place's names. It reads each stage's metrics (the reward model's held-out pairwise accuracy per dimension)
and checks the SFT and DPO teachers itself on 400 held-out prompts: label accuracy, and how faithful their
reasoning is to the world's knowledge, judged against the corpus and never by the reward model (the share of
stated facts the corpus states, of those that are also about a name in the prompt (grounded), of chains that
invent none, and of the oracle's cited facts recalled), and how often a chain names the place it was shown. It
reads teacher-dpo's `preference_truth`: how often DPO's pairs prefer the answer with the prompt's true label.
`--part teacher-seeds` trains the quickstart's teacher through SFT on the student part's world once per `--seeds`
as `spec.teacher.seed` (the same data, a different training draw): how far one draw moves the teacher the students
learn from. `--services N` sets the world's places (the quickstart's 300), `--rm-epochs E` trains the reward model
E passes over its pairs instead of the quickstart's 40 steps.

Protocol: one world (seed 0): training pool, validation and eval are query-disjoint (the eval set is the
generator's own, the validation split holds out 10% of the pool's queries; with `--teacher annotations` the pool
is the annotated log, validation holds the teacher's labels and eval the oracle's; with `--validate-on sftSeed`,
validation is the quickstart's: 10% of the SFT set's queries with the oracle's labels, pairs the students never
train on, and every annotated pair of another query joins the pool). Each size's rows are whole
queries drawn in one fixed order, so a smaller set is a prefix of a larger one. Every student trains the
same epochs with early stopping on validation macro-F1 (patience 2); nothing is chosen on eval. Eval is
scored once per student from the standard input only, overall and on its tail: the pairs whose grade
depends on a house name (the oracle's reasoning cites one).

Fairness: at a size, every objective and seed sees the same rows, the same validation split and the same
eval pairs; each seed's students start from the same initial weights; the lexical baseline (BM25 features
+ logistic regression) learns from the same rows.

Writes `benchmarks/records/ablation[-TAG].json` and `benchmarks/records/ablation[-TAG].png` (learning curves).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubedistill import benchrecord
from kubedistill.core.spec import StudentSpec
from kubedistill.stages import world
from kubedistill.stages.data import split_by_query, validation_split
from kubedistill.stages.evaluate import LexicalBaseline, classification_metrics
from kubedistill.stages.student import StudentConfig, build_model, fit, predict_proba

LABELS = ["irrelevant", "partial", "relevant"]
#: student variants: the objective and its CRSD settings (the spec's defaults unless named)
VARIANTS: dict[str, dict[str, Any]] = {
    "ce": {"objective": "ce"},
    "crsd": {"objective": "crsd"},
    "crsd-align": {"objective": "crsd", "crsd": {"contrast_weight": 0.0}},  # no in-batch contrast
    "crsd-tce": {"objective": "crsd", "crsd": {"align_weight": 0.0, "contrast_weight": 0.0}},  # the views' CE only
    "kd": {"objective": "kd"},  # the teacher's label distribution (--teacher annotations only)
    "ce-oracle": {"objective": "ce"},  # CE on the oracle's labels of the same rows (--teacher annotations only)
}
RECORDS = Path(__file__).resolve().parent / "records"
QUICKSTART = Path(__file__).resolve().parent.parent / "manifests" / "samples" / "quickstart.yaml"


def depends_on_house_name(row: dict[str, Any]) -> bool:
    """Whether the oracle's grade of a pair rests on a house name (its reasoning cites one)."""
    return world.deciding_house_fact(row["reasoning"]) is not None


def by_queries(rows: list[dict[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    """The first `size` rows when whole queries are taken in one shuffled order (nested across sizes)."""
    order: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        order.setdefault(r["query"], []).append(r)
    queries = sorted(order)
    random.Random(seed).shuffle(queries)
    out: list[dict[str, Any]] = []
    for q in queries:
        if len(out) >= size:
            break
        out += order[q]
    return out


def macro_f1(rows: list[dict[str, Any]], probs: np.ndarray) -> float:
    return float(classification_metrics([r["label"] for r in rows], probs, LABELS)["macro_f1"])


def train_and_score(student: dict[str, Any], train: list[dict], val: list[dict], evalset: list[dict]) -> dict:
    cfg = StudentConfig(StudentSpec.model_validate(student), LABELS)
    torch.manual_seed(cfg.student.seed)
    model, tok = build_model(cfg)
    t0 = time.monotonic()
    state = fit(cfg, model, tok, train, val)
    model.load_state_dict(state["best_state"])
    probs = predict_proba(model, tok, evalset, cfg.student.max_length)
    tail = [i for i, r in enumerate(evalset) if depends_on_house_name(r)]
    return {
        "val_macro_f1": state["metrics"]["best_val_macro_f1"],
        "macro_f1": macro_f1(evalset, probs),
        "tail_macro_f1": macro_f1([evalset[i] for i in tail], probs[tail]),
        "steps": state["step"],
        "seconds": round(time.monotonic() - t0, 1),
    }


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def plot(
    path: Path, sizes: list[int], curves: dict[str, list[list[float]]], lexical: list[float], labels: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, per_size in curves.items():
        means = [statistics.mean(x) for x in per_size]
        ax.errorbar(sizes, means, yerr=[sd(x) for x in per_size], marker="o", capsize=3, label=name)
    ax.plot(sizes, lexical, marker="s", linestyle="--", color="grey", label="lexical")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel(f"training pairs ({labels})")
    ax.set_ylabel("eval macro-F1")
    ax.set_title("Students on the knowledge world (mean ± sd over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def draw(path: Path, args: dict[str, Any], results: dict[str, Any]) -> None:
    """The learning curves of a run's results (as its record holds them)."""
    sizes = [results["sizes"][str(s)] for s in args["sizes"]]
    curves = {o: [[r["macro_f1"] for r in e["runs"][o]] for e in sizes] for o in args["objectives"]}
    labels = "the teacher's labels" if args.get("teacher") == "annotations" else "oracle labels"
    plot(path, [e["rows"] for e in sizes], curves, [e["lexical"]["macro_f1"] for e in sizes], labels)


def teacher_annotations(args: argparse.Namespace) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """Students' rows from a teacher (`--teacher annotations`): the quickstart's stages up to annotate (data,
    teacher-dapt, teacher-sft, reward-model, teacher-dpo, annotate) on a local Ray, on the knowledge world (seed
    0; no corpus-only names), its log large enough for the largest size and a 10% validation split. Returns
    (pool, validation, eval, teacher): the annotated rows split by query, each with the teacher's label and
    chain, the teacher's label distribution over `--kd-samples` answers sampled at temperature 1 and its
    annotation (`label_probs`, for kd; the label given its own chain is all but certain: recorded, not used) and
    the oracle's label (`oracle_label`, for the ce-oracle control); eval is the data stage's held-out set
    (query-disjoint from the log) with the oracle's labels; `teacher` is how the annotating teacher did, on the
    log and on eval."""
    from kubedistill.core.storage import Storage
    from kubedistill.stages.data import read_dataset
    from kubedistill.stages.teacher import fmt, lm
    from kubedistill.stages.teacher import train as teacher_train

    store = store_dir(args, "students")
    doc = students_world("students", store, args)
    spec = doc["spec"]
    for section in ("student", "pruning", "serving"):
        spec[section]["enabled"] = False
    spec["annotation"]["votes"] = args.kd_samples  # kd's soft labels: the annotation's label and these votes, shared
    print(f"teacher: the quickstart's stages up to annotate, knowledge world; stores under {store}", flush=True)
    t0 = time.monotonic()
    m = run_local(doc, ("data", "teacher-dpo", "annotate"), "the teacher's run")
    data = Storage(m["data"]["artifact"])
    truth = {r["pair_id"]: r["label"] for r in read_dataset(data.child("labeled"))}
    rows = [{**r, "oracle_label": truth[r["pair_id"]]} for r in read_dataset(Storage(m["annotate"]["outputs"]["labeled"]))]
    evalset = read_dataset(data.child("eval"))
    model_uri = m["teacher-dpo"]["outputs"]["model"]  # the model annotate labels with
    model, tok = lm.load(model_uri, "teacher")
    prompts = [fmt.prompt(r) for r in rows]
    # the label given the teacher's own chain: read off the chain, it is all but certain (recorded, not used)
    given_chain = teacher_train.label_probabilities(model, tok, prompts, [r["reasoning"] for r in rows], LABELS)
    for r in rows:  # with --kd-samples 0 (no votes), the annotation's label alone (one-hot)
        r.setdefault("label_probs", certain(r["label"]))
    parsed = [fmt.try_parse(t, LABELS) for t in lm.generate(model, tok, [fmt.prompt(r) for r in evalset], max_new_tokens=160)]
    answered = one_hot(parsed)  # the teacher's own grade of each eval pair
    tail = [i for i, r in enumerate(evalset) if depends_on_house_name(r)]
    teacher = {
        "model": model_uri,
        "log_pairs": m["annotate"]["metrics"]["rows_in"],
        "annotated": len(rows),
        "annotate_parse_rate": m["annotate"]["metrics"]["parse_rate"],
        "agreement_with_oracle": sum(r["label"] == r["oracle_label"] for r in rows) / len(rows),
        "given_chain_mean_max_prob": float(given_chain.max(-1).values.mean()),
        "kd_samples": args.kd_samples,
        "votes_mean_max_share": float(np.mean([max(r["label_probs"]) for r in rows])),
        "votes_unanimous": float(np.mean([max(r["label_probs"]) == 1.0 for r in rows])),
        # of the pairs the teacher mislabels, the mean share of votes for the true label
        "votes_true_label_share_when_wrong": float(np.mean(
            [r["label_probs"][LABELS.index(r["oracle_label"])] for r in rows if r["label"] != r["oracle_label"]] or [0.0]
        )),
        "votes_argmax_accuracy": float(np.mean([LABELS[int(np.argmax(r["label_probs"]))] == r["oracle_label"] for r in rows])),
        "eval_parse_rate": sum(p is not None for p in parsed) / len(parsed),
        "eval_accuracy": sum(p is not None and p.label == r["label"] for p, r in zip(parsed, evalset, strict=True)) / len(evalset),
        "eval_macro_f1": macro_f1(evalset, answered),
        "eval_tail_macro_f1": macro_f1([evalset[i] for i in tail], answered[tail]),
        # per grade, the share of the oracle's pairs the teacher gives that grade (its recall), on the log and on eval
        "log_recall": recall([r["oracle_label"] for r in rows], [r["label"] for r in rows]),
        "eval_recall": recall([r["label"] for r in evalset], grades(parsed)),
        "minutes": round((time.monotonic() - t0) / 60, 1),
    }
    print(f"teacher: {teacher}", flush=True)
    # the student stage's own rule: 10% of the log's queries (trainingRows) or of the SFT set's (sftSeed, the oracle's labels)
    sft = None
    if args.validate_on == "sftSeed":
        sft = [
            {**r, "oracle_label": r["label"], "label_probs": certain(r["label"])}
            for r in read_dataset(data.child("sft"))
        ]
    pool, val = validation_split(rows, sft, StudentSpec.model_validate({"validateOn": args.validate_on, "seed": 0}))
    return pool, val, evalset, teacher


def grades(parsed: list[Any]) -> list[str | None]:
    """The grade of each parsed answer (`fmt.try_parse`); None where it did not parse."""
    return [p.label if p is not None else None for p in parsed]


def certain(label: str) -> list[float]:
    """A label as a distribution that holds no doubt (kd's soft labels for a row that carries one label)."""
    return [float(g == label) for g in LABELS]


def one_hot(parsed: list[Any]) -> np.ndarray:
    """A teacher's grades of `parsed` answers as one-hot rows; an unparsed answer has none (scored as the first label)."""
    return np.array([[float(g == x) for x in LABELS] for g in grades(parsed)])


def recall(truth: list[str], said: list[str | None]) -> dict[str, float]:
    """Per label, the share of the pairs whose true label it is that were given it (an unparsed answer, None: none)."""
    return {x: sum(s == x for t, s in zip(truth, said, strict=True) if t == x) / max(1, truth.count(x)) for x in LABELS}


def with_labels(objective: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows an objective learns from: the ce-oracle control swaps in the oracle's labels of the same pairs."""
    return [{**r, "label": r["oracle_label"]} for r in rows] if objective == "ce-oracle" else rows


# ---------------------------------------------------------------------------------------------
# The teacher's part: DAPT vs none, the reward model per dimension, SFT vs DPO


def answers(model_uri: str, rows: list[dict[str, Any]]) -> list[str]:
    """A trained teacher's greedy answers to the prompts of `rows`."""
    from kubedistill.stages.teacher import fmt, lm

    model, tok = lm.load(model_uri, "teacher")
    return lm.generate(model, tok, [fmt.prompt(r) for r in rows], max_new_tokens=160)


def teacher_checks(texts: list[str], rows: list[dict[str, Any]], corpus: set[str], unseen: list[int]) -> dict[str, float]:
    """Label accuracy and faithfulness of a teacher's answers (`answers`) to held-out prompts, and its label
    accuracy on the prompts whose explanation needs a fact no SFT chain states (`unseen`) and on the rest."""
    from kubedistill.stages.teacher import fmt
    from kubedistill.stages.teacher.stages import response_quality

    parsed = [fmt.try_parse(t, LABELS) for t in texts]
    chains = [p.reasoning if p else "" for p in parsed]
    right = [p is not None and p.label == r["label"] for p, r in zip(parsed, rows, strict=True)]  # unparsed: wrong
    needs = set(unseen)
    seen = [i for i in range(len(rows)) if i not in needs]
    return {
        "label_accuracy": response_quality(texts, rows, LABELS)["label_accuracy"],  # the stages' own definition
        "unseen_label_accuracy": sum(right[i] for i in unseen) / max(1, len(unseen)),
        "seen_label_accuracy": sum(right[i] for i in seen) / max(1, len(seen)),
        **world.faithfulness(chains, [r["reasoning"] for r in rows], corpus, [fmt.prompt(r) for r in rows]),
    }


def fact_probe(model_uri: str, facts: dict[str, str]) -> dict[str, float]:
    """Whether a model knows house names: the share of `facts` (house name -> item) whose item it ranks first
    among the items of its kind of place (a name's noun tells the kind) by the likelihood of the corpus
    sentence stating it (a cloze test, each sentence encoded as DAPT trains on it); `chance`, a guess's."""
    from kubedistill.ml.losses import sequence_logprob
    from kubedistill.stages.teacher import lm
    from kubedistill.stages.teacher.train import encode

    model, tok = lm.load(model_uri, "teacher")
    model.eval()
    right, chance = 0, 0.0
    with torch.no_grad():
        for name, item in facts.items():
            options = [i for i in world.ITEMS if world.item_kinds(i) & world.item_kinds(item)]
            chance += 1 / len(options)
            b = encode(tok, [""] * len(options), [world.fact("house", name, i) for i in options], 64)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            right += options[int(sequence_logprob(logits, b["labels"]).argmax())] == item
    return {"accuracy": right / max(1, len(facts)), "chance": chance / max(1, len(facts))}


def probe_facts(corpus: list[str], sft: list[dict[str, Any]], share: float, seed: int) -> dict[str, dict[str, str]]:
    """The house-name facts to probe: those only the corpus states (`corpus_only`, with a share) and up to 60
    that SFT chains state (`taught`)."""
    kb = world.knowledge_from_corpus(corpus)
    hidden = world.corpus_only_names(kb, share, seed) if share else set()
    cited = {f for r in sft for f in world.cited_facts(r["reasoning"])}
    taught = sorted(n for n, i in kb.house.items() if n not in hidden and world.fact("house", n, i) in cited)
    return {
        "corpus_only": {n: kb.house[n] for n in sorted(hidden) if n in kb.house},
        "taught": {n: kb.house[n] for n in random.Random(seed).sample(taught, min(60, len(taught)))},
    }


def store_dir(args: argparse.Namespace, part: str) -> Path:
    """Where a part's runs are stored: `--store` (an earlier invocation's: its finished stages are skipped by the
    step policy, its runs resumed) or a fresh temporary directory."""
    import tempfile

    return Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix=f"ablation-{part}-"))


def knowledge_run(name: str, store: Path, seed: int, share: float) -> dict[str, Any]:
    """The quickstart's run document on the knowledge world (world seed `seed`, corpus-only share `share`), named
    `name` and stored under `store`; the parts change their own settings on it."""
    import yaml

    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["storage"]["uri"] = str(store)
    doc["spec"]["data"]["synthetic"].update(world="knowledge", seed=seed, corpusOnlyShare=share)
    return doc


def students_world(name: str, store: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The student part's run document with `--teacher annotations`: the knowledge world (seed 0, no corpus-only
    names), its log large enough for the largest of `--sizes` plus a 10% validation split, `--eval-pairs` held out."""
    doc = knowledge_run(name, store, 0, 0.0)
    doc["spec"]["data"]["synthetic"].update(queries=int(max(args.sizes) * 1.3 / 6) + 20, evalSize=args.eval_pairs)
    return doc


def run_stages(doc: dict[str, Any], names: tuple[str, ...], dashboard: str) -> dict[str, dict[str, Any]]:
    """Only the stages `names` of the run `doc` on the local Ray whose job API is at `dashboard`
    (`runner.run_stages`: each submitted as the runner submits it); their manifests. A stage already done for this
    spec is skipped by the stage itself."""
    from kubedistill import runner
    from kubedistill.core.spec import parse_run

    return runner.run_stages(parse_run(doc), names, dashboard)


def manifests(doc: dict[str, Any], stages: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The manifests of `stages` of the run `doc` (under its storage uri and name)."""
    from kubedistill.core.stage import MANIFEST
    from kubedistill.core.storage import Storage

    st = Storage(str(Path(doc["spec"]["storage"]["uri"]) / doc["metadata"]["name"]))
    return {s: st.read_json(f"{s}/{MANIFEST}") for s in stages}


def run_local(doc: dict[str, Any], stages: tuple[str, ...], what: str) -> dict[str, dict[str, Any]]:
    """The run `doc` on a local Ray, quietly (stages already done for its spec are skipped by the step policy), and
    the manifests of `stages`; SystemExit naming `what` unless the run succeeds."""
    from kubedistill import runner
    from kubedistill.core.spec import parse_run

    with open(os.devnull, "w") as quiet:
        status = runner.run_local(parse_run(doc), out=quiet)
    if status.phase != "Succeeded":
        raise SystemExit(f"{what}: the run ended {status.phase}")
    return manifests(doc, stages)


TEACHER_VARIANTS = ("dapt", "no-dapt")


def teacher_part(args: argparse.Namespace) -> None:
    """The quickstart's teacher settings on the knowledge world, with and without DAPT, each world seed a run
    of the real stages on a local Ray (data, teacher-dapt, teacher-sft, reward-model, teacher-dpo)."""
    from kubedistill.core.storage import Storage
    from kubedistill.stages.data import read_dataset
    from kubedistill.stages.teacher.stages import EVAL_PROMPTS

    store = store_dir(args, "teacher")
    results: dict[str, Any] = {"runs": {v: [] for v in TEACHER_VARIANTS}}
    print(f"teacher part: quickstart teacher settings, knowledge world (corpus-only share {args.corpus_only_share}, "
          f"{args.services or 300} places), "
          f"DAPT {args.dapt_steps} steps vs 1, SFT corpus replay {args.sft_replay}, DPO on {args.dpo_prompts} prompts; "
          f"stores under {store}", flush=True)
    for seed in args.seeds:
        for variant in TEACHER_VARIANTS:
            doc = knowledge_run(f"{variant}-{seed}", store, seed, args.corpus_only_share)
            spec = doc["spec"]
            if args.services:
                spec["data"]["synthetic"]["services"] = args.services
            for section in ("annotation", "student", "pruning", "serving"):
                spec[section]["enabled"] = False
            # DAPT: --dapt-steps over the corpus (~100 steps an epoch), or one step (the scratch model's tokenizer)
            spec["teacher"]["dapt"].update(epochs=100, maxSteps=args.dapt_steps if variant == "dapt" else 1)
            spec["teacher"]["dpo"]["prompts"] = args.dpo_prompts
            if args.rm_epochs:  # a pass over the reward pairs instead of the quickstart's 40 steps
                spec["teacher"]["rewardModel"].update(epochs=args.rm_epochs, maxSteps=None)
            # both arms' SFT replays its own teacher-dapt's training texts (the no-DAPT arm's: the same corpus)
            spec["teacher"]["sft"]["corpusReplay"] = args.sft_replay
            t0 = time.monotonic()
            m = run_local(doc, ("data", "teacher-dapt", "teacher-sft", "reward-model", "teacher-dpo"), f"{variant} seed {seed}")
            data = Storage(m["data"]["artifact"])
            rows = read_dataset(data.child("eval"))[:EVAL_PROMPTS]  # the prompts the stages evaluate on
            corpus_texts = [r["text"] for r in read_dataset(data.child("corpus"))]
            corpus = set(corpus_texts)
            sft_rows = read_dataset(data.child("sft"))
            unseen = world.needing_unseen_facts(rows, sft_rows)
            facts = probe_facts(corpus_texts, sft_rows, args.corpus_only_share, seed)
            sft_places = {r["service_id"] for r in sft_rows}
            texts = {which: answers(m[f"teacher-{which}"]["outputs"]["model"], rows) for which in ("sft", "dpo")}
            run = {
                "seed": seed,
                "places": spec["data"]["synthetic"]["services"],
                "minutes": round((time.monotonic() - t0) / 60, 1),
                "dapt_perplexity_after": m["teacher-dapt"]["metrics"]["perplexity_after"],
                "reward_model": m["reward-model"]["metrics"]["pairwise_accuracy"],
                "reward_model_steps": m["reward-model"]["metrics"]["total_steps"],
                "reward_model_pairs": m["reward-model"]["metrics"]["train_pairs"],
                "preference_pairs": m["teacher-dpo"]["metrics"]["preference_pairs"],
                # the reward model on the teacher's own samples: do DPO's pairs prefer the true label?
                "preference_truth": m["teacher-dpo"]["metrics"].get("preference_truth"),
                "unseen_prompts": len(unseen),
                "sft": teacher_checks(texts["sft"], rows, corpus, unseen),
                "dpo": teacher_checks(texts["dpo"], rows, corpus, unseen),
                "copy": {which: copied_places(t, rows, sft_places) for which, t in texts.items()},
                # does the teacher know house names after DAPT, and after SFT? (cloze over the world's items)
                "fact_probe": {
                    stage: {which: fact_probe(m[stage]["outputs"]["model"], f) for which, f in facts.items() if f}
                    for stage in ("teacher-dapt", "teacher-sft")
                },
            }
            results["runs"][variant].append(run)
            print(f"{variant:<8} seed {seed}: SFT {run['sft']}  DPO {run['dpo']}  RM {run['reward_model']} "
                  f"probe {run['fact_probe']} ({run['minutes']} min)", flush=True)
    places = results["runs"]["dapt"][0]["places"]
    rows = teacher_rows(results, len(args.seeds), args.corpus_only_share, args.dapt_steps, args.sft_replay, places)
    benchrecord.write("ablation", vars(args), results, rows, tag=args.tag or "teacher")


def dapt_probe_part(args: argparse.Namespace) -> None:
    """How many DAPT steps the quickstart's teacher needs to learn the corpus's facts: the data and teacher-dapt
    stages (their own job entrypoints, on a local Ray) at each of `--dapt-sweep` steps, the rest of the teacher
    settings the quickstart's, then the cloze probe of the house-name facts after each (`fact_probe`)."""
    from kubedistill import runner
    from kubedistill.core.storage import Storage
    from kubedistill.stages.data import read_dataset

    store = store_dir(args, "dapt-probe")
    print(f"dapt probe: knowledge world (corpus-only share {args.corpus_only_share}), DAPT steps {args.dapt_sweep}; "
          f"stores under {store}", flush=True)
    results: dict[str, Any] = {"runs": []}
    with runner.local_ray() as session:
        for seed in args.seeds:
            for steps in args.dapt_sweep:
                doc = knowledge_run(f"probe-{steps}-{seed}", store, seed, args.corpus_only_share)
                doc["spec"]["teacher"]["dapt"].update(epochs=1000, maxSteps=steps)
                t0 = time.monotonic()
                m = run_stages(doc, ("data", "teacher-dapt"), session.dashboard)
                data, dapt = m["data"], m["teacher-dapt"]
                corpus = [r["text"] for r in read_dataset(Storage(data["artifact"]).child("corpus"))]
                sft = read_dataset(Storage(data["artifact"]).child("sft"))
                facts = probe_facts(corpus, sft, args.corpus_only_share, seed)
                run = {
                    "seed": seed,
                    "dapt_steps": steps,
                    "minutes": round((time.monotonic() - t0) / 60, 1),
                    "perplexity_after": dapt["metrics"]["perplexity_after"],
                    "loss": dapt["metrics"]["loss"],
                    "probe": {which: fact_probe(dapt["outputs"]["model"], f) for which, f in facts.items() if f},
                }
                results["runs"].append(run)
                print(f"DAPT {steps} steps, seed {seed}: {run}", flush=True)
    rows: list[benchrecord.Row] = []
    for steps in args.dapt_sweep:
        runs = [r for r in results["runs"] if r["dapt_steps"] == steps]
        probe = {w: [r["probe"][w]["accuracy"] for r in runs] for w in runs[0]["probe"]}
        chance = {w: statistics.mean(r["probe"][w]["chance"] for r in runs) for w in runs[0]["probe"]}
        rows.append({
            "what": f"teacher after DAPT of {steps} steps, cloze accuracy on house-name facts (corpus-only / taught by "
                    f"SFT chains), knowledge world, {len(runs)} world seed(s) (`ablation.py --part dapt-probe`)",
            "target": "above chance: the corpus's facts learned",
            "measured": "; ".join(f"{w} {statistics.mean(x):.3f} ± {sd(x):.3f} (chance {chance[w]:.3f})" for w, x in probe.items())
                        + f"; held-out corpus perplexity {statistics.mean(r['perplexity_after'] for r in runs):.2f}",
            "met": "yes" if all(statistics.mean(x) > 2 * chance[w] for w, x in probe.items()) else "no",
        })
    benchrecord.write("ablation", vars(args), results, rows, tag=args.tag or "dapt-probe")


def copied_places(texts: list[str], rows: list[dict[str, Any]], sft_places: set[str]) -> dict[str, float]:
    """How well a teacher reads its prompt back: the share of its chains (`answers`) that name the shown place
    exactly (its title), among the pairs whose place some SFT pair showed (`sft_places`, service ids) and the
    rest, and its label accuracy on the chains that name it and on the rest (a chain about another place
    reasons about that place's items and street)."""
    from kubedistill.stages.teacher import fmt

    parsed = [fmt.try_parse(t, LABELS) for t in texts]
    named = [p is not None and f" {r['service_title']} is a" in f" {p.reasoning}" for p, r in zip(parsed, rows, strict=True)]
    right = [p is not None and p.label == r["label"] for p, r in zip(parsed, rows, strict=True)]
    n = sum(named)
    familiar = [r["service_id"] in sft_places for r in rows]
    return {
        "names_the_place": n / len(rows),
        "names_a_place_sft_showed": sum(k for k, f in zip(named, familiar, strict=True) if f) / max(1, sum(familiar)),
        "names_a_place_sft_never_showed": sum(k for k, f in zip(named, familiar, strict=True) if not f)
        / max(1, len(rows) - sum(familiar)),
        "label_accuracy_when_named": sum(r for r, k in zip(right, named, strict=True) if k) / max(1, n),
        "label_accuracy_when_not": sum(r for r, k in zip(right, named, strict=True) if not k) / max(1, len(rows) - n),
    }


def teacher_size_part(args: argparse.Namespace) -> None:
    """Whether the teacher's size limits it: an SFT teacher of each `--presets` scratch model (no DAPT: one step,
    which builds the model) on the knowledge world, the quickstart's SFT settings with `--sft-steps` steps; its
    label accuracy and faithfulness (`teacher_checks`) and how often its chain names the place it was shown
    (`copied_places`). The data, teacher-dapt and teacher-sft stages' own job entrypoints on a local Ray."""
    from kubedistill import runner
    from kubedistill.core.storage import Storage
    from kubedistill.stages.data import read_dataset
    from kubedistill.stages.teacher.stages import EVAL_PROMPTS

    store = store_dir(args, "teacher-size")
    print(f"teacher size: {args.presets}, SFT {args.sft_steps} steps, knowledge world (corpus-only share "
          f"{args.corpus_only_share}); stores under {store}", flush=True)
    results: dict[str, Any] = {"runs": []}
    with runner.local_ray() as session:
        for seed in args.seeds:
            for preset in args.presets:
                name = f"size-{preset}-{seed}" + (f"-{args.services}" if args.services else "")
                doc = knowledge_run(name, store, seed, args.corpus_only_share)
                spec = doc["spec"]
                if args.services:
                    spec["data"]["synthetic"]["services"] = args.services
                spec["teacher"]["baseModel"] = f"scratch:{preset}"
                spec["teacher"]["dapt"].update(epochs=100, maxSteps=1)
                spec["teacher"]["sft"].update(epochs=1000, maxSteps=args.sft_steps)
                t0 = time.monotonic()
                m = run_stages(doc, ("data", "teacher-dapt", "teacher-sft"), session.dashboard)
                data, dapt, sft = m["data"], m["teacher-dapt"], m["teacher-sft"]
                d = Storage(data["artifact"])
                rows = read_dataset(d.child("eval"))[:EVAL_PROMPTS]
                corpus = {r["text"] for r in read_dataset(d.child("corpus"))}
                sft_rows = read_dataset(d.child("sft"))
                unseen = world.needing_unseen_facts(rows, sft_rows)
                sft_places = {r["service_id"] for r in sft_rows}
                texts = answers(sft["outputs"]["model"], rows)
                run = {
                    "seed": seed,
                    "preset": preset,
                    "places": spec["data"]["synthetic"]["services"],
                    "parameters": dapt["metrics"]["parameters"],
                    "sft_seconds_per_step": sft["metrics"]["seconds_per_step"],
                    # eval pairs whose place no SFT pair shows: a name the teacher can only read from its prompt
                    "eval_places_not_in_sft": sum(r["service_id"] not in sft_places for r in rows),
                    "minutes": round((time.monotonic() - t0) / 60, 1),
                    "sft": teacher_checks(texts, rows, corpus, unseen),
                    "copy": copied_places(texts, rows, sft_places),
                }
                results["runs"].append(run)
                print(f"{preset} seed {seed}: {run}", flush=True)
    summary: list[benchrecord.Row] = []
    for preset in args.presets:
        runs = [r for r in results["runs"] if r["preset"] == preset]
        acc = [r["sft"]["label_accuracy"] for r in runs]
        named = [r["copy"]["names_the_place"] for r in runs]
        summary.append({
            "what": f"SFT teacher scratch:{preset} ({runs[0]['parameters']:,} parameters), {args.sft_steps} SFT steps, no "
                    f"DAPT, knowledge world of {runs[0]['places']} places, {len(runs)} world seed(s): label accuracy on 400 held-out prompts / chains "
                    "naming the shown place (`ablation.py --part teacher-size`)",
            "target": "- (a diagnosis: does size limit the teacher?)",
            "measured": f"{statistics.mean(acc):.3f} ± {sd(acc):.3f} / {statistics.mean(named):.3f} ± {sd(named):.3f}",
            "met": "-",
        })
    benchrecord.write("ablation", vars(args), results, summary, tag=args.tag or "teacher-size")


def teacher_seeds_part(args: argparse.Namespace) -> None:
    """How far one teacher's training draw moves it: the quickstart's teacher through SFT on the student part's
    world (the knowledge world, seed 0, its log sized for `--sizes`), once per `--seeds` as `spec.teacher.seed`
    (a scratch model's initial weights, the batch order): the same data and held-out prompts every time. The
    data, teacher-dapt and teacher-sft stages' own job entrypoints on a local Ray. Per seed: the SFT stage's
    label accuracy on its 400 held-out prompts, and the teacher's greedy answers to the eval pairs the students
    are scored on (macro-F1, as `--teacher annotations` scores the annotating teacher)."""
    from kubedistill import runner
    from kubedistill.core.storage import Storage
    from kubedistill.stages.data import read_dataset
    from kubedistill.stages.teacher import fmt

    store = store_dir(args, "teacher-seeds")
    print(f"teacher seeds {args.seeds}: quickstart teacher through SFT, knowledge world; stores under {store}", flush=True)
    results: dict[str, Any] = {"runs": []}
    with runner.local_ray() as session:
        for seed in args.seeds:
            doc = students_world(f"teacher-seed-{seed}", store, args)
            doc["spec"]["teacher"]["seed"] = seed
            t0 = time.monotonic()
            m = run_stages(doc, ("data", "teacher-dapt", "teacher-sft"), session.dashboard)
            evalset = read_dataset(Storage(m["data"]["artifact"]).child("eval"))
            parsed = [fmt.try_parse(t, LABELS) for t in answers(m["teacher-sft"]["outputs"]["model"], evalset)]
            run = {
                "seed": seed,
                "sft_label_accuracy": m["teacher-sft"]["metrics"]["eval"]["label_accuracy"],
                "eval_macro_f1": macro_f1(evalset, one_hot(parsed)),
                "eval_recall": recall([r["label"] for r in evalset], grades(parsed)),
                "sft_loss": m["teacher-sft"]["metrics"]["loss"],
                "minutes": round((time.monotonic() - t0) / 60, 1),
            }
            results["runs"].append(run)
            print(f"teacher seed {seed}: {run}", flush=True)
    acc = [r["sft_label_accuracy"] for r in results["runs"]]
    f1 = [r["eval_macro_f1"] for r in results["runs"]]
    summary: list[benchrecord.Row] = [{
        "what": f"SFT teacher (the quickstart's settings) over {len(acc)} teacher seeds (`spec.teacher.seed`), one world and "
                "its data: label accuracy on 400 held-out prompts / macro-F1 on the students' eval pairs, knowledge world "
                "(`ablation.py --part teacher-seeds`)",
        "target": "- (a diagnosis: how far one training draw moves the teacher)",
        "measured": f"{statistics.mean(acc):.3f} ± {sd(acc):.3f} (per seed {', '.join(f'{x:.3f}' for x in acc)}) / "
                    f"{statistics.mean(f1):.3f} ± {sd(f1):.3f} (per seed {', '.join(f'{x:.3f}' for x in f1)})",
        "met": "-",
    }]
    benchrecord.write("ablation", vars(args), results, summary, tag=args.tag or "teacher-seeds")


def teacher_rows(
    results: dict[str, Any], seeds: int, share: float, dapt_steps: int, replay: float = 0.0, places: int = 300
) -> list[benchrecord.Row]:
    """The record's rows of the teacher part's `results` (`results["runs"][variant]`: one run per seed)."""

    def stat(variant: str, get: Any) -> tuple[float, float, list[float]]:
        xs = [float(get(r)) for r in results["runs"][variant]]
        return statistics.mean(xs), sd(xs), xs

    rows: list[benchrecord.Row] = []
    first = results["runs"]["dapt"][0]
    grounded = "grounded_precision" in first["sft"]  # runs before the check have the corpus-only precision alone
    sft_d, sft_nd = stat("dapt", lambda r: r["sft"]["label_accuracy"]), stat("no-dapt", lambda r: r["sft"]["label_accuracy"])
    diffs = [a - b for a, b in zip(sft_d[2], sft_nd[2], strict=True)]
    world_is = f"knowledge world of {places} places{f' (corpus-only share {share})' if share else ''}, {seeds} world seeds"
    if replay:
        world_is += f", SFT replaying {replay:g} corpus texts per pair"
    rows.append({
        "what": f"SFT teacher with vs without DAPT ({dapt_steps} steps), label accuracy on 400 held-out prompts, {world_is} "
                "(`ablation.py --part teacher`)",
        "target": "DAPT helps",
        "measured": f"{sft_d[0]:.3f} ± {sft_d[1]:.3f} vs {sft_nd[0]:.3f} ± {sft_nd[1]:.3f} "
                    f"(per seed {', '.join(f'{d:+.3f}' for d in diffs)})",
        "met": "yes" if statistics.mean(diffs) > 0 and min(diffs) > 0 else "no",
    })
    if share:
        un_d = stat("dapt", lambda r: r["sft"]["unseen_label_accuracy"])
        un_nd = stat("no-dapt", lambda r: r["sft"]["unseen_label_accuracy"])
        un_diffs = [a - b for a, b in zip(un_d[2], un_nd[2], strict=True)]
        prompts = [r["unseen_prompts"] for r in results["runs"]["dapt"]]
        rows.append({
            "what": f"SFT teacher with vs without DAPT ({dapt_steps} steps), label accuracy on the held-out prompts whose explanation "
                    f"needs a fact no SFT chain states ({min(prompts)}-{max(prompts)} of 400), {world_is} "
                    "(`ablation.py --part teacher`)",
            "target": "DAPT helps",
            "measured": f"{un_d[0]:.3f} ± {un_d[1]:.3f} vs {un_nd[0]:.3f} ± {un_nd[1]:.3f} "
                        f"(per seed {', '.join(f'{d:+.3f}' for d in un_diffs)})",
            "met": "yes" if statistics.mean(un_diffs) > 0 and min(un_diffs) > 0 else "no",
        })
    if grounded:
        g_d = stat("dapt", lambda r: r["sft"]["grounded_precision"])
        g_nd = stat("no-dapt", lambda r: r["sft"]["grounded_precision"])
        p_d, p_nd = stat("dapt", lambda r: r["sft"]["fact_precision"]), stat("no-dapt", lambda r: r["sft"]["fact_precision"])
        rows.append({
            "what": f"SFT teacher with vs without DAPT ({dapt_steps} steps), the facts its chains state that the corpus "
                    f"states about a name in the prompt (and, in brackets, that the corpus states at all), {world_is} "
                    "(`ablation.py --part teacher`)",
            "target": "DAPT helps",
            "measured": f"{g_d[0]:.3f} ± {g_d[1]:.3f} ({p_d[0]:.3f}) vs {g_nd[0]:.3f} ± {g_nd[1]:.3f} ({p_nd[0]:.3f})",
            "met": "yes" if g_d[0] > g_nd[0] and min(a - b for a, b in zip(g_d[2], g_nd[2], strict=True)) > 0 else "no",
        })
    dims = sorted(first["reward_model"])
    per_dim = {d: stat("dapt", lambda r, d=d: r["reward_model"][d]) for d in dims}
    rm_steps, rm_pairs = first.get("reward_model_steps", 40), first.get("reward_model_pairs", "its")
    rows.append({
        "what": f"reward model, held-out pairwise accuracy per dimension, {rm_steps} steps over {rm_pairs} pairs, "
                f"{world_is} (`ablation.py --part teacher`)",
        "target": ">= 80% on each",
        "measured": ", ".join(f"{d} {v[0]:.1%} ± {v[1]:.1%}" for d, v in per_dim.items()),
        "met": "yes" if all(v[0] >= 0.8 for v in per_dim.values()) else "no",
    })
    # faithfulness: grounded precision where the runs have it (a true fact about a name the prompt lacks is not)
    faithful = "grounded_precision" if grounded else "fact_precision"
    for what in ("label_accuracy", faithful):
        gain = [r["dpo"][what] - r["sft"][what] for r in results["runs"]["dapt"]]
        results.setdefault("dpo_minus_sft", {})[what] = gain
    acc, prec = results["dpo_minus_sft"]["label_accuracy"], results["dpo_minus_sft"][faithful]
    other = [r["dpo"]["label_accuracy"] - r["sft"]["label_accuracy"] for r in results["runs"]["no-dapt"]]
    rows.append({
        "what": f"DPO vs SFT teacher: label accuracy / {faithful.replace('_', ' ')} of the reasoning (checked against "
                "the corpus, not by the reward model) (`ablation.py --part teacher`)",
        "target": "DPO >= SFT + 2 points on one, no loss on the other",
        "measured": f"{statistics.mean(acc):+.3f} (per seed {', '.join(f'{d:+.3f}' for d in acc)}) / "
                    f"{statistics.mean(prec):+.3f} (per seed {', '.join(f'{d:+.3f}' for d in prec)}); the teacher "
                    f"without DAPT: label accuracy {statistics.mean(other):+.3f} (per seed {', '.join(f'{d:+.3f}' for d in other)})",
        # "no loss": the mean change no worse than its seed spread (the student part's "no worse")
        "met": "yes" if any(statistics.mean(x) >= 0.02 and statistics.mean(y) >= -sd(y) for x, y in ((acc, prec), (prec, acc)))
        else "no",
    })
    truth = [r["preference_truth"] for v in TEACHER_VARIANTS for r in results["runs"][v] if r.get("preference_truth")]
    if truth:
        rows.append({
            "what": "reward model on the SFT teacher's own samples: DPO's preference pairs whose chosen answer gives the "
                    "prompt's true label and whose rejected one does not, of those where exactly one does, both arms "
                    "(`ablation.py --part teacher`)",
            "target": "- (an independent check of the reward model; 0.5 is chance)",
            "measured": ", ".join(f"{t['ordered']:.3f}" for t in truth)
            + f" (chosen right {statistics.mean(t['chosen_right'] for t in truth):.3f}, "
            f"rejected right {statistics.mean(t['rejected_right'] for t in truth):.3f})",
            "met": "-",
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["student", "teacher", "dapt-probe", "teacher-size", "teacher-seeds"],
                    default="student")
    ap.add_argument("--presets", nargs="+", default=["llama-tiny", "llama-small"],
                    help="teacher-size part: the scratch presets to compare")
    ap.add_argument("--sft-steps", type=int, default=1800, help="teacher-size part: SFT steps (the quickstart's 1,800)")
    ap.add_argument("--services", type=int, default=0,
                    help="teacher and teacher-size parts: places in the world (spec.data.synthetic.services; 0: the quickstart's 300)")
    ap.add_argument("--store", help="teacher, dapt-probe and teacher-size parts: the store of an earlier invocation to resume")
    ap.add_argument("--dapt-sweep", type=int, nargs="+", default=[300, 1000, 3000],
                    help="dapt-probe part: DAPT steps to probe after")
    ap.add_argument("--dapt-steps", type=int, default=300, help="teacher part: DAPT steps of the dapt variant")
    ap.add_argument("--dpo-prompts", type=int, default=256, help="teacher part: prompts DPO samples answers to")
    ap.add_argument("--rm-epochs", type=float, default=0,
                    help="teacher part: passes of the reward model over its pairs (0: the quickstart's 40 steps)")
    ap.add_argument("--sft-replay", type=float, default=0.0,
                    help="teacher part: spec.teacher.sft.corpusReplay of both arms (domain texts per SFT pair)")
    ap.add_argument("--corpus-only-share", type=float, default=0.25,
                    help="teacher part: spec.data.synthetic.corpusOnlyShare of the knowledge world (0: every place "
                         "may be in the SFT pairs, the first record's world)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1500, 4500])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--objectives", nargs="+", default=["ce", "crsd"], choices=list(VARIANTS))
    ap.add_argument("--teacher", choices=["oracle", "annotations"], default="oracle",
                    help="student part: learn from the world's oracle, or from the quickstart teacher's annotations")
    ap.add_argument("--validate-on", choices=["trainingRows", "sftSeed"], default="trainingRows",
                    help="student part, --teacher annotations: validate on 10%% of the annotated log's queries (the "
                         "teacher's labels) or, as the quickstart does, on 10%% of the SFT set's queries (the oracle's "
                         "labels; every annotated pair of another query trains)")
    ap.add_argument("--kd-samples", type=int, default=4,
                    help="student part, --teacher annotations: answers sampled per pair for kd's label distribution")
    ap.add_argument("--layers", type=int, default=None, help="student part: keep the encoder's first N layers")
    ap.add_argument("--sampling", choices=["balanced", "shuffle"], default="balanced", help="student part: batches")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-reasoning-tokens", type=int, default=96)
    ap.add_argument("--eval-pairs", type=int, default=1000)
    ap.add_argument("--tag", default="", help="record name suffix")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the record of --tag")
    args = ap.parse_args()
    if args.part == "teacher":
        teacher_part(args)
        return
    if args.part == "dapt-probe":
        dapt_probe_part(args)
        return
    if args.part == "teacher-size":
        teacher_size_part(args)
        return
    if args.part == "teacher-seeds":
        teacher_seeds_part(args)
        return
    name = f"ablation{'-' + args.tag if args.tag else ''}"
    if args.replot:
        import json

        record = json.loads((RECORDS / f"{name}.json").read_text())
        draw(RECORDS / f"{name}.png", record["arguments"], record["results"])
        return

    oracle_only = {"kd", "ce-oracle"} & set(args.objectives)
    if args.teacher == "oracle" and args.validate_on != "trainingRows":
        raise SystemExit("--validate-on sftSeed needs --teacher annotations (the oracle's pool is its own validation)")
    if args.teacher == "oracle" and oracle_only:
        raise SystemExit(f"--objectives {' '.join(sorted(oracle_only))} need --teacher annotations")
    teacher: dict[str, Any] | None = None
    if args.teacher == "annotations":
        pool, val, evalset, teacher = teacher_annotations(args)
    else:
        pool_queries = int(max(args.sizes) * 1.15 / 6) + 20  # the largest size plus a 10% validation split
        gen = world.generate(LABELS, 300, pool_queries, 6, 1, args.eval_pairs, seed=0)
        (pool, val), evalset = split_by_query(gen.labeled, 0.1, seed=0), gen.eval
    if len(pool) < max(args.sizes):
        raise SystemExit(f"the pool holds {len(pool)} pairs, fewer than --sizes {max(args.sizes)}")
    tail_idx = [i for i, r in enumerate(evalset) if depends_on_house_name(r)]
    tail = len(tail_idx)
    print(f"world: knowledge; pool {len(pool)}, validation {len(val)}, eval {len(evalset)} ({tail} on house names)")
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    results: dict[str, Any] = {"sizes": {}, **({"teacher": teacher} if teacher else {})}
    for size in args.sizes:
        train = by_queries(pool, size, seed=0)
        base = LexicalBaseline(LABELS).fit(train)
        probs = base.predict_proba(evalset)
        lexical = {
            "macro_f1": macro_f1(evalset, probs),
            "tail_macro_f1": macro_f1([evalset[i] for i in tail_idx], probs[tail_idx]),
        }
        entry: dict[str, Any] = {"rows": len(train), "lexical": lexical, "runs": {o: [] for o in args.objectives}}
        if teacher:
            entry["label_agreement"] = sum(r["label"] == r["oracle_label"] for r in train) / len(train)
        if "ce-oracle" in args.objectives:  # the control's lexical baseline: the oracle's labels of the same rows
            entry["lexical_oracle"] = {"macro_f1": macro_f1(evalset, LexicalBaseline(LABELS).fit(
                with_labels("ce-oracle", train)).predict_proba(evalset))}
        print(f"\nsize {size} ({len(train)} rows): lexical macro-F1 {lexical['macro_f1']:.4f} "
              f"(tail {lexical['tail_macro_f1']:.4f})", flush=True)
        for seed in args.seeds:
            for objective in args.objectives:
                student = {
                    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
                    **VARIANTS[objective],
                    "train": {"epochs": args.epochs, "batch_size": args.batch, "learning_rate": args.lr,
                              "sampling": args.sampling},
                    "seed": seed,
                    "patience": 2,
                    "layers": args.layers,
                    "max_length": args.max_length,
                    "max_reasoning_tokens": args.max_reasoning_tokens,
                }
                m = train_and_score(student, with_labels(objective, train), with_labels(objective, val), evalset)
                entry["runs"][objective].append({"seed": seed, **m})
                print(f"  seed {seed} {objective:<10} val {m['val_macro_f1']:.4f}  eval macro-F1 {m['macro_f1']:.4f} "
                      f"tail {m['tail_macro_f1']:.4f} "
                      f"({m['steps']} steps, {m['seconds']:.0f} s)", flush=True)
        results["sizes"][str(size)] = entry

    rows: list[benchrecord.Row] = []
    labeled = "teacher-annotated" if teacher else "oracle-labeled"
    students = [o for o in args.objectives if o != "ce-oracle"]  # the control is not a student of the teacher
    print("\nsize   " + "  ".join(f"{o:<17}" for o in args.objectives) + "  lexical")
    for size in args.sizes:
        e = results["sizes"][str(size)]
        cells = []
        for o in args.objectives:
            xs = [r["macro_f1"] for r in e["runs"][o]]
            e.setdefault("summary", {})[o] = {"mean": statistics.mean(xs), "sd": sd(xs)}
            cells.append(f"{statistics.mean(xs):.4f} ± {sd(xs):.4f}")
        print(f"{size:<6} " + "  ".join(f"{c:<17}" for c in cells) + f"  {e['lexical']['macro_f1']:.4f}")
        if not students:
            continue
        worst = min(e["summary"][o]["mean"] for o in students)
        rows.append({
            "what": f"every student vs the lexical baseline, {e['rows']} {labeled} pairs, knowledge world, "
                    f"{len(args.seeds)} seeds (`ablation.py`)",
            "target": ">= lexical + 5 points",
            "measured": ", ".join(f"{o} {e['summary'][o]['mean']:.3f} ± {e['summary'][o]['sd']:.3f}"
                                  for o in students) + f"; lexical {e['lexical']['macro_f1']:.3f}",
            "met": "yes" if worst >= e["lexical"]["macro_f1"] + 0.05 else "no",
        })
    crsd = [o for o in args.objectives if o.startswith("crsd")] if "ce" in args.objectives else []
    for variant in crsd:
        for size, want in ((min(args.sizes), "+2 points"), (max(args.sizes), "no worse")):
            e = results["sizes"][str(size)]
            d = [c["macro_f1"] - b["macro_f1"] for c, b in zip(e["runs"][variant], e["runs"]["ce"], strict=True)]
            e.setdefault("minus_ce", {})[variant] = d
            ok = statistics.mean(d) >= 0.02 if want == "+2 points" else statistics.mean(d) >= -sd(d)
            rows.append({
                "what": f"{variant} vs CE student, {e['rows']} {labeled} pairs, knowledge world (`ablation.py`)",
                "target": f"{variant} {want} macro-F1",
                "measured": f"{statistics.mean(d):+.4f} (per seed {', '.join(f'{x:+.3f}' for x in d)})",
                "met": "yes" if ok else "no",
            })
    if "ce-oracle" in args.objectives and "ce" in args.objectives:
        for size in args.sizes:
            e = results["sizes"][str(size)]
            d = [o["macro_f1"] - c["macro_f1"] for o, c in zip(e["runs"]["ce-oracle"], e["runs"]["ce"], strict=True)]
            rows.append({
                "what": f"what the teacher's labels cost a CE student: the oracle's labels of the same {e['rows']} pairs "
                        f"vs the teacher's, knowledge world (`ablation.py`)",
                "target": "- (a control)",
                "measured": f"{statistics.mean(d):+.4f} (per seed {', '.join(f'{x:+.3f}' for x in d)}); ce-oracle "
                            f"{e['summary']['ce-oracle']['mean']:.3f}; lexical on the oracle's labels "
                            f"{e['lexical_oracle']['macro_f1']:.3f}, on the teacher's {e['lexical']['macro_f1']:.3f}",
                "met": "-",
            })
    if teacher and len(students) > 1:  # "the best on validation" needs more than one to choose from
        e = results["sizes"][str(max(args.sizes))]
        # the best by validation macro-F1 (--validate-on's labels), as the quickstart chooses what it serves
        best = max(students, key=lambda o: statistics.mean(r["val_macro_f1"] for r in e["runs"][o]))
        share = e["summary"][best]["mean"] / teacher["eval_macro_f1"]
        rows.append({
            "what": f"the student best on validation vs its teacher, {e['rows']} teacher-annotated pairs, knowledge world (`ablation.py`)",
            "target": ">= 95% of the teacher's macro-F1",
            "measured": f"{best} {e['summary'][best]['mean']:.3f} = {share:.1%} of the teacher's "
                        f"{teacher['eval_macro_f1']:.3f}",
            "met": "yes" if share >= 0.95 else "no",
        })
    RECORDS.mkdir(exist_ok=True)
    draw(RECORDS / f"{name}.png", vars(args), results)
    results["data"] = {"pool": len(pool), "validation": len(val), "eval": len(evalset), "eval_tail": tail}
    benchrecord.write("ablation", vars(args), results, rows, tag=args.tag)


if __name__ == "__main__":
    main()
