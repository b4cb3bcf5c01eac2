"""The Helm chart, with the real helm binary (installed by `make`, see scripts/install_helm.py):
lint, render, validate what it renders against Kubernetes' own schemas, values documented and typed,
CRDs and the plain manifests kept identical to their sources."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "charts" / "kubedistill"
K8S_VERSION = "1.30.0"  # the oldest minor the chart supports that kubernetes-validate ships


def _helm() -> str:
    exe = shutil.which("helm") or str(Path(sys.executable).parent / "helm")
    if not Path(exe).exists():
        pytest.fail("the helm binary is not installed: run `make dev` (scripts/install_helm.py)")
    return exe


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([_helm(), *args], capture_output=True, text=True, check=check, timeout=120)


def render(*sets: str, crds: bool = False) -> list[dict]:
    args = ["template", "kubedistill", str(CHART), "--namespace", "kubedistill-system"]
    args += ["--include-crds"] if crds else []
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def _by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def test_helm_lint_strict():
    out = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={ml,search}",), ("peering.enabled=false", "metrics.enabled=false")])
def test_rendered_objects_validate_against_kubernetes_schemas(sets):
    objs = render(*sets, crds=True)
    crds = {(c["spec"]["group"], c["spec"]["names"]["kind"]) for c in _by_kind(objs, "CustomResourceDefinition")}
    for obj in objs:
        group = obj["apiVersion"].rpartition("/")[0]
        if group in ("zalando.org", "kubedistill.io"):
            assert (group, obj["kind"]) in crds  # a custom object the chart's own CRDs serve
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_operator_pod_is_hardened_and_sized():
    (dep,) = _by_kind(render(), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert set(c["resources"]["requests"]) == {"cpu", "memory"} and "memory" in c["resources"]["limits"]
    assert c["args"][:2] == ["python", "operator/run.py"]  # kopf run operator/handlers.py, the official client refused
    assert "--namespace=kubedistill-system" in c["args"] and "--peering=kubedistill" in c["args"]
    assert "--all-namespaces" not in c["args"]  # by default: the release's namespace only
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"] and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["KUBEDISTILL_RESYNC_INTERVAL"] == "300" and env["KUBEDISTILL_RETRY_INTERVAL"] == "10"
    assert env["KUBEDISTILL_WORKERS"] == "16" and env["KUBEDISTILL_METRICS_PORT"] == "9090"
    assert Path(ROOT / c["args"][1]).is_file()  # the launcher the image runs


def test_cluster_wide_rbac_is_least_privilege():
    objs = render("clusterWide=true")
    (role,) = _by_kind(objs, "ClusterRole")
    rules = role["rules"]
    grants = {(g, r): set(rule["verbs"]) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert all("*" not in v for v in grants.values()) and all("*" not in k for k in grants)
    assert grants[("ray.io", "rayjobs")] == {"get", "list", "watch", "create", "delete", "patch"}
    assert grants[("kubedistill.io", "distillationruns/status")] == {"get", "patch"}
    # the operator never creates or writes a run itself (no finalizer, no annotations): only its status
    assert grants[("kubedistill.io", "distillationruns")] == {"get", "list", "watch"}
    assert grants[("", "secrets")] == {"get", "create"}  # read a run's named secret (never list), create its token
    assert grants[("networking.k8s.io", "networkpolicies")] == {"get", "create", "patch"}
    assert ("zalando.org", "clusterkopfpeerings") in grants
    (binding,) = _by_kind(objs, "ClusterRoleBinding")
    (sa,) = _by_kind(objs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "kubedistill-system"}]
    # every rule in the template carries a comment saying why
    text = (CHART / "templates" / "_helpers.tpl").read_text() + (CHART / "templates" / "rbac.yaml").read_text()
    for m in re.finditer(r"^(\s*)- apiGroups:", text, re.M):
        before = text[: m.start()].rstrip().splitlines()[-1].strip()
        assert before.startswith("#") or before.startswith("- apiGroups") or before.startswith("verbs"), before


def test_by_default_rbac_is_namespaced_to_the_release_namespace():
    """A default install reads Secrets and creates Ray clusters in its own namespace only."""
    objs = render()
    (role,) = _by_kind(objs, "Role")
    assert role["metadata"]["namespace"] == "kubedistill-system"
    grants = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "secrets"), ("ray.io", "rayjobs"), ("networking.k8s.io", "networkpolicies")} <= grants
    (cluster_role,) = _by_kind(objs, "ClusterRole")
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
    assert not _by_kind(objs, "ClusterKopfPeering") and len(_by_kind(objs, "KopfPeering")) == 1
    (dep,) = _by_kind(objs, "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    from kubedistill.cluster.security import Settings

    settings = Settings.from_env(env)  # what the operator makes of the chart's values
    assert settings.network_policy and settings.allowed_endpoints == ()
    assert settings.operator_peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubedistill-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubedistill", "app.kubernetes.io/instance": "kubedistill"}},
    }
    assert settings.serving_from == ({"podSelector": {}},)
    sets = ("storage.allowedEndpoints={http://minio.storage:9000}", "serving.allowedFrom=null")
    env = {e["name"]: e["value"] for e in _by_kind(render(*sets), "Deployment")[0]["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert Settings.from_env(env).allowed_endpoints == ("http://minio.storage:9000",)


def test_each_watched_namespace_gets_a_baseline_network_policy_narrower_than_a_runs():
    """Rendered by default: the operator and KubeRay on the Ray ports, nothing else; each run's own policy
    (kubedistill.cluster.k8s.network_policy) adds to it, never the other way round."""
    from kubedistill.cluster import k8s
    from kubedistill.cluster.security import Settings

    objs = render("watchNamespaces={ml,search}")
    policies = _by_kind(objs, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["ml", "search"]
    (rule,) = policies[0]["spec"]["ingress"]
    assert policies[0]["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "kubedistill"}}
    assert sorted(p["port"] for p in rule["ports"]) == [p for _, p in k8s.RAY_PORTS]
    (dep,) = _by_kind(objs, "Deployment")
    settings = Settings.from_env({e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]})
    assert rule["from"] == [settings.operator_peer, settings.kuberay_peer]  # the same peers as each run's policy
    assert k8s.labels("r", "data")["app.kubernetes.io/managed-by"] == "kubedistill"  # it selects the Ray pods
    assert not _by_kind(render("clusterWide=true"), "NetworkPolicy")
    assert not _by_kind(render("networkPolicy.enabled=false"), "NetworkPolicy")


def test_watch_namespaces_gets_roles_and_peering_per_namespace():
    objs = render("watchNamespaces={ml,search}")
    roles = _by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "search"]
    assert sorted(p["metadata"]["namespace"] for p in _by_kind(objs, "KopfPeering")) == ["ml", "search"]
    assert not _by_kind(objs, "ClusterKopfPeering")
    (cluster_role,) = _by_kind(objs, "ClusterRole")  # only the cluster-level reads kopf needs
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
    (dep,) = _by_kind(objs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ml" in args and "--namespace=search" in args and "--all-namespaces" not in args


@pytest.mark.parametrize("bad, says", [
    ("replicaCount=0", "replicaCount"),
    ("resyncInterval=0", "resyncInterval"),
    ("reconcileWorkers=0", "reconcileWorkers"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("nosuchkey=1", "nosuchkey"),
    ("watchNamespaces={Bad_NS}", "watchNamespaces"),
])
def test_values_schema_refuses_bad_values_naming_them(bad, says):
    out = helm("template", "kd", str(CHART), "--set", bad, check=False)
    assert out.returncode != 0 and says in out.stderr, out.stderr


@pytest.mark.parametrize("peering", ["true", "false"])
def test_more_than_one_operator_replica_is_refused_saying_why(peering):
    out = helm("template", "kd", str(CHART), "--set", "replicaCount=2", "--set", f"peering.enabled={peering}",
               check=False)
    assert out.returncode != 0
    assert "replicaCount: 2 is not supported, use 1: kopf peering gives every replica the same priority" in out.stderr


def _value_tree(text: str) -> list[dict]:
    """values.yaml as a tree of {key, documented, children}; documented = a '# --' comment right above."""
    root: dict = {"key": "", "documented": False, "children": [], "indent": -1}
    stack, comment = [root], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = True
        elif stripped.startswith("#"):
            continue  # the comment above, continued
        elif m := re.match(r"^(\s*)([A-Za-z][\w.-]*):", line):
            node = {"key": m.group(2), "documented": comment, "children": [], "indent": len(m.group(1))}
            while stack[-1]["indent"] >= node["indent"]:
                stack.pop()
            stack[-1]["children"].append(node)
            stack.append(node)
            comment = False
        elif stripped:
            comment = False
    return root["children"]


def _undocumented(nodes: list[dict], prefix: str = "") -> list[str]:
    """Keys with no comment of their own, of a parent, or (for a group) of every child."""
    out = []
    for n in nodes:
        if n["documented"]:
            continue
        if not n["children"]:
            out.append(prefix + n["key"])
        else:
            out += _undocumented(n["children"], f"{prefix}{n['key']}.")
    return out


def test_every_values_key_is_documented_and_typed():
    tree = _value_tree((CHART / "values.yaml").read_text())
    assert _undocumented(tree) == []
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]) - {"global"} == {n["key"] for n in tree}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key, sub in schema["properties"].items():  # nested groups: the schema knows each key
        if isinstance(values.get(key), dict) and sub.get("additionalProperties") is False:
            assert set(values[key]) <= set(sub["properties"]), key


def test_the_documentation_check_catches_an_undocumented_key():
    tree = _value_tree("# -- documented\na: 1\nb:\n  # -- ok\n  c: 2\n  d: 3\n")
    assert _undocumented(tree) == ["b.d"]


def test_chart_crds_are_copies_of_the_manifests():
    chart = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    manifests = {p.name: p.read_text() for p in (ROOT / "manifests" / "crds").glob("*.yaml")}
    assert chart == manifests, "run `make crd` (it copies manifests/crds/ into the chart)"


def test_plain_manifests_are_the_chart_rendered_with_defaults():
    """manifests/rbac/ and manifests/operator/ are generated (`make manifests`): `kubectl apply -k manifests/`
    installs what `helm install` would with the default values."""
    expected = render()
    committed = [d for sub in ("rbac", "operator") for f in sorted((ROOT / "manifests" / sub).glob("*.yaml"))
                 for d in yaml.safe_load_all(f.read_text()) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(committed, key=key) == sorted(expected, key=key), "run `make manifests`"


def test_kustomization_builds_and_every_object_validates():
    kubectl = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "manifests")], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    objs = [d for d in yaml.safe_load_all(out) if d]
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "Deployment"} <= kinds
    for obj in objs:
        if obj["apiVersion"].startswith("zalando.org/"):
            continue  # served by the peering CRD in the same build
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_operator_tells_stage_pods_to_run_its_own_image_and_its_gpu_variant():
    """A run without spec.ray.image must run where kubedistill is installed: the operator's image."""
    def env(*sets):
        (dep,) = _by_kind(render(*sets), "Deployment")
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        return c["image"], {e["name"]: e.get("value") for e in c["env"]}

    image, e = env()
    assert e["KUBEDISTILL_STAGE_IMAGE"] == image and e["KUBEDISTILL_STAGE_IMAGE_GPU"] == f"{image}-gpu"
    image, e = env("image.tag=1.2.3", "image.gpuTag=1.2.3-cuda12")
    assert image.endswith(":1.2.3") and e["KUBEDISTILL_STAGE_IMAGE_GPU"].endswith(":1.2.3-cuda12")


