"""Validate objects against KubeRay v1.7.0's own CRD schemas (../shared/kuberay-v1.7.0/crds/).

The API server prunes unknown fields silently, so a typo would vanish instead of failing: the
schemas here forbid properties they do not declare (unless marked preserve-unknown-fields).
"""

from functools import cache
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parent.parent / "third_party" / "kuberay-v1.7.0" / "crds"


def draft4(node, strict: bool = False):
    """A CRD's OpenAPI v3 schema as JSON Schema draft 4: `nullable` → a null type, x-kubernetes-*
    dropped; `strict` also forbids undeclared properties (except under preserve-unknown-fields)."""
    if isinstance(node, list):
        return [draft4(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: draft4(v, strict) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = out["enum"] + [None]
    if strict and "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


#: libyaml's safe loader where installed (the KubeRay CRDs are 2 MB of YAML: 8 s each in pure Python)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def validator(kind: str) -> jsonschema.Draft4Validator:
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=_LOADER)  # noqa: S506 - a safe loader
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft4Validator(draft4(version["schema"]["openAPIV3Schema"], strict=True))


#: the oldest Kubernetes minor the chart supports that kubernetes-validate ships
K8S_VERSION = "1.30.0"


def errors(obj: dict) -> list[str]:
    """Every schema violation of `obj`, as 'path: message': a RayJob, RayService or RayCluster against KubeRay's
    schema and each of its pod templates against Kubernetes' own; any other object against Kubernetes' own."""
    if not obj.get("apiVersion", "").startswith("ray.io/"):
        return k8s_errors(obj)
    v = validator(obj["kind"])
    out = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(obj)]
    for path, template in pod_templates(obj):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        out += [f"{path}.{e}" for e in k8s_errors(doc)]
    return out


def k8s_errors(obj: dict) -> list[str]:
    import kubernetes_validate
    import kubernetes_validate.utils

    # it reads and parses its JSON schema files on every call (20 ms each); they never change in a session
    if not hasattr(kubernetes_validate.utils.schema_contents, "cache_info"):
        kubernetes_validate.utils.schema_contents = cache(kubernetes_validate.utils.schema_contents)

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    return []


def pod_templates(obj: dict):
    """(path, pod template) of every pod a RayJob or RayService makes: head, worker groups, job submitter."""
    spec = obj["spec"]
    if "submitterPodTemplate" in spec:
        yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
    key = "rayClusterSpec" if "rayClusterSpec" in spec else "rayClusterConfig"
    cluster = spec[key]
    yield f"spec.{key}.headGroupSpec.template", cluster["headGroupSpec"]["template"]
    for i, g in enumerate(cluster["workerGroupSpecs"]):
        yield f"spec.{key}.workerGroupSpecs[{i}].template", g["template"]
