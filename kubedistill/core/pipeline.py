"""DistillationRun spec -> ordered stage graph, from the stage registry (`kubedistill.core.registry`).

Each stage's config carries only the spec paths its registry entry reads; its config hash covers those
plus its inputs, so changing (say) `spec.serving` reruns `serve` and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubedistill.core import registry
from kubedistill.core.spec import DistillationRun, Resources, to_wire
from kubedistill.core.stage import config_hash

#: How every stage's Ray job starts; the config travels in an env var, never in this text.
JOB_COMMAND = "python -m kubedistill.job"


def gate_blocks(evaluate_manifest: dict[str, Any] | None) -> str | None:
    """The gate's verdict from the evaluate stage's manifest: why promotion is blocked, or None."""
    if evaluate_manifest is None:
        return "the evaluate stage has not succeeded"
    verdict = evaluate_manifest["metrics"]["gate"]
    if verdict["candidate"] != "student":
        return "no student was evaluated"
    return None if verdict["passed"] else verdict["reason"]


def promoted_model(manifests: Callable[[str], dict[str, Any] | None]) -> str | None:
    """The student model to serve: the version the evaluate stage scored (and its gate passed), by URI.

    Evaluate names the model it evaluated in its outputs; a manifest from before it did falls back to the
    student-crsd manifest it was built from."""
    evaluated = manifests("evaluate")
    if evaluated and (uri := (evaluated.get("outputs") or {}).get("model")):
        return str(uri)
    student = manifests("student-crsd")
    return str(student["outputs"]["model"]) if student and "model" in (student.get("outputs") or {}) else None


@dataclass(frozen=True)
class Served:
    """What the serve stage deploys: the promoted model's URI and the runtime that scores with it."""

    model: str
    runtime: str


def promoted(
    manifests: Callable[[str], dict[str, Any] | None], requested: str | None, gpu: bool = False
) -> Served | None:
    """The promoted model and its runtime: `requested` (spec.serving.runtime) when its check on the eval set
    passed, else, unset, the one evaluate picked (the fastest on CPUs that passed), or torch on GPU replicas
    (`gpu`; ONNX Runtime scores on CPUs here). ValueError, naming the field, when the requested runtime failed
    its check or was never checked; None when there is no model to serve."""
    model = promoted_model(manifests)
    if model is None:
        return None
    if gpu and requested in (None, "torch"):
        return Served(model, "torch")
    evaluated = manifests("evaluate") or {}
    checks = (evaluated.get("metrics") or {}).get("runtimes") or {}
    if not checks:  # no evaluation of the exports (none ran, or one from before them): the native model only
        if requested in (None, "torch"):
            return Served(model, "torch")
        raise ValueError(
            f"spec.serving.runtime: {requested} was never checked on the eval set (the evaluate stage did not score "
            "the exports); leave it unset or set torch"
        )
    runtime = requested or (evaluated.get("outputs") or {}).get("runtime") or "torch"
    check = checks.get(runtime)
    if check is None or not check.get("passed"):
        why = check["reason"] if check else "not exported"
        raise ValueError(
            f"spec.serving.runtime: {runtime} failed its check on the eval set ({why}); leave it unset "
            "to serve the fastest runtime that passed"
        )
    return Served(model, runtime)


@dataclass(frozen=True)
class Stage:
    """One stage of one run: its registry entry, resolved against the run's spec."""

    name: str
    depends_on: tuple[str, ...]
    config: dict[str, Any]
    resources: Resources
    #: (min, max) workers of its Ray cluster; equal unless the stage autoscales
    workers: tuple[int, int]
    #: the stage's body, `module:function` (its registry entry's `run`)
    target: str
    service: bool = False
    gated: bool = False

    @property
    def entrypoint(self) -> str:
        """The job's command: fixed text, user strings travel only in the config's env var."""
        return f"{JOB_COMMAND} {self.target}"

    @property
    def config_json(self) -> str:
        return json.dumps(self.config, sort_keys=True, separators=(",", ":"))

    @property
    def config_hash(self) -> str:
        """Hash of what the stage's result depends on (storage location excluded)."""
        return config_hash(self.config)


class RegistryError(ValueError):
    """A stage declaration that cannot be built into a graph (a bug in the registry, not in a spec)."""


