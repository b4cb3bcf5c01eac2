"""What every stage job shares: its config, its versioned storage prefix, and the `_SUCCESS.json` manifest.

Artifacts are versioned and never overwritten. A stage's version is a digest of its config hash and
its inputs' manifest digests; an attempt writes its outputs under `<storage.uri>/<run>/<stage>/v-<version>/`
and, *last*, the manifest: first the version's own copy (`v-<version>/_SUCCESS.json`), then the stage's
current one (`<stage>/_SUCCESS.json`), which names the version (`version`, `artifact`). Downstream
stages read an input where its current manifest points (`StageContext.input`), so a rerun writes
beside the outputs it replaces and a reader (a serving replica, an evaluation) never sees a mix of
two versions. A stage whose manifest matches its config and inputs is done and is skipped, which is
how a restarted run resumes; one whose version was built before (an edit undone) gets its manifest
back without rerunning. A retry of a failed attempt has the same version, so it resumes from what the
failed attempt left there (checkpoints, finished shards). After a success the stage prunes its old
versions: it keeps the newest `spec.retention.keepVersions` (default 3) and the promoted student
(`_PROMOTED.json`, written by the evaluation gate). A stage that fails writes `_FAILED.json` (never a
manifest), so nothing downstream mistakes it for a result.

Attempts are fenced: each writes its token to `_ATTEMPT.json` when it starts, and writes its manifest
(or `_FAILED.json`) only if the token is still its own, so an old attempt that outlives its executor's
patience (a job that was stopped but keeps running, a RayJob deleted in the background) never
overwrites a newer attempt's result. The check and the write are two requests: the operator also
waits for a failed attempt's cluster to be gone before it starts the next one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubedistill.core import driverlog, progress
from kubedistill.core.holds import hold
from kubedistill.core.spec import DistillationRunSpec, spec_slice
from kubedistill.core.storage import S3Options, Storage, StorageError

CONFIG_ENV = "KUBEDISTILL_STAGE_CONFIG"
#: what every stage job's environment has, from either executor (the Ray job's runtime env, which its tasks and
#: Ray Train workers inherit):
#: - Ray Train's print patch off: it logs a worker's print through its logger *and* prints it, so every line a
#:   worker printed reached the job log twice
#: - tqdm's bars off: carriage-return bars garble a job log; stages report progress themselves (`progress`)
JOB_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TQDM_DISABLE": "1"}
MANIFEST = "_SUCCESS.json"
FAILURE = "_FAILED.json"
#: the token of the stage's latest attempt: only that attempt may write the manifest or the failure
ATTEMPT = "_ATTEMPT.json"
#: at the run's root: the student version the evaluation gate promoted last (the one to serve)
PROMOTED = "_PROMOTED.json"
VERSION_PREFIX = "v-"
KEEP_VERSIONS = 3
#: config keys that say where and how long artifacts are kept, not what they are (not in the config hash)
UNHASHED = ("storage", "retention")


class Superseded(RuntimeError):
    """A newer attempt of the stage started while this one ran: this one's result is not written."""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def config_hash(config: dict[str, Any]) -> str:
    keyed = {k: v for k, v in config.items() if k not in UNHASHED}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def version_key(config_hash: str, inputs: dict[str, str]) -> str:
    """A stage's version: what it is built from (its config hash and its inputs' manifest digests)."""
    return hashlib.sha256(json.dumps({"config": config_hash, "inputs": inputs}, sort_keys=True).encode()).hexdigest()[
        :16
    ]


def version_dir(stage: str, version: str) -> str:
    """Where a version of a stage lives, relative to the run's root."""
    return f"{stage}/{VERSION_PREFIX}{version}"


def run_prefix(storage_uri: str, run: str) -> str:
    """Where a run keeps everything: `<spec.storage.uri>/<run name>`."""
    return f"{storage_uri.rstrip('/')}/{run}"


