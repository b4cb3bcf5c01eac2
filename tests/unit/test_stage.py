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


def _in_thread(fn):
    """Run `fn` in a thread; the thread and a list that receives its exception (or its result)."""
    import threading

    out: list = []

    def target():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            out.append(e)

    th = threading.Thread(target=target)
    th.start()
    return th, out


@pytest.mark.parametrize("old_fails", [False, True])
def test_two_attempts_racing_on_one_prefix_only_the_latest_writes_its_result(tmp_path, old_fails):
    """Attempt 1 is still running when attempt 2 starts and finishes (its executor gave up on 1): when 1
    ends, it writes neither its manifest nor a failure over 2's result. The interleaving is driven by
    events, not by sleeping."""
    import threading

    execute(_ctx(tmp_path), lambda ctx: {})  # the input
    old_running, new_done = threading.Event(), threading.Event()

    def old(ctx):
        old_running.set()
        assert new_done.wait(30)
        if old_fails:
            raise RuntimeError("the old attempt's node went away")
        return {"metrics": {"attempt": 1}}

    th, out = _in_thread(lambda: execute(_ctx(tmp_path, "evaluate", ["data"]), old))
    assert old_running.wait(30)
    new = execute(_ctx(tmp_path, "evaluate", ["data"]), lambda ctx: {"metrics": {"attempt": 2}})
    new_done.set()
    th.join(30)
    if old_fails:
        assert isinstance(out[0], RuntimeError) and "node went away" in str(out[0]), out
    else:
        assert isinstance(out[0], stage.Superseded) and "a newer attempt" in str(out[0]), out
    root = stage.run_storage(_ctx(tmp_path).config)
    assert stage.read_manifest(root, "evaluate") == new and new["metrics"] == {"attempt": 2}
    assert not root.exists(f"evaluate/{stage.FAILURE}")


@pytest.mark.parametrize(("content", "says"), [(b"{not json", "not JSON"), (b"[1, 2]", "not an object with a digest"),
                                               (b'{"configHash": "x"}', "not an object with a digest")])
def test_a_corrupt_manifest_is_named_with_its_uri_never_read_as_a_result(tmp_path, content, says):
    root = stage.run_storage(_ctx(tmp_path).config)
    root.write_bytes(f"data/{MANIFEST}", content)
    with pytest.raises(stage.CorruptManifest, match=rf"its manifest .*data/_SUCCESS.json is corrupt \({says}"):
        stage.read_manifest(root, "data")
