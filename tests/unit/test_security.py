"""Secure by default: private Ray clusters, least-privilege secrets, restricted pods, no pickle, a hardened /score.

Each test here fails on the code before issue 19 (see SECURITY.md for the threat model)."""

from __future__ import annotations

import asyncio
import base64
import io
import pickle
from pathlib import Path
from typing import Any

import pytest

from kubedistill.cluster import controller, k8s, security
from kubedistill.core import spec
from tests.conftest import ROOT, minimal_doc
from tests.kuberay import errors, pod_templates
from tests.unit.test_hostile import malicious_checkpoints, restricted_violations

NOW = "2026-12-01T00:00:00Z"
SAMPLES = ROOT / "manifests" / "samples"


def _run(**spec_fields: Any) -> spec.DistillationRun:
    doc = minimal_doc(storage={"uri": "s3://artifacts/runs", "secretRef": {"name": "s3-credentials"}}, **spec_fields)
    doc["metadata"] = {"name": "r1", "namespace": "ml"}
    return spec.parse_run(doc)


def _all_runs() -> list[spec.DistillationRun]:
    runs = [r for f in sorted(SAMPLES.glob("*.yaml")) for r in spec.load_runs(f)]
    runs.append(_run(annotation={"replicas": {"min": 1, "max": 8}, "gpusPerReplica": 1},
                     student={"resources": {"workers": 4, "cpusPerWorker": 2, "gpusPerWorker": 1}}))
    return runs


# ---------------------------------------------------------------------------------------------
# 3. Restricted pods