def run_storage(config: dict[str, Any]) -> Storage:
    st = config["storage"]
    return Storage(run_prefix(st["uri"], config["run"]), S3Options.from_env(st.get("endpoint"), st.get("region")))


class CorruptManifest(ValueError):
    """A stage's `_SUCCESS.json` that is not a manifest (not JSON, or not an object with a digest)."""

    def __init__(self, stage: str, uri: str, problem: str):
        self.stage = stage
        super().__init__(f"its manifest {uri} is corrupt ({problem}): delete it to rerun the stage")


def read_manifest(storage: Storage, stage: str, version: str | None = None) -> dict[str, Any] | None:
    """The stage's current manifest (or a version's own copy); None when there is none; `CorruptManifest`
    when what is there is not one."""
    rel = f"{version_dir(stage, version) if version else stage}/{MANIFEST}"
    try:
        raw = storage.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(raw)
    except ValueError as e:  # not UTF-8, not JSON
        raise CorruptManifest(stage, storage.uri(rel), f"not JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("digest"), str):
        raise CorruptManifest(stage, storage.uri(rel), "not an object with a digest")
    return manifest


def must_read_manifest(storage: Storage, stage: str) -> dict[str, Any]:
    """The manifest of a stage known to have succeeded."""
    m = read_manifest(storage, stage)
    if m is None:
        raise FileNotFoundError(f"{storage.uri(f'{stage}/{MANIFEST}')}: the stage's manifest is gone")
    return m


def input_digests(storage: Storage, inputs: list[str]) -> dict[str, str] | None:
    """Digest of each input's manifest; None if any input has not finished."""
    out = {}
    for name in inputs:
        m = read_manifest(storage, name)
        if m is None:
            return None
        out[name] = m["digest"]
    return out


def is_done(storage: Storage, config: dict[str, Any]) -> bool:
    """The skip-if-done rule: a manifest exists for this exact config and these exact inputs."""
    m = read_manifest(storage, config["stage"])
    if m is None or m.get("configHash") != config_hash(config):  # no input read for a changed config
        return False
    return _built_from(m, config, input_digests(storage, config["inputs"]))


def _built_from(manifest: dict[str, Any], config: dict[str, Any], inputs: dict[str, str] | None) -> bool:
    return manifest.get("configHash") == config_hash(config) and manifest.get("inputs") == inputs


@dataclass
class StageContext:
    config: dict[str, Any]
    storage: Storage  # the run's root: <storage.uri>/<run>/
    #: the version this attempt builds (set by `execute`); its outputs go under `<stage>/v-<version>/`
    version: str | None = None
    _inputs: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    #: the stage's latest `log` line (its heartbeat repeats it: what the stage is doing)
    last_said: str | None = None

    @classmethod
    def from_env(cls) -> StageContext:
        raw = os.environ.get(CONFIG_ENV)
        if not raw:
            raise SystemExit(f"{CONFIG_ENV} is not set: stage jobs are started by `kubedistill run` or the operator")
        config = json.loads(raw)
        return cls(config, run_storage(config))

    @property
    def name(self) -> str:
        return self.config["stage"]

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    @functools.cached_property
    def spec(self) -> DistillationRunSpec:
        """The spec paths this stage reads, as the spec's models (`kubedistill.core.spec.SpecSlice`)."""
        return spec_slice(self.config["spec"], self.name)

    @property
    def inputs(self) -> list[str]:
        """The stages whose outputs this one reads (its registry entry, resolved against the spec)."""
        return list(self.config["inputs"])

    @property
    def keep_versions(self) -> int:
        return int((self.config.get("retention") or {}).get("keepVersions", KEEP_VERSIONS))

    @property
    def out(self) -> Storage:
        """This attempt's own prefix: `<stage>/v-<version>/`."""
        if self.version is None:
            raise RuntimeError(f"stage {self.name}: no version yet (outputs are written inside `execute`)")
        return self.storage.child(version_dir(self.name, self.version))

    def input_manifest(self, stage: str) -> dict[str, Any]:
        """The current manifest of an input stage (read once per attempt, so every read sees one version)."""
        if stage not in self.config["inputs"]:
            raise KeyError(f"stage {self.name} does not declare {stage} as an input")
        if stage not in self._inputs:
            self._inputs[stage] = must_read_manifest(self.storage, stage)
        return self._inputs[stage]

    def input(self, stage: str) -> Storage:
        """The outputs of an input stage: the version its current manifest names."""
        return Storage(self.input_manifest(stage)["artifact"], self.storage.options)

    def log(self, msg: str) -> None:
        self.last_said = msg
        print(f"[{self.name}] {msg}", flush=True)


StageFn = Callable[[StageContext], dict[str, Any]]


def execute(ctx: StageContext, fn: StageFn) -> dict[str, Any]:
    """Run `fn` unless already done (a service stage acts every time); write the manifest last; prune old
    versions."""
    storage, name = ctx.storage, ctx.name
    if not ctx.config.get("service") and is_done(storage, ctx.config):
        ctx.log("already done for this config and these inputs; skipping")
        done = read_manifest(storage, name)
        assert done is not None  # is_done read it
        return done
    inputs = input_digests(storage, ctx.config["inputs"])
    if inputs is None:
        missing = [i for i in ctx.config["inputs"] if read_manifest(storage, i) is None]
        raise RuntimeError(f"stage {name}: input stage(s) {missing} have not succeeded")
    ctx.version = version = version_key(config_hash(ctx.config), inputs)
    started, t0 = now(), time.monotonic()
    # fencing: this attempt's token first; an older attempt still running (a job the executor gave up on)
    # finds it replaced and writes nothing when it ends
    token = uuid.uuid4().hex
    storage.write_json(
        f"{name}/{ATTEMPT}", {"token": token, "version": version, "startedAt": started, "pid": os.getpid()}
    )
    storage.delete(f"{name}/{MANIFEST}")  # a stale manifest must not survive a rerun that fails
    storage.delete(f"{name}/{FAILURE}")
    if not ctx.config.get("service") and (built := _built_before(storage, ctx.config, version, inputs)):
        _fence(storage, name, token)
        storage.write_json(f"{name}/{MANIFEST}", built)
        ctx.log(f"version {version} was built before for this config and these inputs; restored its manifest")
        return built
    try:
        with progress.Heartbeat(storage, name, lambda: ctx.last_said):
            result = fn(ctx)
    except BaseException as e:
        if _latest_attempt(storage, name) == token:
            storage.write_json(
                f"{name}/{FAILURE}",
                {"stage": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "at": now()},
            )
        raise
    _fence(storage, name, token)
    manifest = {
        "stage": name,
        "run": ctx.config["run"],
        "configHash": config_hash(ctx.config),
        "inputs": inputs,
        "version": version,
        "startedAt": started,
        "finishedAt": now(),
        "finishedAtNs": time.time_ns(),  # orders versions finished within one second (retention)
        "seconds": round(time.monotonic() - t0, 3),
        "artifact": ctx.out.uri(),
        "metrics": result.get("metrics", {}),
        "outputs": result.get("outputs", {}),
    }
    manifest["digest"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    storage.write_json(f"{version_dir(name, version)}/{MANIFEST}", manifest)  # the version's own record
    storage.write_json(f"{name}/{MANIFEST}", manifest)
    ctx.log(f"done in {manifest['seconds']:.1f}s: version {version}")
    hold(f"{name}.manifest-written")
    try:
        if pruned := prune_versions(storage, name, ctx.keep_versions):
            ctx.log(f"pruned {len(pruned)} old version(s) (spec.retention.keepVersions {ctx.keep_versions})")
    except (OSError, StorageError) as e:  # the result stands; the next success prunes again
        ctx.log(f"could not prune old versions: {type(e).__name__}: {e}")
    return manifest


def _built_before(
    storage: Storage, config: dict[str, Any], version: str, inputs: dict[str, str]
) -> dict[str, Any] | None:
    """The complete manifest of `version`, if an earlier attempt built it (and retention kept it)."""
    try:
        m = read_manifest(storage, config["stage"], version)
    except CorruptManifest:
        return None
    return m if m is not None and _built_from(m, config, inputs) else None


def _fence(storage: Storage, stage: str, token: str) -> None:
    if (latest := _latest_attempt(storage, stage)) != token:
        raise Superseded(
            f"stage {stage}: a newer attempt ({latest}) started while this one ({token}) ran; its result is discarded"
        )


def _latest_attempt(storage: Storage, stage: str) -> str | None:
    return _attempt_field(storage, stage, "token")


def _attempt_field(storage: Storage, stage: str, key: str) -> str | None:
    try:
        value = storage.read_json(f"{stage}/{ATTEMPT}").get(key)
    except FileNotFoundError:
        return None
    return str(value) if value else None


def prune_versions(storage: Storage, stage: str, keep: int) -> list[str]:
    """Delete old versions of `stage`; return the ones deleted.

    Kept: the newest `keep` complete versions (the current one among them, whatever its age), the
    version the latest attempt is building, and the student version promoted last (`_PROMOTED.json`,
    what a RayService may still serve). An incomplete version (an abandoned attempt's partial output)
    goes once a newer version of the stage has completed."""
    current = read_manifest(storage, stage)
    newest = [current["version"]] if current and current.get("version") else []
    pinned = {v for v in (_attempt_field(storage, stage, "version"), _promoted(storage, stage)) if v}
    complete: list[tuple[int, str, str]] = []
    incomplete: list[str] = []
    for d in storage.dirs(stage):
        if not d.startswith(VERSION_PREFIX):
            continue
        v = d.removeprefix(VERSION_PREFIX)
        try:
            m = read_manifest(storage, stage, v)
        except CorruptManifest:
            m = None
        if m is None:
            incomplete.append(v)
        else:
            complete.append((int(m.get("finishedAtNs") or 0), str(m.get("finishedAt", "")), v))
    newest += [v for *_, v in sorted(complete, reverse=True) if v not in newest]
    kept = set(newest[: max(1, keep)]) | pinned
    drop = [v for v in newest[max(1, keep) :] + incomplete if v not in kept]
    for v in drop:
        storage.delete(version_dir(stage, v))
    return drop


def _promoted(storage: Storage, stage: str) -> str | None:
    try:
        promoted = storage.read_json(PROMOTED)
    except (FileNotFoundError, ValueError):
        return None
    return str(promoted.get("version")) if isinstance(promoted, dict) and promoted.get("stage") == stage else None


def main(fn: StageFn) -> None:
    """The body of every stage's job (`python -m kubedistill.job <module:function>`): the stage run under
    `execute`, its driver log kept in storage when it ends (`driverlog`), exit status 1 when it failed.
    SIGTERM (the job stopped: its deadline, a deletion) ends it as a failure, with its log kept."""
    ctx = StageContext.from_env()
    name, failed = driverlog.log_name(), False

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    with driverlog.captured() as log:
        try:
            execute(ctx, fn)
        except BaseException as e:  # noqa: BLE001 - the traceback is in _FAILED.json and the job log
            failed = True
            traceback.print_exc()
            print(f"[{ctx.name}] FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    try:
        uri = driverlog.keep(ctx.storage, ctx.name, log, name)
        print(f"[{ctx.name}] driver log kept at {uri}", flush=True)
    except Exception as e:  # noqa: BLE001 - the stage's outcome stands without its log
        print(f"[{ctx.name}] could not keep the driver log: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        log.unlink(missing_ok=True)
    if failed:
        raise SystemExit(1)
