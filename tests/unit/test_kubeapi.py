"""The operator's Kubernetes client: what goes over the wire, how refusals come back, where credentials come from."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from kubedistill.cluster import kubeapi
from tests.conftest import free_port


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append({"method": self.command, "path": self.path, "type": self.headers.get("Content-Type"),
                          "auth": self.headers.get("Authorization"), "body": body})
        if "forbidden" in self.path:
            out, code = {"kind": "Status", "message": "rayjobs is forbidden: cannot create"}, 403
        else:
            out, code = {"kind": "Echo", "metadata": {"name": "x", "labels": {"a": "b"}}, "data": {"k": "dg=="}}, 200
        raw = json.dumps(out).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    _Recorder.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_each_call_is_the_rest_request_the_official_client_makes(server):
    kube = kubeapi.Kube(kubeapi.Connection(server, token=lambda: "t0k"))
    kube.create_namespaced_custom_object("ray.io", "v1", "ml", "rayjobs", {"kind": "RayJob"})
    kube.delete_namespaced_custom_object("ray.io", "v1", "ml", "rayjobs", "r1-data", propagation_policy="Foreground")
    kube.patch_namespaced_custom_object("ray.io", "v1", "ml", "rayservices", "r1-serve", {"spec": {}})
    kube.patch_namespaced_custom_object_status("kubedistill.io", "v1alpha1", "ml", "distillationruns", "r1",
                                               {"status": {"phase": "Running"}})
    kube.create_namespaced_secret("ml", {"kind": "Secret"})
    assert kube.read_namespaced_secret("creds", "ml")["metadata"]["labels"] == {"a": "b"}
    kube.create_namespaced_event("ml", {"kind": "Event"})
    kube.create_namespaced_network_policy("ml", {"kind": "NetworkPolicy"})
    kube.patch_namespaced_network_policy("r1-ray", "ml", {"spec": {}})
    got = [(r["method"], r["path"], r["type"]) for r in _Recorder.seen]
    assert got == [
        ("POST", "/apis/ray.io/v1/namespaces/ml/rayjobs", "application/json"),
        ("DELETE", "/apis/ray.io/v1/namespaces/ml/rayjobs/r1-data", "application/json"),
        ("PATCH", "/apis/ray.io/v1/namespaces/ml/rayservices/r1-serve", "application/merge-patch+json"),
        ("PATCH", "/apis/kubedistill.io/v1alpha1/namespaces/ml/distillationruns/r1/status",
         "application/merge-patch+json"),
        ("POST", "/api/v1/namespaces/ml/secrets", "application/json"),
        ("GET", "/api/v1/namespaces/ml/secrets/creds", None),
        ("POST", "/api/v1/namespaces/ml/events", "application/json"),
        ("POST", "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies", "application/json"),
        ("PATCH", "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/r1-ray", "application/merge-patch+json"),
    ]
    assert _Recorder.seen[1]["body"]["propagationPolicy"] == "Foreground"
    assert {r["auth"] for r in _Recorder.seen} == {"Bearer t0k"}


def test_a_refusal_comes_back_with_its_status_and_the_api_servers_message(server):
    kube = kubeapi.Kube(kubeapi.Connection(server))
    with pytest.raises(kubeapi.ApiError) as e:
        kube.create_namespaced_custom_object("ray.io", "v1", "forbidden", "rayjobs", {})
    assert e.value.status == 403 and json.loads(e.value.body)["message"] == "rayjobs is forbidden: cannot create"
    with pytest.raises(kubeapi.ApiError) as e:
        kubeapi.Kube(kubeapi.Connection(f"http://127.0.0.1:{free_port()}")).read_namespaced_secret("x", "ml")
    assert e.value.status == 0 and "cannot reach the API server" in str(e.value)


def test_in_a_pod_the_service_account_token_is_read_again_when_rotated(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("first\n")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(kubeapi, "SERVICE_ACCOUNT", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    conn = kubeapi.Connection.in_cluster()
    assert conn is not None and conn.server == "https://10.0.0.1:6443" and conn.ca_file == str(tmp_path / "ca.crt")
    assert conn.token() == "first"
    (tmp_path / "token").write_text("second\n")  # the kubelet rotated it
    assert conn.token() == "first"  # read at most once a minute
    conn.token.every = 0  # type: ignore[attr-defined]
    assert conn.token() == "second"


def test_outside_a_pod_the_kubeconfigs_current_context_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = tmp_path / "config"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: b\n"
        "clusters: [{name: a, cluster: {server: 'https://a:1'}}, {name: b, cluster: {server: 'http://b:2'}}]\n"
        "users: [{name: u, user: {token: s3cr3t}}]\ncontexts: [{name: b, context: {cluster: b, user: u}}]\n")
    monkeypatch.setenv("KUBECONFIG", str(config))
    conn = kubeapi.Connection.find()
    assert conn.server == "http://b:2" and conn.token() == "s3cr3t"
    monkeypatch.setenv("KUBECONFIG", "")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config either
    with pytest.raises(RuntimeError, match="no Kubernetes credentials"):
        kubeapi.Connection.find()
