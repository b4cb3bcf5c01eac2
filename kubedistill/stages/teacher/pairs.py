"""Preference pairs: for the reward model (a correct response vs one perturbed on one dimension)
and for DPO (the best vs the worst sampled response, when the reward model separates them; or, with
`dpo.prefer: label`, a sample with the wrong label vs a right one, the reward model ranking within each).

Each reward dimension gets pairs that differ on that dimension only, so its head learns it:

    label          the label flipped to another one; reasoning unchanged
    consistency    the label kept; reasoning taken from a pair of the same query with another label
                   (so it argues for a different verdict)
    faithfulness   a sentence claiming an attribute the query and service never mention
    format         the response broken: no label line, label outside spec.labels, or lines swapped
    grounding      the chain's own description of the service, then the verdict and label of another
                   service's chain for the same query (one with another label where there is one): a chain
                   that argues its label but misjudges the service it has just described, the small
                   teacher's commonest error (benchmarks/RESULTS.md)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from kubedistill.stages.synthetic import CATALOG
from kubedistill.stages.teacher import fmt

#: attributes a faithful response can only cite if the query or service mentions them
_ATTRIBUTES = sorted({item for _, items in CATALOG.values() for item in items})


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    dimension: str


def flip_label(reasoning: str, label: str, labels: list[str], rng: random.Random) -> str:
    return fmt.response(reasoning, rng.choice([x for x in labels if x != label]))


def contradict(label: str, other_reasoning: str) -> str:
    return fmt.response(other_reasoning, label)


def invent_attribute(row: dict[str, Any], reasoning: str, label: str, rng: random.Random) -> str | None:
    seen = " ".join(str(row.get(k) or "") for k in ("query", "service_title", "service_description")).lower()
    seen += " " + " ".join(row.get("service_tags") or []).lower()
    unseen = [a for a in _ATTRIBUTES if a not in seen]
    if not unseen:
        return None
    return fmt.response(f"{reasoning} It is also known for its {rng.choice(unseen)}.", label)


def _sentences(text: str) -> list[str]:
    return [x for x in re.split(r"(?<=[.!?])\s+", text.strip()) if x]


def misread_service(row: dict[str, Any], other: dict[str, Any]) -> str:
    """A chain that describes `row`'s service and then judges it as `other`'s (another service shown for the same
    query) was judged, with `other`'s label: `row`'s chain up to and including its first sentence naming `row`'s
    title, then `other`'s chain after its first sentence naming `other`'s title. Where either chain names no
    title, `other`'s whole chain with `row`'s title put for `other`'s. The label follows the verdict, so the
    response is consistent and well-formed; only its verdict's claims are another service's."""
    theirs, ours = str(other.get("service_title") or ""), str(row.get("service_title") or "")
    own, their = _sentences(row["reasoning"]), _sentences(other["reasoning"])
    i = next((k for k, x in enumerate(own) if ours and ours in x), None)
    j = next((k for k, x in enumerate(their) if theirs and theirs in x), None)
    if i is None or j is None:
        reasoning = other["reasoning"].replace(theirs, ours) if theirs and ours else other["reasoning"]
    else:
        reasoning = " ".join(own[: i + 1] + [x.replace(theirs, ours) for x in their[j + 1 :]])
    return fmt.response(reasoning, other["label"])


def break_format(reasoning: str, label: str, labels: list[str], rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return f"Reasoning: {reasoning}"
    if kind == 1:
        return fmt.response(reasoning, f"{label}ish" if f"{label}ish" not in labels else "unknown")
    return f"Label: {label}\nReasoning: {reasoning}"


def reward_pairs(rows: list[dict[str, Any]], labels: list[str], dimensions: list[str], seed: int) -> list[Pair]:
    """Up to one pair per row and dimension; rows need `label` and `reasoning`."""
    rng = random.Random(seed)
    by_query: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_query.setdefault(r["query"], []).append(r)
    not_label = {lab: [o["reasoning"] for o in rows if o["label"] != lab] for lab in {r["label"] for r in rows}}

    def misread(r: dict[str, Any]) -> str | None:
        title = r.get("service_title")
        others = [o for o in by_query[r["query"]] if o.get("service_title") != title]
        unlike = [o for o in others if o["label"] != r["label"]]
        return misread_service(r, rng.choice(unlike or others)) if others else None

    out = []
    for r in rows:
        p, good = fmt.prompt(r), fmt.response(r["reasoning"], r["label"])
        for dim in dimensions:
            bad: str | None
            if dim == "label":
                bad = flip_label(r["reasoning"], r["label"], labels, rng)
            elif dim == "consistency":
                others = [o["reasoning"] for o in by_query[r["query"]] if o["label"] != r["label"]]
                others = others or not_label[r["label"]]
                bad = contradict(r["label"], rng.choice(others)) if others else None
            elif dim == "faithfulness":
                bad = invent_attribute(r, r["reasoning"], r["label"], rng)
            elif dim == "format":
                bad = break_format(r["reasoning"], r["label"], labels, rng)
            elif dim == "grounding":
                bad = misread(r)
            else:
                raise ValueError(f"spec.teacher.rewardModel.dimensions: unknown dimension {dim!r}")
            if bad is not None and bad != good:
                out.append(Pair(p, good, bad, dim))
    return out


def choose_pair(responses: list[str], rewards: list[float], margin: float) -> tuple[str, str] | None:
    """(chosen, rejected): the highest- vs the lowest-reward response, if they differ by >= margin."""
    if len(responses) != len(rewards) or len(responses) < 2:
        raise ValueError("need at least two responses, each with a reward")
    best = max(range(len(rewards)), key=lambda i: rewards[i])
    worst = min(range(len(rewards)), key=lambda i: rewards[i])
    if rewards[best] - rewards[worst] < margin or responses[best] == responses[worst]:
        return None
    return responses[best], responses[worst]


def choose_by_label(
    responses: list[str], rewards: list[float], truth: str, gold: str, labels: list[str]
) -> tuple[str, str] | None:
    """(chosen, rejected) judged by the prompt's known label `truth`: rejected is the lowest-reward response whose
    label is wrong (an unparsable one counts as wrong), chosen the highest-reward one whose label is right, or
    `gold` (the SFT set's own response) when none is. None when every response gives `truth`."""
    if len(responses) != len(rewards) or not responses:
        raise ValueError("need responses, each with a reward")
    right = [fmt.gives(t, truth, labels) for t in responses]
    wrong = [i for i, ok in enumerate(right) if not ok]
    if not wrong:
        return None
    good = [i for i, ok in enumerate(right) if ok]
    chosen = responses[max(good, key=lambda i: rewards[i])] if good else gold
    return chosen, responses[min(wrong, key=lambda i: rewards[i])]


def ranking_auc(rewards: list[float], right: list[bool]) -> float | None:
    """How well `rewards` rank the right responses over the wrong ones: the share of (right, wrong) pairs where
    the right one has the higher reward, ties half (the AUC; 0.5: no better than chance). None without both."""
    from sklearn.metrics import roc_auc_score

    if len(set(right)) < 2:
        return None
    return float(roc_auc_score(right, rewards))


def preference_truth(
    chosen_rejected: list[dict[str, str]], truth: dict[str, str], labels: list[str]
) -> dict[str, float]:
    """How DPO's preference pairs (`prompt`, `chosen`, `rejected`) agree with the known labels of their prompts
    (`truth`, prompt -> label): an independent check of the reward model on the teacher's own samples, where its
    held-out pairs are perturbations of the oracle's. `chosen_right` / `rejected_right`: the share of pairs whose
    chosen / rejected response gives the true label (unparsable: wrong); `ordered`: among the pairs where exactly
    one of the two is right, the share where it is the chosen one (0.5: the reward model ranks by something
    else; 0 when no pair has one right answer)."""

    c = [fmt.gives(p["chosen"], truth[p["prompt"]], labels) for p in chosen_rejected]
    r = [fmt.gives(p["rejected"], truth[p["prompt"]], labels) for p in chosen_rejected]
    split = [a for a, b in zip(c, r, strict=True) if a != b]
    n = max(1, len(chosen_rejected))
    return {"chosen_right": sum(c) / n, "rejected_right": sum(r) / n, "ordered": sum(split) / max(1, len(split))}
