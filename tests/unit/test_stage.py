"""The manifest and skip-if-done rule every stage shares."""

import hashlib
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
    # the hash of the stage's config as written down (keys sorted), the keys that do not change results left out
    config = {k: v for k, v in _ctx(tmp_path).config.items() if k not in stage.UNHASHED}
    assert m["configHash"] == hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


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
    with pytest.raises(RuntimeError, match="no version yet"):
        ctx.out  # noqa: B018 - outputs are written inside execute, under the version it picks
    with pytest.raises(FileNotFoundError, match="the stage's manifest is gone"):
        ctx.input("data")
    data = execute(_ctx(tmp_path), lambda ctx: {})
    assert ctx.input("data").uri() == data["artifact"] == f"{tmp_path}/r/data/v-{data['version']}"
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


# -- versions ----------------------------------------------------------------------------------


def _write(name):
    def fn(ctx):
        ctx.out.write_text("model.bin", name)
        return {"outputs": {"model": ctx.out.uri("model.bin")}}

    return fn


def test_each_version_is_written_beside_the_others_and_never_over_them(tmp_path):
    root = stage.run_storage(_ctx(tmp_path).config)
    a = execute(_ctx(tmp_path), _write("a"))
    built_from = json.dumps({"config": a["configHash"], "inputs": {}}, sort_keys=True).encode()
    assert a["version"] == hashlib.sha256(built_from).hexdigest()[:16]  # what it is built from, nothing else
    assert a["artifact"] == root.uri(f"data/v-{a['version']}")
    assert stage.read_manifest(root, "data", a["version"]) == a  # the version keeps its own manifest
    b = execute(_ctx(tmp_path, spec={"labels": ["x", "y"]}), _write("b"))
    assert b["version"] != a["version"]
    assert root.read_text(f"data/v-{a['version']}/model.bin") == "a" and root.read_text(f"data/v-{b['version']}/model.bin") == "b"
    assert stage.read_manifest(root, "data") == b
    # downstream reads the version its input's manifest names, not a fixed path
    seen = []
    execute(_ctx(tmp_path, "evaluate", ["data"]), lambda ctx: seen.append(ctx.input("data").read_text("model.bin")) or {})
    assert seen == ["b"]


def test_an_undone_edit_gets_its_version_back_without_rerunning_and_downstream_is_done_again(tmp_path):
    calls = []

    def fn(ctx):
        calls.append(ctx.name)
        return _write(ctx.name)(ctx)

    root = stage.run_storage(_ctx(tmp_path).config)
    a = execute(_ctx(tmp_path), fn)
    ev = execute(_ctx(tmp_path, "evaluate", ["data"]), fn)
    execute(_ctx(tmp_path, spec={"labels": ["x", "y"]}), fn)  # edit ...
    assert not stage.is_done(root, _ctx(tmp_path, "evaluate", ["data"]).config)
    assert execute(_ctx(tmp_path), fn) == a  # ... undone: the same manifest, digest and all, and no training
    assert calls == ["data", "evaluate", "data"]
    assert stage.is_done(root, _ctx(tmp_path, "evaluate", ["data"]).config)  # so evaluate is done again as it was
    assert execute(_ctx(tmp_path, "evaluate", ["data"]), fn) == ev and calls == ["data", "evaluate", "data"]


def _labels(i):
    return {"labels": [f"l{i}", "b"]}


def test_retention_keeps_the_newest_versions_the_promoted_student_and_the_one_being_built(tmp_path):
    def ctx(i, name="data"):
        c = _ctx(tmp_path, name, spec=_labels(i))
        c.config["retention"] = {"keepVersions": 2}
        return c

    root = stage.run_storage(_ctx(tmp_path).config)
    versions = [execute(ctx(i), _write(str(i)))["version"] for i in range(3)]
    assert root.dirs("data") == sorted(f"v-{v}" for v in versions[1:])  # the oldest is gone
    assert stage.config_hash(ctx(0).config) == stage.config_hash(_ctx(tmp_path, spec=_labels(0)).config)  # not hashed

    # the student a RayService may still serve is kept while newer versions fail the gate
    root.write_json(stage.PROMOTED, {"stage": "data", "version": versions[1]})
    for i in (3, 4):
        versions.append(execute(ctx(i), _write(str(i)))["version"])
    assert root.dirs("data") == sorted(f"v-{v}" for v in (versions[1], versions[3], versions[4]))

    # an attempt that failed leaves a partial version; it goes once a newer version is complete
    def dies(c):
        c.out.write_text("half.bin", "x")
        raise ValueError("died")

    with pytest.raises(ValueError, match="died"):
        execute(ctx(5), dies)
    failed = stage.version_key(stage.config_hash(ctx(5).config), {})
    assert root.exists(f"data/v-{failed}/half.bin")
    execute(ctx(6), _write("6"))
    assert not root.exists(f"data/v-{failed}")
    # the version the latest attempt is building is never pruned under it
    building = stage.version_key("in-progress", {})
    root.write_text(f"data/v-{building}/part.bin", "x")
    root.write_json(f"data/{stage.ATTEMPT}", {"token": "t", "version": building})
    assert building not in stage.prune_versions(root, "data", 1) and root.exists(f"data/v-{building}/part.bin")


def test_a_failure_to_prune_leaves_the_finished_result_standing(tmp_path, monkeypatch, capsys):
    from kubedistill.core.storage import Storage, StorageError

    def unreachable(self, rel=""):
        raise StorageError(f"{self.uri(rel)}: listing refused")

    monkeypatch.setattr(Storage, "dirs", unreachable)
    m = execute(_ctx(tmp_path), _write("a"))
    assert stage.read_manifest(stage.run_storage(_ctx(tmp_path).config), "data") == m
    assert "could not prune old versions: StorageError" in capsys.readouterr().out
