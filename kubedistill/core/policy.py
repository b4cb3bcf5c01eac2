"""The step policy both executors follow: what each stage of a run needs, from its manifests alone.

`kubedistill run` (the local runner) and the operator (`kubedistill.cluster.reconcile`) both call
`steps`; neither has a rule of its own for when a stage counts as done. A stage is **done** only when
its manifest matches its config hash *and* the digests of its inputs' current manifests, and every one
of its inputs is done itself. So a change anywhere upstream makes the whole downstream stale at once,
before the upstream stage has even rerun, and nothing is reported `Succeeded` on old inputs.

For each stage, in graph order, `steps` says one of:

- `done`: its manifest follows from the spec and its inputs as they are now;
- `stale`: it has a manifest, and the manifest no longer follows (the reason says which: its config,
  or which input changed or is being rebuilt);
- `runnable`: no manifest, every input done;
- `blocked`: no manifest, and an input is not done yet;
- `skipped`: a gated stage whose gate has not passed (the reason is the gate's).

`ready` says whether its inputs are all done: a `stale` or `runnable` stage runs when it is ready. A
service stage (`serve`) has no "done": it acts whenever it is ready and its gate passed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from kubedistill.core.pipeline import Stage, gate_blocks

NOT_PROMOTED = "not promoted: "
StepState = Literal["done", "stale", "runnable", "blocked", "skipped"]
Manifests = Callable[[str], dict[str, Any] | None]


@dataclass(frozen=True)
class Step:
    state: StepState
    #: every input is done: a `stale` or `runnable` stage may run now
    ready: bool
    #: why the stage is not done (None when it is)
    reason: str | None = None
    #: what made a `stale` stage stale: its own config, or one of its inputs
    cause: Literal["config", "input"] | None = None

    @property
    def gate_reason(self) -> str:
        """Why the gate did not promote (a `skipped` step's reason without its prefix)."""
        return (self.reason or "").removeprefix(NOT_PROMOTED)

    @property
    def should_run(self) -> bool:
        return self.ready and self.state in ("stale", "runnable")


def _changed_input(stage: Stage, manifest: dict[str, Any], manifests: Manifests) -> str | None:
    """The first input whose current manifest digest differs from the one `manifest` was built from."""
    recorded = manifest.get("inputs") or {}
    for dep in stage.depends_on:
        current = manifests(dep)
        if current is None or recorded.get(dep) != current.get("digest"):
            return dep
    return None


def inputs_key(stage: Stage, manifests: Manifests) -> str | None:
    """A digest of the stage's inputs' current manifests (None while one is missing): what an attempt ran on."""
    digests = {}
    for dep in stage.depends_on:
        m = manifests(dep)
        if m is None:
            return None
        digests[dep] = m.get("digest")
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


def step(stage: Stage, manifests: Manifests, earlier: dict[str, Step]) -> Step:
    """The step of one stage, given the steps of the stages before it."""
    waiting = [d for d in stage.depends_on if earlier[d].state != "done"]
    ready = not waiting
    if stage.gated and ready and (why := gate_blocks(manifests("evaluate"))):
        return Step("skipped", ready, f"{NOT_PROMOTED}{why}")
    if stage.service:
        return Step("runnable", ready, None if ready else f"waiting for {', '.join(waiting)}")
    manifest = manifests(stage.name)
    if manifest is None:
        return Step("runnable", True) if ready else Step("blocked", False, f"waiting for {', '.join(waiting)}")
    if manifest.get("configHash") != stage.config_hash:
        return Step("stale", ready, "its config changed", "config")
    if waiting:
        why = earlier[waiting[0]].reason
        return Step("stale", False, f"input {waiting[0]} is being rebuilt" + (f" ({why})" if why else ""), "input")
    if (dep := _changed_input(stage, manifest, manifests)) is not None:
        return Step("stale", True, f"input {dep} changed", "input")
    return Step("done", True)


def steps(stages: list[Stage], manifests: Manifests) -> dict[str, Step]:
    """The step of every stage of a run, in graph order (`stages` as `pipeline.build` returns them)."""
    out: dict[str, Step] = {}
    for s in stages:
        out[s.name] = step(s, manifests, out)
    return out
