"""What every stage job shares: its config, its storage prefix, and the `_SUCCESS.json` manifest.

A stage writes its outputs under `<storage.uri>/<run>/<stage>/` and the manifest *last*. The manifest
records the stage's config hash and the digests of the manifests of its inputs; a stage whose
manifest matches both is done and is skipped, which is how a restarted run resumes. A stage that
fails writes `_FAILED.json` (never a manifest), so nothing downstream mistakes it for a result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
import traceback
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


def read_manifest(storage: Storage, stage: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(f"{stage}/{MANIFEST}")
    except FileNotFoundError:
        return None


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
    storage.delete(f"{name}/{MANIFEST}")  # a stale manifest must not survive a rerun that fails
    storage.delete(f"{name}/{FAILURE}")
    started, t0 = now(), time.monotonic()
    try:
        result = fn(ctx)
    except BaseException as e:
        storage.write_json(
            f"{name}/{FAILURE}",
            {"stage": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "at": now()},
        )
        raise
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


def main(fn: StageFn) -> None:
    """The body of every stage's job (`python -m kubedistill.job <module:function>`)."""
    ctx = StageContext.from_env()
    try:
        execute(ctx, fn)
    except Exception as e:  # noqa: BLE001 - the traceback is in _FAILED.json and the job log
        traceback.print_exc()
        print(f"[{ctx.name}] FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
