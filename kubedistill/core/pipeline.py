"""DistillationRun spec -> ordered stage graph.

Each stage reads only the spec sections listed in `_READS`; its config hash covers those sections
plus its inputs, so changing (say) `spec.serving` reruns `serve` and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kubedistill.core.spec import DistillationRun, Resources, to_wire
from kubedistill.core.stage import config_hash

#: Every stage, in execution order.
STAGE_ORDER: tuple[str, ...] = (
    "data",
    "teacher-dapt",
    "teacher-sft",
    "reward-model",
    "teacher-dpo",
    "annotate",
    "student-crsd",
    "evaluate",
    "prune-search",
    "serve",
)

#: Stages that run only when the evaluation gate passed (promotion of the student).
GATED: frozenset[str] = frozenset({"serve"})

#: Stages that deploy a long-running service: they act on every run (a local Ray cluster, and the
#: service with it, does not outlive `kubedistill run`), so a manifest never makes them skip.
SERVICES: frozenset[str] = frozenset({"serve"})


def gate_blocks(evaluate_manifest: dict[str, Any] | None) -> str | None:
    """The gate's verdict from the evaluate stage's manifest: why promotion is blocked, or None."""
    if evaluate_manifest is None:
        return "the evaluate stage has not succeeded"
    verdict = evaluate_manifest["metrics"]["gate"]
    if verdict["candidate"] != "student":
        return "no student was evaluated"
    return None if verdict["passed"] else verdict["reason"]


#: Dotted spec paths (camelCase, as on the wire) each stage's config carries.
_READS: dict[str, tuple[str, ...]] = {
    "data": ("data", "labels"),
    "teacher-dapt": ("teacher.baseModel", "teacher.dapt", "teacher.resources", "teacher.maxFailures"),
    "teacher-sft": ("labels", "teacher.sft", "teacher.resources", "teacher.maxFailures"),
    "reward-model": ("labels", "teacher.rewardModel", "teacher.resources", "teacher.maxFailures"),
    "teacher-dpo": (
        "labels",
        "teacher.dpo",
        "teacher.rewardModel.dimensions",
        "teacher.resources",
        "teacher.maxFailures",
    ),
    "annotate": ("labels", "annotation"),
    "student-crsd": ("labels", "student"),
    "evaluate": ("labels", "evaluation", "student.compareObjectives"),
    "prune-search": ("labels", "pruning", "teacher.resources"),
    "serve": ("labels", "serving"),
}


@dataclass(frozen=True)
class Stage:
    name: str
    depends_on: tuple[str, ...]
    config: dict[str, Any]
    resources: Resources
    entrypoint: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entrypoint", f"python jobs/{self.name.replace('-', '_')}.py")

    @property
    def config_json(self) -> str:
        return json.dumps(self.config, sort_keys=True, separators=(",", ":"))

    @property
    def config_hash(self) -> str:
        """Hash of what the stage's result depends on (storage location excluded)."""
        return config_hash(self.config)


def _dig(doc: dict[str, Any], dotted: str) -> Any:
    cur: Any = doc
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def _put(doc: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = doc
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value


def _dependencies(run: DistillationRun) -> dict[str, tuple[str, ...]]:
    s = run.spec
    t, a, st = s.teacher.enabled, s.annotation.enabled, s.student.enabled
    deps: dict[str, tuple[str, ...]] = {"data": ()}
    if t:
        deps["teacher-dapt"] = ("data",)
        deps["teacher-sft"] = ("data", "teacher-dapt")
        deps["reward-model"] = ("data", "teacher-sft")
        deps["teacher-dpo"] = ("data", "teacher-sft", "reward-model")
    if a:
        deps["annotate"] = ("data", "teacher-dpo") if t else ("data",)
    if st:
        deps["student-crsd"] = ("data", "annotate") if a else ("data",)
    # the baseline learns from the rows the student learns from: annotate's when the run annotates
    deps["evaluate"] = ("data",) + (("annotate",) if a else ()) + (("student-crsd",) if st else ())
    if s.pruning.enabled and t:
        deps["prune-search"] = ("data", "teacher-dpo")
    if s.serving.enabled and st:
        deps["serve"] = ("student-crsd", "evaluate")
    return deps


def _resources(run: DistillationRun, name: str) -> Resources:
    s = run.spec
    if name.startswith("teacher-") or name in ("reward-model", "prune-search"):
        return s.teacher.resources
    if name == "student-crsd":
        return s.student.resources
    if name == "annotate":
        a = s.annotation
        return Resources(workers=a.replicas.max, cpus_per_worker=a.cpus_per_replica, gpus_per_worker=a.gpus_per_replica)
    return Resources(workers=1, cpus_per_worker=1, gpus_per_worker=0)


def build(run: DistillationRun) -> list[Stage]:
    """The run's stages in execution order (disabled ones left out)."""
    wire = to_wire(run.spec)
    deps = _dependencies(run)
    stages = []
    for name in STAGE_ORDER:
        if name not in deps:
            continue
        section: dict[str, Any] = {}
        for dotted in _READS[name]:
            _put(section, dotted, _dig(wire, dotted))
        config = {
            "run": run.name,
            "stage": name,
            "storage": {k: wire["storage"][k] for k in ("uri", "endpoint", "region")},
            "inputs": list(deps[name]),
            "spec": section,
        }
        stages.append(Stage(name, deps[name], config, _resources(run, name)))
    return stages


def render_plan(run: DistillationRun, stages: list[Stage]) -> str:
    lines = [f"DistillationRun {run.name}: {len(stages)} stage(s), storage {run.spec.storage.uri}"]
    for i, s in enumerate(stages, 1):
        r = s.resources
        res = f"{r.workers}x({r.cpus_per_worker:g} cpu" + (
            f", {r.gpus_per_worker:g} gpu)" if r.gpus_per_worker else ")"
        )
        after = ", ".join(s.depends_on) or "-"
        lines.append(f"  {i:>2}. {s.name:<13} after: {after:<36} {res:<18} {s.entrypoint}")
    skipped = [n for n in STAGE_ORDER if n not in {s.name for s in stages}]
    if skipped:
        lines.append(f"  disabled: {', '.join(skipped)}")
    return "\n".join(lines)
