"""What every stage job shares: its config, its storage prefix, and the `_SUCCESS.json` manifest.

A stage writes its outputs under `<storage.uri>/<run>/<stage>/` and the manifest *last*. The manifest
records the stage's config hash and the digests of the manifests of its inputs; a stage whose
manifest matches both is done and is skipped, which is how a restarted run resumes. A stage that
fails writes `_FAILED.json` (never a manifest), so nothing downstream mistakes it for a result.

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
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubedistill.core.holds import hold
from kubedistill.core.spec import DistillationRunSpec, spec_slice
from kubedistill.core.storage import S3Options, Storage

CONFIG_ENV = "KUBEDISTILL_STAGE_CONFIG"
MANIFEST = "_SUCCESS.json"
FAILURE = "_FAILED.json"
#: the token of the stage's latest attempt: only that attempt may write the manifest or the failure
ATTEMPT = "_ATTEMPT.json"


class Superseded(RuntimeError):
    """A newer attempt of the stage started while this one ran: this one's result is not written."""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def config_hash(config: dict[str, Any]) -> str:
    keyed = {k: v for k, v in config.items() if k != "storage"}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


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


def read_manifest(storage: Storage, stage: str) -> dict[str, Any] | None:
    """The stage's manifest; None when it has none; `CorruptManifest` when what is there is not one."""
    rel = f"{stage}/{MANIFEST}"
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
    if m is None or m.get("configHash") != config_hash(config):
        return False
    return m.get("inputs") == input_digests(storage, config["inputs"])


@dataclass
class StageContext:
    config: dict[str, Any]
    storage: Storage  # the run's root: <storage.uri>/<run>/

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
    def out(self) -> Storage:
        """This stage's own prefix."""
        return self.storage.child(self.name)

    def input(self, stage: str) -> Storage:
        if stage not in self.config["inputs"]:
            raise KeyError(f"stage {self.name} does not declare {stage} as an input")
        return self.storage.child(stage)

    def log(self, msg: str) -> None:
        print(f"[{self.name}] {msg}", flush=True)


StageFn = Callable[[StageContext], dict[str, Any]]


def execute(ctx: StageContext, fn: StageFn) -> dict[str, Any]:
    """Run `fn` unless already done (a service stage acts every time); write the manifest last."""
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
    started, t0 = now(), time.monotonic()
    # fencing: this attempt's token first; an older attempt still running (a job the executor gave up on)
    # finds it replaced and writes nothing when it ends
    token = uuid.uuid4().hex
    storage.write_json(f"{name}/{ATTEMPT}", {"token": token, "startedAt": started, "pid": os.getpid()})
    storage.delete(f"{name}/{MANIFEST}")  # a stale manifest must not survive a rerun that fails
    storage.delete(f"{name}/{FAILURE}")
    try:
        result = fn(ctx)
    except BaseException as e:
        if _latest_attempt(storage, name) == token:
            storage.write_json(
                f"{name}/{FAILURE}",
                {"stage": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "at": now()},
            )
        raise
    if (latest := _latest_attempt(storage, name)) != token:
        raise Superseded(
            f"stage {name}: a newer attempt ({latest}) started while this one ({token}) ran; its result is discarded"
        )
    manifest = {
        "stage": name,
        "run": ctx.config["run"],
        "configHash": config_hash(ctx.config),
        "inputs": inputs,
        "startedAt": started,
        "finishedAt": now(),
        "seconds": round(time.monotonic() - t0, 3),
        "artifact": ctx.out.uri(),
        "metrics": result.get("metrics", {}),
        "outputs": result.get("outputs", {}),
    }
    manifest["digest"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    storage.write_json(f"{name}/{MANIFEST}", manifest)
    ctx.log(f"done in {manifest['seconds']:.1f}s")
    hold(f"{name}.manifest-written")
    return manifest


def _latest_attempt(storage: Storage, stage: str) -> str | None:
    try:
        token = storage.read_json(f"{stage}/{ATTEMPT}").get("token")
    except FileNotFoundError:
        return None
    return str(token) if token else None


def main(fn: StageFn) -> None:
    """The body of every stage's job (`python -m kubedistill.job <module:function>`)."""
    ctx = StageContext.from_env()
    try:
        execute(ctx, fn)
    except Exception as e:  # noqa: BLE001 - the traceback is in _FAILED.json and the job log
        traceback.print_exc()
        print(f"[{ctx.name}] FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