MONITORING = ("monitoring.dashboard.enabled=true", "monitoring.serviceMonitor.enabled=true",
              "monitoring.podMonitor.enabled=true", "monitoring.prometheusRule.enabled=true")
#: a metric name in a PromQL expression: ours all start with one of these
_METRIC = re.compile(r"\b((?:kubedistill|ray)_[a-zA-Z0-9_]+)\b")
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("_sum", "_count", "_created")}


#: Ray Serve's own metrics the chart reads (Ray names them from the protocol at run time, so not greppable):
#: tests/integration/test_serving.py finds every `ray_*` name the chart queries in a live Serve's scrape
SERVE_METRICS = {"serve_http_request_latency_ms": "histogram"}


def exported_metrics() -> set[str]:
    """Every sample name the code exports: the operator's (its prometheus_client registry, with the suffixes
    Prometheus sees), the student app's (`serving.APP_METRICS`, which Ray exports as `ray_<name>`), and the
    Ray Serve metrics above."""
    import prometheus_client

    from kubedistill.cluster import controller, workqueue  # noqa: F401 - they register the operator's metrics
    from kubedistill.stages.serving import APP_METRICS

    names = {f"{f.name}{s}" for f in prometheus_client.REGISTRY.collect() for s in _SUFFIXES.get(f.type, ("",))}
    names |= {f"ray_{n}{s}" for n, kind in {**APP_METRICS, **SERVE_METRICS}.items() for s in _SUFFIXES[kind]}
    return names


