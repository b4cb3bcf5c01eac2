"""A newcomer's stage: one function and one registry entry, and every part of the pipeline runs it.

`toy_stage` below is the whole stage. Appending its `StageDef` to the registry is the only edit: the plan
lists it, the operator's renderer gives it a RayJob that KubeRay's schema accepts, and the local runner
runs it as a Ray job after its input, with a manifest, skipped when done.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from kubedistill.core.stage import StageContext
from tests.conftest import artifact


def toy_stage(ctx: StageContext) -> dict[str, Any]:
    """Count the eval rows per label: reads its declared input and spec path, writes its own output."""
    from collections import Counter

    from kubedistill.stages.data import read_dataset

    rows = read_dataset(ctx.input("data").child("eval"))
    counts = Counter(r["label"] for r in rows)
    ctx.out.write_json("counts.json", {label: counts[label] for label in ctx.spec.labels})
    return {"metrics": {"rows": len(rows)}, "outputs": {"counts": ctx.out.uri("counts.json")}}


@pytest.mark.ray
@pytest.mark.slow
def test_a_toy_stage_is_one_function_and_one_registry_entry(monkeypatch, tmp_path, ray_address):
    from kubedistill import runner
    from kubedistill.cluster import k8s
    from kubedistill.core import pipeline, registry, spec
    from kubedistill.core.storage import Storage
    from tests.conftest import ROOT
    from tests.integration.test_runner import _doc
    from tests.kuberay import errors

    toy = registry.StageDef("toy-count", f"{__name__}:toy_stage", reads=("labels",), inputs=lambda s: ("data",))
    monkeypatch.setattr(registry, "STAGES", (*registry.STAGES, toy))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the local jobs import what this process imports
    run = spec.parse_run(_doc(str(tmp_path / "store"), name="toy"))

    plan = pipeline.render_plan(run, pipeline.build(run))
    assert [line.split()[1] for line in plan.splitlines()[1:4]] == ["data", "evaluate", "toy-count"]
    assert f"{__name__}:toy_stage" in plan.splitlines()[3]

    job = [o for o in k8s.render(run, uid="u1") if o["kind"] != "NetworkPolicy"][-1]
    assert job["kind"] == "RayJob" and job["metadata"]["labels"]["kubedistill.io/stage"] == "toy-count"
    assert job["spec"]["entrypoint"] == f"python -m kubedistill.job {__name__}:toy_stage"
    assert errors(job) == []

    out = io.StringIO()
    status = runner.run_local(run, address=ray_address, out=out)
    assert [(s.name, s.phase) for s in status.stages] == [
        ("data", "Succeeded"), ("evaluate", "Succeeded"), ("toy-count", "Succeeded")]
    st = Storage(str(tmp_path / "store" / "toy"))
    counts = artifact(st, "toy-count").read_json("counts.json")
    assert list(counts) == run.spec.labels and sum(counts.values()) == 80  # the SMALL eval set
    manifest = st.read_json("toy-count/_SUCCESS.json")
    assert manifest["metrics"] == {"rows": 80} and manifest["inputs"] == {"data": st.read_json("data/_SUCCESS.json")["digest"]}
    again = io.StringIO()
    runner.run_local(run, address=ray_address, out=again)
    assert "[3/3] toy-count: done earlier, skipped" in again.getvalue()