def _dig(doc: dict[str, Any], dotted: str, stage: str) -> Any:
    cur: Any = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise RegistryError(f"stage {stage}: reads spec.{dotted}, which the DistillationRun spec does not have")
        cur = cur[part]
    return cur


def _put(doc: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = doc
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value


def _ordered(run: DistillationRun) -> list[tuple[registry.StageDef, tuple[str, ...]]]:
    """The enabled stages with their inputs, each after its inputs: at every step the first stage in registry
    order whose inputs are all placed (so the order follows the registry wherever the spec allows)."""
    todo = [(d, inputs) for d in registry.STAGES if (inputs := d.inputs(run.spec)) is not None]
    enabled = {d.name for d, _ in todo}
    for d, inputs in todo:
        if unknown := [i for i in inputs if i not in enabled]:
            raise RegistryError(f"stage {d.name}: input(s) {unknown} are not enabled stages")
    placed: list[tuple[registry.StageDef, tuple[str, ...]]] = []
    while todo:
        done = {d.name for d, _ in placed}
        ready = next((i for i, (_, inputs) in enumerate(todo) if set(inputs) <= done), None)
        if ready is None:
            raise RegistryError(f"stages {[d.name for d, _ in todo]} wait on each other (a cycle)")
        placed.append(todo.pop(ready))
    return placed


def build(run: DistillationRun) -> list[Stage]:
    """The run's enabled stages, each after its inputs (`_ordered`)."""
    wire = to_wire(run.spec)
    stages: list[Stage] = []
    for d, inputs in _ordered(run):
        section: dict[str, Any] = {}
        for dotted in d.reads:
            _put(section, dotted, _dig(wire, dotted, d.name))
        config: dict[str, Any] = {
            "run": run.name,
            "stage": d.name,
            "storage": {k: wire["storage"][k] for k in ("uri", "endpoint", "region")},
            "retention": wire["retention"],
            "inputs": list(inputs),
            "spec": section,
        }
        if d.service:
            config["service"] = True
        if code := d.code(run.spec):
            config["code"] = code
        resources = d.resources(run.spec)
        workers = d.autoscale(run.spec) if d.autoscale else (resources.workers, resources.workers)
        stages.append(Stage(d.name, inputs, config, resources, workers, d.run, d.service, d.gated))
    return stages


def render_plan(run: DistillationRun, stages: list[Stage], memory: dict[str, str] | None = None) -> str:
    """The stage graph, one line per stage; `memory`: a line per training stage (`kubedistill.core.memory`)."""
    lines = [f"DistillationRun {run.name}: {len(stages)} stage(s), storage {run.spec.storage.uri}"]
    for i, s in enumerate(stages, 1):
        r = s.resources
        res = f"{r.workers}x({r.cpus_per_worker:g} cpu" + (
            f", {r.gpus_per_worker:g} gpu)" if r.gpus_per_worker else ")"
        )
        after = ", ".join(s.depends_on) or "-"
        lines.append(f"  {i:>2}. {s.name:<13} after: {after:<36} {res:<18} {s.target}")
        if memory and s.name in memory:
            lines.append(f"      {memory[s.name]}")
    skipped = [d.name for d in registry.STAGES if d.name not in {s.name for s in stages}]
    if skipped:
        lines.append(f"  disabled: {', '.join(skipped)}")
    return "\n".join(lines)


def registry_markdown() -> str:
    """The README's table of the registry: each stage's function, the spec paths it reads, its inputs with
    every stage enabled (annotation mode both), and how it runs (`make docs`)."""
    from kubedistill.core.spec import parse_run

    run = parse_run(
        {
            "apiVersion": "kubedistill.io/v1alpha1",
            "kind": "DistillationRun",
            "metadata": {"name": "all"},
            "spec": {"storage": {"uri": "s3://bucket/runs"}, "annotation": {"mode": "both"}},
        }
    )
    built = {s.name: s for s in build(run)}
    lines = ["| stage | runs | reads `spec.` | inputs (every stage enabled) | |", "|---|---|---|---|---|"]
    for d in registry.STAGES:
        s = built[d.name]
        kind = ", ".join(k for k, on in (("service", d.service), ("gated", d.gated), ("autoscaled", d.autoscale)) if on)
        reads = ", ".join(f"`{r}`" for r in d.reads)
        lines.append(f"| `{d.name}` | `{d.run}` | {reads} | {', '.join(s.depends_on) or '-'} | {kind} |")
    return "\n".join(lines) + "\n"