def chart_ray_metrics() -> set[str]:
    """The `ray_*` sample names the chart's dashboard and alerts query (what a Ray pod must export)."""
    return {n for expr in _queries(render(*MONITORING)).values() for n in _METRIC.findall(expr) if n.startswith("ray_")}


def _queries(objs: list[dict]) -> dict[str, str]:
    """Every PromQL expression the chart ships: the dashboard's targets and the alert rules, by where."""
    import json

    out = {}
    (dashboard,) = [o for o in _by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    board = json.loads(dashboard["data"]["kubedistill.json"])
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            out[f"panel {panel['title']!r} {t['refId']}"] = t["expr"]
    (rules,) = _by_kind(objs, "PrometheusRule")
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            out[f"alert {rule['alert']}"] = rule["expr"]
    return out


def test_monitoring_is_off_by_default_and_renders_a_dashboard_monitors_and_alerts_when_asked():
    kinds = {o["kind"] for o in render()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not [o for o in render() if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    objs = render(*MONITORING)
    queries = _queries(objs)
    assert len(queries) >= 20
    for obj in objs:
        if obj["kind"] == "ConfigMap":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            assert obj["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar loads
    (sm,) = _by_kind(objs, "ServiceMonitor")
    (svc,) = _by_kind(objs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [p["name"] for p in svc["spec"]["ports"]]
    (pm,) = _by_kind(objs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "kubedistill"}  # k8s.labels
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    alerts = {r["alert"] for g in _by_kind(objs, "PrometheusRule")[0]["spec"]["groups"] for r in g["rules"]}
    assert alerts == {"KubedistillRunFailed", "KubedistillStageRetrying", "KubedistillOperatorErrors",
                      "KubedistillOperatorBlocked", "KubedistillStudentErrors", "KubedistillStudentSlow"}


def test_every_metric_the_dashboard_and_the_alerts_query_is_one_the_code_exports():
    exported = exported_metrics()
    unknown = {where: sorted(set(_METRIC.findall(expr)) - exported) for where, expr in _queries(render(*MONITORING)).items()}
    assert {w: u for w, u in unknown.items() if u} == {}
    assert all(_METRIC.findall(expr) for expr in _queries(render(*MONITORING)).values())  # each reads one of ours
    # the check can fail: a misspelt name is caught
    assert "kubedistill_operator_reconcile_second_bucket" not in exported
    assert {"kubedistill_operator_stage_seconds_bucket", "ray_kubedistill_score_requests_total",
            "ray_serve_http_request_latency_ms_bucket"} <= exported


def test_scrape_peers_reach_the_operator_and_into_each_runs_network_policy():
    from kubedistill.cluster import k8s, security
    from kubedistill.core import spec
    from tests.conftest import minimal_doc

    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    objs = render("monitoring.scrapeFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring")
    (deploy,) = _by_kind(objs, "Deployment")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = security.Settings.from_env(env)
    assert settings.metrics_from == (peer,)
    policy = k8s.network_policy(spec.parse_run(minimal_doc()), settings)
    assert {"from": [peer], "ports": [{"protocol": "TCP", "port": 8080}]} in policy["spec"]["ingress"]
    default = k8s.network_policy(spec.parse_run(minimal_doc()), security.Settings())
    assert not any(p.get("ports") == [{"protocol": "TCP", "port": 8080}] for p in default["spec"]["ingress"])
