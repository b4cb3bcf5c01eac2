"""Generate the DistillationRun CRD from the spec models (the models are the source of truth).

Pydantic's JSON schema is turned into a Kubernetes *structural* schema: `$ref`s inlined, `anyOf
[X, null]` becomes `X` with `nullable: true`, titles dropped, `additionalProperties: false` dropped
(the API server prunes unknown fields; `kubectl apply` rejects them with strict field validation), and
free-form maps keep `additionalProperties` with a typed value schema.
"""

from __future__ import annotations

import copy
from typing import Any

from kubedistill import spec

_DROP = {"title"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _structural({**target, **extra}, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) != len(node["anyOf"])
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {len(options)} types structurally: {node}")
        merged = _structural({**options[0], **rest}, defs)
        if nullable:
            merged["nullable"] = True
            if merged.get("default", 0) is None:
                merged.pop("default")
        return merged
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):  # JSON Schema 2020 → OpenAPI 3.0
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = _structural(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def model_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def _status_schema() -> dict[str, Any]:
    schema = model_schema(spec.RunStatus)
    # metrics are free-form numbers and strings written by each stage
    stage = schema["properties"]["stages"]["items"]
    stage["properties"]["metrics"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return schema


def generate() -> dict[str, Any]:
    spec_schema = model_schema(spec.DistillationRunSpec)
    plural = "distillationruns"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{spec.API_GROUP}"},
        "spec": {
            "group": spec.API_GROUP,
            "names": {
                "kind": spec.KIND,
                "listKind": f"{spec.KIND}List",
                "plural": plural,
                "singular": "distillationrun",
                "shortNames": ["dr"],
                "categories": ["kubedistill"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": spec.API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A search-relevance distillation pipeline run.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": _status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render_yaml() -> str:
    import yaml

    header = "# Generated by `kubedistill crd` from kubedistill/spec.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(generate(), sort_keys=False, width=120)
