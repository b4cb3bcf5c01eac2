"""The manifest and skip-if-done rule every stage shares."""

import json

import pytest

from kubedistill.core import stage
from kubedistill.core.stage import MANIFEST, StageContext, execute


def _ctx(tmp_path, name="data", inputs=(), spec=None, service=False):
    cfg = {"run": "r", "stage": name, "storage": {"uri": str(tmp_path)}, "inputs": list(inputs),
           "spec": spec or {"labels": ["a", "b"]}, **({"service": True} if service else {})}
    return StageContext(cfg, stage.run_storage(cfg))


def test_manifest_is_written_last_with_hash_inputs_and_metrics(tmp_path):
    seen = {}

    def fn(ctx):
        ctx.out.write_text("out.txt", "x")
        seen["manifest_during_run"] = ctx.storage.exists(f"data/{MANIFEST}")
        return {"metrics": {"rows": 3}, "outputs": {"out": ctx.out.uri("out.txt")}}

    m = execute(_ctx(tmp_path), fn)
    assert seen["manifest_during_run"] is False
    on_disk = json.loads((tmp_path / "r" / "data" / MANIFEST).read_text())
    assert on_disk == m
    assert m["metrics"] == {"rows": 3} and m["inputs"] == {} and len(m["digest"]) == 16
    assert m["configHash"] == stage.config_hash(_ctx(tmp_path).config)


def test_done_stage_is_skipped_and_changed_config_reruns(tmp_path):
    calls = []

    def fn(ctx):
        calls.append(1)
        return {"metrics": {}}

    execute(_ctx(tmp_path), fn)
    execute(_ctx(tmp_path), fn)
    assert len(calls) == 1
    execute(_ctx(tmp_path, spec={"labels": ["a", "b", "c"]}), fn)
    assert len(calls) == 2


def test_upstream_rerun_invalidates_downstream(tmp_path):
    calls = []

    def fn(ctx):
        calls.append(ctx.name)
        return {"metrics": {"n": len(calls)}}

    execute(_ctx(tmp_path), fn)
    execute(_ctx(tmp_path, "evaluate", ["data"]), fn)
    assert stage.is_done(stage.run_storage(_ctx(tmp_path).config), _ctx(tmp_path, "evaluate", ["data"]).config)
    execute(_ctx(tmp_path, spec={"labels": ["x", "y"]}), fn)  # data redone: new digest
    assert not stage.is_done(stage.run_storage(_ctx(tmp_path).config), _ctx(tmp_path, "evaluate", ["data"]).config)
    execute(_ctx(tmp_path, "evaluate", ["data"]), fn)
    assert calls == ["data", "evaluate", "data", "evaluate"]


def test_missing_input_fails_before_running(tmp_path):
    with pytest.raises(RuntimeError, match=r"input stage\(s\) \['data'\] have not succeeded"):
        execute(_ctx(tmp_path, "evaluate", ["data"]), lambda ctx: {})


def test_failure_writes_failed_marker_and_removes_stale_manifest(tmp_path):
    execute(_ctx(tmp_path), lambda ctx: {"metrics": {}})

    def boom(ctx):
        raise ValueError("spec.data.evalSet: empty")

    with pytest.raises(ValueError):
        execute(_ctx(tmp_path, spec={"labels": ["changed", "b"]}), boom)
    run = tmp_path / "r" / "data"
    assert not (run / MANIFEST).exists()
    failed = json.loads((run / stage.FAILURE).read_text())
    assert failed["error"] == "ValueError: spec.data.evalSet: empty"
    # a later success clears the failure marker
    execute(_ctx(tmp_path), lambda ctx: {"metrics": {}})
    assert (run / MANIFEST).exists() and not (run / stage.FAILURE).exists()


def test_context_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv(stage.CONFIG_ENV, raising=False)
    with pytest.raises(SystemExit, match="KUBEDISTILL_STAGE_CONFIG"):
        StageContext.from_env()
    monkeypatch.setenv(stage.CONFIG_ENV, json.dumps(_ctx(tmp_path, "evaluate", ["data"]).config))
    ctx = StageContext.from_env()
    assert ctx.out.uri() == f"{tmp_path}/r/evaluate"
    assert ctx.input("data").uri() == f"{tmp_path}/r/data"
    with pytest.raises(KeyError):
        ctx.input("teacher-sft")


def test_a_service_stage_acts_on_every_run(tmp_path):
    calls = []

    def fn(ctx):
        calls.append(ctx.name)
        return {"outputs": {"url": f"http://127.0.0.1:8000/score#{len(calls)}"}}

    execute(_ctx(tmp_path), lambda ctx: {})
    first = execute(_ctx(tmp_path, "serve", ["data"], service=True), fn)
    second = execute(_ctx(tmp_path, "serve", ["data"], service=True), fn)  # a local cluster's app died with the last run
    assert calls == ["serve", "serve"] and first["outputs"] != second["outputs"]
    execute(_ctx(tmp_path, "evaluate", ["data"]), fn)
    execute(_ctx(tmp_path, "evaluate", ["data"]), fn)  # a batch stage: done, skipped
    assert calls == ["serve", "serve", "evaluate"]