def test_every_pod_the_operator_creates_meets_the_restricted_pod_security_standard():
    pods = [(f"{r.name}/{o['metadata']['name']}/{path}", t, o)
            for r in _all_runs() for o in k8s.render(r, uid="u") if o["kind"] in ("RayJob", "RayService")
            for path, t in pod_templates(o)]
    assert len(pods) > 20
    for where, template, obj in pods:
        assert restricted_violations(template) == [], where
        spec_ = template["spec"]
        autoscaled = (obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig"))["enableInTreeAutoscaling"]
        # a token only where the autoscaler (a container KubeRay adds to an autoscaled head) calls the API server
        assert spec_["automountServiceAccountToken"] is (autoscaled and "headGroupSpec.template" in where), where
        assert template["metadata"]["labels"]["kubedistill.io/run"] == obj["metadata"]["labels"]["kubedistill.io/run"]
    for r in _all_runs():  # KubeRay's autoscaler container too
        for o in k8s.render(r):
            cluster = (o.get("spec") or {}).get("rayClusterSpec") or (o.get("spec") or {}).get("rayClusterConfig")
            if cluster and cluster["enableInTreeAutoscaling"]:
                sc = cluster["autoscalerOptions"]["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                assert "memory" in cluster["autoscalerOptions"]["resources"]["limits"]


def test_the_restricted_check_catches_each_violation():
    template = k8s.render(_run())[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    assert restricted_violations(template) == []
    for mutate, says in [
        (lambda t: t["spec"]["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
        (lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(drop=[]), "capabilities.drop"),
        (lambda t: t["spec"]["containers"][0]["securityContext"].update(privileged=True), "privileged"),
        (lambda t: [t["spec"]["securityContext"].pop("seccompProfile"),
                    t["spec"]["containers"][0]["securityContext"].pop("seccompProfile")], "seccompProfile"),
        (lambda t: [t["spec"]["securityContext"].pop("runAsNonRoot"),
                    t["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot")], "runAsNonRoot"),
        (lambda t: t["spec"]["containers"][0]["resources"]["limits"].pop("memory"), "memory limit"),
        (lambda t: t["spec"].update(hostNetwork=True), "hostNetwork"),
        (lambda t: t["spec"].update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]), "hostPath"),
        (lambda t: t["spec"]["containers"][0].update(envFrom=[{"secretRef": {"name": "s"}}]), "envFrom"),
    ]:
        import copy

        bad = copy.deepcopy(template)
        mutate(bad)
        assert any(says in v for v in restricted_violations(bad)), says


# ---------------------------------------------------------------------------------------------
# 1. Ray clusters private to their run


def test_every_ray_cluster_requires_the_runs_token_and_the_token_secret_is_owned_by_the_run():
    run = _run()
    for obj in k8s.render(run, uid="u1"):
        if obj["kind"] in ("RayJob", "RayService"):
            cluster = obj["spec"].get("rayClusterSpec") or obj["spec"]["rayClusterConfig"]
            assert cluster["authOptions"] == {"mode": "token", "secretName": "r1-ray-token"}
            assert errors(obj) == []
    secret = k8s.token_secret(run, "t0ken", uid="u1")
    assert errors(secret) == [] and secret["stringData"] == {"auth_token": "t0ken"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u1" and secret["metadata"]["name"] == "r1-ray-token"


def test_the_network_policy_admits_the_run_the_operator_kuberay_and_only_the_serving_peers():
    settings = security.Settings(serving_from=({"namespaceSelector": {"matchLabels": {"team": "gateway"}}},))
    policy = k8s.network_policy(_run(), settings, uid="u1")
    assert errors(policy) == []  # Kubernetes' own schema
    own = {"matchLabels": {"kubedistill.io/run": "r1"}}
    assert policy["spec"]["podSelector"] == own and policy["spec"]["policyTypes"] == ["Ingress"]
    run_rule, control_rule, serve_rule = policy["spec"]["ingress"]
    assert run_rule == {"from": [{"podSelector": own}]}
    assert control_rule["from"] == [security.OPERATOR_PEER, security.KUBERAY_PEER]
    assert sorted(p["port"] for p in control_rule["ports"]) == [6379, 8265, 10001]
    assert serve_rule == {"from": [{"namespaceSelector": {"matchLabels": {"team": "gateway"}}}],
                          "ports": [{"protocol": "TCP", "port": 8000}]}
    # no serving, or no peers allowed: nobody outside the run reaches port 8000
    assert len(k8s.network_policy(_run(serving={"enabled": False}), settings)["spec"]["ingress"]) == 2
    assert len(k8s.network_policy(_run(), security.Settings(serving_from=()))["spec"]["ingress"]) == 2


# ---------------------------------------------------------------------------------------------
# 2. Least-privilege secrets, through the controller


class _Core:
    """A CoreV1Api with Secrets; it records what is created."""

    def __init__(self, secrets: dict[str, tuple[dict[str, str], dict[str, str]]]):
        self.secrets, self.created = secrets, []

    def read_namespaced_secret(self, name, namespace):
        from kubedistill.cluster.kubeapi import ApiError

        if name not in self.secrets:
            raise ApiError(status=404, reason="Not Found")
        labels, data = self.secrets[name]
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": labels}, "data": data}

    def create_namespaced_secret(self, namespace, body):
        self.created.append(("Secret", body["metadata"]["name"]))


class _Custom:
    def __init__(self, log):
        self.log = log

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.log.append((body["kind"], body["metadata"]["name"]))


class _Networking:
    def __init__(self, log):
        self.log = log

    def create_namespaced_network_policy(self, namespace, body):
        self.log.append(("NetworkPolicy", body["metadata"]["name"]))


KEYS = {"AWS_ACCESS_KEY_ID": base64.b64encode(b"key").decode(), "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"s").decode()}
OPTED_IN = {security.CREDENTIALS_LABEL: "true"}


def _reconcile(storage: dict[str, Any], secrets: dict[str, Any], policy: security.Settings | None = None,
               tmp_path: Path | None = None):
    body = minimal_doc(storage=storage, teacher={"enabled": False}, annotation={"enabled": False},
                       pruning={"enabled": False})
    body["metadata"].update(name="r1", namespace="ml", uid="u1", generation=1)
    core = _Core(secrets)
    custom = _Custom(core.created)
    cluster = controller.Cluster(custom, core, _Networking(core.created))
    ctl = controller.Controller(cluster, policy=policy or security.Settings())
    return ctl.reconcile_run(body, {}, NOW), core.created


def _storage_condition(plan):
    return next((c for c in plan.status.conditions if c.type == "StorageReachable"), None)


@pytest.fixture
def s3_reads(monkeypatch):
    """Storage reads of the controller: none of the refused runs may reach storage."""
    from kubedistill.core.storage import Storage

    calls = []
    monkeypatch.setattr(Storage, "__init__", lambda self, *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("storage reached")))
    return calls


@pytest.mark.parametrize("storage, secrets, says", [
    ({"uri": "s3://b/r", "secretRef": {"name": "db"}}, {"db": ({}, KEYS)}, "is not labelled kubedistill.io/storage-credentials=true"),
    ({"uri": "s3://b/r", "secretRef": {"name": "db"}}, {"db": (OPTED_IN, {"AWS_ACCESS_KEY_ID": KEYS["AWS_ACCESS_KEY_ID"]})},
     "has no AWS_SECRET_ACCESS_KEY"),
    ({"uri": "s3://b/r", "endpoint": "https://minio.example:9000"}, {}, "never sends its own credentials"),
    ({"uri": "s3://b/r", "endpoint": "http://minio:9000", "secretRef": {"name": "db"}}, {"db": (OPTED_IN, KEYS)},
     "plain HTTP"),
])
def test_the_operator_refuses_storage_its_policy_does_not_allow_and_creates_nothing(storage, secrets, says, s3_reads):
    plan, created = _reconcile(storage, secrets)
    cond = _storage_condition(plan)
    assert (cond.status, cond.reason) == ("False", "StorageRefused") and says in cond.message, cond.message
    assert "spec.storage" in cond.message and plan.status.phase == "Pending"
    assert created == [] and s3_reads == []


def test_an_opted_in_secret_and_an_allowed_endpoint_create_the_token_and_policy_before_the_first_rayjob(tmp_path):
    from kubedistill.core.storage import Storage

    storage = {"uri": "s3://b/r", "endpoint": "http://minio:9000", "secretRef": {"name": "creds"}}
    policy = security.Settings(allowed_endpoints=("http://minio:9000",))
    seen = []
    real = Storage.__init__

    def spy(self, uri, options=None):
        seen.append(options)
        real(self, str(tmp_path), None)  # read manifests from an empty local store

    import unittest.mock

    with unittest.mock.patch.object(Storage, "__init__", spy):
        plan, created = _reconcile(storage, {"creds": (OPTED_IN, KEYS)}, policy)
    assert created == [("Secret", "r1-ray-token"), ("NetworkPolicy", "r1-ray"), ("RayJob", "r1-data")]
    assert (seen[0].access_key, seen[0].secret_key, seen[0].endpoint) == ("key", "s", "http://minio:9000")
    assert _storage_condition(plan) is None


def test_a_run_without_a_secret_uses_the_operators_credentials_only_on_its_own_endpoint(monkeypatch):
    assert security.ambient_refused(None, None) is None
    assert security.ambient_refused("https://s3.internal:443", "https://s3.internal:443") is None
    assert "never sends its own credentials" in security.ambient_refused("https://evil.example", "https://s3.internal")


@pytest.mark.parametrize("endpoint, allowed, ok", [
    ("https://s3.amazonaws.com", (), True),
    ("http://minio:9000", ("http://minio:9000",), True),
    ("http://MINIO:9000/", ("http://minio:9000",), True),
    ("http://minio:9000", (), False),
    ("http://minio:9001", ("http://minio:9000",), False),
    ("https://169.254.169.254", ("https://169.254.169.254",), False),
])
def test_endpoints_are_https_unless_the_chart_lists_them_and_never_metadata(endpoint, allowed, ok):
    assert (security.endpoint_refused(endpoint, allowed) is None) is ok


# ---------------------------------------------------------------------------------------------
# 4. No pickle from storage


def test_a_planted_checkpoint_is_refused_without_running(tmp_path):
    from kubedistill.core.storage import Storage
    from kubedistill.ml.raytrain import load_tensors
    import torch

    from kubedistill.ml.prune import Importance
    from kubedistill.stages.prune_search import IMPORTANCE_FILE, _importance

    marker = tmp_path / "pwned"
    for name, data in malicious_checkpoints(marker):
        with pytest.raises(pickle.UnpicklingError):
            load_tensors(io.BytesIO(data))
        assert not marker.exists(), name
    st = Storage(str(tmp_path / "stage"))  # the prune-search stage's importance file (safetensors), planted
    st.write_bytes(IMPORTANCE_FILE, malicious_checkpoints(marker)[0][1])
    with pytest.raises(Exception, match="header|Safetensor|deserializ"):
        _importance(st)
    assert not marker.exists()
    imp = Importance([torch.ones(2), torch.zeros(3)], [torch.ones(4), torch.ones(5)])
    st.write_bytes(IMPORTANCE_FILE, imp.to_bytes())
    back = _importance(st)
    assert [t.tolist() for t in back.attn + back.mlp] == [t.tolist() for t in imp.attn + imp.mlp]
    import torch  # what the stages do save still loads

    buf = io.BytesIO()
    torch.save({"step": 3, "rng": torch.get_rng_state(), "model": {"w": torch.ones(2)}, "best": None}, buf)
    assert load_tensors(io.BytesIO(buf.getvalue()))["step"] == 3


def test_a_model_prefix_with_an_escaping_key_is_not_copied(tmp_path, monkeypatch):
    from kubedistill.core.storage import Storage
    from kubedistill.ml import models

    monkeypatch.setenv("KUBEDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Storage, "list", lambda self, rel="", recursive=True: ["config.json", "../../escape"])
    with pytest.raises(models.ModelNotFound, match="refusing to copy"):
        models.fetch_prefix(str(tmp_path / "model"))
    assert not (tmp_path / "escape").exists()


# ---------------------------------------------------------------------------------------------
# 5. A hardened /score (the pure parts; tests/integration/test_serving.py runs them on Ray Serve)


class _Request:
    """A Starlette request as `read_body` sees it: headers and a body stream that counts what was read."""

    def __init__(self, body: bytes, length: str | None = "auto", chunk: int = 4096):
        self.headers = {} if length is None else {"content-length": str(len(body)) if length == "auto" else length}
        self.body, self.chunk, self.read = body, chunk, 0

    async def stream(self):
        for i in range(0, len(self.body), self.chunk):
            self.read += self.chunk
            yield self.body[i : i + self.chunk]


def _args(**kw):
    from kubedistill.core.serve_app import AppArgs

    return AppArgs.model_validate({"model": "m", "maxBodyBytes": 2048, **kw})


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_reading():
    from kubedistill.stages.serving import RequestError, read_body

    big = _Request(b"x" * 10_000)
    with pytest.raises(RequestError) as e:
        asyncio.run(read_body(big, 2048))
    assert e.value.status == 413 and big.read == 0  # judged from the header: nothing read
    lying = _Request(b"x" * 10_000, length=None)  # no length (chunked): stopped while reading
    with pytest.raises(RequestError) as e:
        asyncio.run(read_body(lying, 2048))
    assert e.value.status == 413 and lying.read <= 2048 + 4096
    under = _Request(b"x" * 10_000, length="10")  # a false, small length gains nothing
    with pytest.raises(RequestError):
        asyncio.run(read_body(under, 2048))
    assert asyncio.run(read_body(_Request(b"{}"), 2048)) == b"{}"


def test_deep_nesting_is_400_long_ids_and_bad_unicode_are_422():
    from kubedistill.stages.serving import RequestError, parse_request

    def refused(body: bytes) -> RequestError:
        with pytest.raises(RequestError) as e:
            parse_request(body, 100, 2000)
        return e.value

    assert refused(b"[" * 100_000 + b"]" * 100_000).status == 400  # RecursionError in json: was a 500
    assert refused(b'{"query": "q", "services": [{"id": "a", "text": "t", "x": [[[[[[]]]]]]}]}').status == 400
    e = refused(b'{"query": "q", "services": [{"id": "' + b"i" * 257 + b'", "text": "t"}]}')
    assert (e.status, e.field) == (422, "services[0].id")
    e = refused(b'{"query": "q", "services": [{"id": "a", "text": "t"}, {"id": "b", "text": "\\ud800"}]}')
    assert (e.status, e.field) == (422, "services[1].text") and "unicode" in e.message.lower()


def test_a_full_queue_answers_503_with_retry_after_and_a_slow_batch_504():
    from kubedistill.stages.serving import Admission, RequestError, answer

    admission = Admission(limit=2)
    with admission, admission:
        with pytest.raises(RequestError) as e, admission:
            pass
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
    assert admission.held == 0

    async def never(query, texts):
        await asyncio.Event().wait()  # the model never answers

    body = b'{"query": "q", "services": [{"id": "a", "text": "t"}]}'
    status, doc, _ = asyncio.run(answer(_Request(body), _args(requestTimeoutSeconds=0.01), Admission(4), never))
    assert status == 504 and doc["field"] == "server"


def test_a_request_that_breaks_the_model_fails_alone_and_its_batch_neighbours_are_scored():
    import numpy as np

    from kubedistill.stages.serving import ItemFailed, score_each

    def predict(queries, texts):
        if "poison" in texts:
            raise RuntimeError("tokenizer exploded")
        return np.array([[len(t), 0.0] for t in texts])

    items = [("q1", ["a", "bb"]), ("q2", ["poison"]), ("q3", ["ccc"])]
    out = score_each(items, predict)
    assert [r.tolist() for r in (out[0], out[2])] == [[[1, 0], [2, 0]], [[3, 0]]]
    assert isinstance(out[1], ItemFailed) and "exploded" in str(out[1].error)
    assert [r.tolist() for r in score_each([("q", ["a"]), ("q", ["bb"])], predict)] == [[[1, 0]], [[2, 0]]]


# ---------------------------------------------------------------------------------------------
# 6. Bounded, validated input: every problem at once


def test_validate_lists_field_errors_and_cross_field_rules_together(tmp_path):
    import subprocess
    import sys

    f = tmp_path / "run.yaml"
    f.write_text(
        "apiVersion: kubedistill.io/v1alpha1\nkind: DistillationRun\nmetadata: {name: r}\nspec:\n"
        "  storage: {uri: s3://b/runs, endpoint: 'http://169.254.169.254', secretRef: {name: Not_A_Name}}\n"
        "  teacher: {resources: {memory: lots}}\n"
        "  serving: {replicas: {min: 5, max: 2}}\n"
        "  data: {synthetic: {services: 10000000}}\n"
    )
    out = subprocess.run([sys.executable, "-m", "kubedistill.cli", "validate", str(f)], capture_output=True, text=True)
    assert out.returncode != 0
    for field in ("spec.storage.endpoint", "spec.storage.secretRef.name", "spec.teacher.resources.memory",
                  "spec.serving.replicas.min", "spec.data.synthetic.services"):
        assert field in out.stderr + out.stdout, field
    assert "5 problem(s)" in out.stderr + out.stdout
    assert "Kubernetes quantity" in out.stderr + out.stdout


def test_every_string_in_the_crd_has_a_max_length_and_every_number_a_stated_upper_bound():
    from kubedistill.cluster import crd

    schema = crd.generate()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = []

    def walk(node: dict[str, Any], path: str) -> None:
        kinds = [node] + list(node.get("anyOf") or [])
        for n in kinds:
            if n.get("type") == "string" and "enum" not in n and "maxLength" not in n:
                missing.append(path)
            if n.get("type") in ("integer", "number") and "maximum" not in n and path not in _UNBOUNDED_OK:
                missing.append(path)
            said = (n.get("description") or "").lower()
            if n.get("type") in ("integer", "number") and "at most" not in said and "below" not in said:
                missing.append(f"{path} (its bound is not in its description)")
            for k, v in (n.get("properties") or {}).items():
                walk(v, f"{path}.{k}")
            if isinstance(n.get("items"), dict):
                walk(n["items"], f"{path}[]")
            if isinstance(n.get("additionalProperties"), dict):
                walk(n["additionalProperties"], f"{path}{{}}")

    walk(schema, "spec")
    assert missing == []


#: numbers with no upper bound by nature (a probability's bound is in the schema as exclusiveMaximum)
_UNBOUNDED_OK: set[str] = set()


def test_the_operators_valid_condition_lists_field_and_cross_field_problems_together():
    from kubedistill.cluster import reconcile

    body = minimal_doc(storage={"uri": "s3://b/r"}, teacher={"resources": {"memory": "lots"}},
                       serving={"replicas": {"min": 3, "max": 1}})
    body["metadata"].update(name="r1", namespace="ml", uid="u1", generation=1)
    plan = reconcile.reconcile_body(body, {}, lambda _: None, NOW)
    valid = next(c for c in plan.status.conditions if c.type == "Valid")
    assert plan.status.phase == "Failed" and plan.create == []
    assert "spec.teacher.resources.memory" in valid.message and "spec.serving.replicas.min" in valid.message
