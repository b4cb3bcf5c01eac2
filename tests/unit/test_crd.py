"""The CRD is generated from the spec models; the committed copy must match, be structural, and agree
with pydantic on what is valid (schema and CEL rules)."""

import copy

import celpy
import jsonschema
import pytest
import yaml

from kubedistill.cluster import crd
from kubedistill.core import spec
from tests.conftest import ROOT, SAMPLES, minimal_doc
from tests.kuberay import draft4

COMMITTED = ROOT / "manifests" / "crds" / "kubedistill.io_distillationruns.yaml"


def test_committed_crd_matches_generated():
    assert COMMITTED.read_text() == crd.render_yaml(), "regenerate with: kubedistill crd > " + str(COMMITTED.relative_to(ROOT))


def _walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _version():
    return crd.generate()["spec"]["versions"][0]


def test_schema_is_structural():
    schema = _version()["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        for banned in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"):
            assert banned not in node, f"{banned} at {path}"
        if node.get("additionalProperties") is False:
            pytest.fail(f"additionalProperties: false at {path}")
        if "properties" in node and not path.endswith(".properties"):
            assert node.get("type") == "object", path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node:
                assert node[key] is True, f"{key} must be a boolean (OpenAPI 3.0) at {path}"


def test_names_printer_columns_and_status_subresource():
    doc = crd.generate()
    names = doc["spec"]["names"]
    assert (doc["spec"]["group"], names["kind"], names["shortNames"]) == ("kubedistill.io", "DistillationRun", ["dr"])
    v = _version()
    assert v["name"] == "v1alpha1" and v["subresources"] == {"status": {}}
    assert [c["name"] for c in v["additionalPrinterColumns"]] == ["Phase", "Stage", "Progress", "Age"]
    status = v["schema"]["openAPIV3Schema"]["properties"]["status"]
    metrics = status["properties"]["stages"]["items"]["properties"]["metrics"]
    assert metrics["x-kubernetes-preserve-unknown-fields"] is True


def _validator():
    return jsonschema.Draft4Validator(draft4(_version()["schema"]["openAPIV3Schema"]))


def test_samples_pass_the_crd_schema():
    for f in sorted(SAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            errors = list(_validator().iter_errors(doc))
            assert not errors, (f.name, [e.message for e in errors])


@pytest.mark.parametrize(
    "patch",
    [
        {"labels": ["one"]},
        {"annotation": {"engine": "tensorrt"}},
        {"pruning": {"targetRatio": 1.0}},
        {"teacher": {"dpo": {"beta": 0}}},
        {"student": {"objective": "mse"}},
    ],
)
def test_crd_schema_and_pydantic_agree_on_invalid_values(patch):
    doc = minimal_doc(**patch)
    assert list(_validator().iter_errors(doc)), "CRD schema accepted it"
    with pytest.raises(spec.SpecError):
        spec.parse_run(doc)


def _cel_rules(schema, path=()):
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule
    for name, sub in schema.get("properties", {}).items():
        yield from _cel_rules(sub, path + (name,))


def _at(doc, path):
    node = doc
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _eval_rules(doc, old=None):
    """Evaluate every CEL rule of the CRD against `doc`, as the API server would; return failures. Transition
    rules (`oldSelf`) run only on an update (`old`, the stored object) where the field was there before."""
    env = celpy.Environment()
    failures = []
    for path, rule in _cel_rules(_version()["schema"]["openAPIV3Schema"]):
        node, before = _at(doc, path), _at(old, path) if old is not None else None
        transition = "oldSelf" in rule["rule"]
        if node is None or (transition and before is None):
            continue
        activation = {"self": celpy.json_to_cel(node)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(before)
        ok = env.program(env.compile(rule["rule"])).evaluate(activation)
        if not ok:
            failures.append(rule["message"])
    return failures


def test_cel_rules_compile_and_match_pydantic():
    rules = list(_cel_rules(_version()["schema"]["openAPIV3Schema"]))
    assert len(rules) >= 3
    good = minimal_doc(serving={"replicas": {"min": 1, "max": 2}}, student={"compareObjectives": ["ce", "kd"]},
                       annotation={"votes": 4})  # kd learns the annotate stage's vote shares
    assert _eval_rules(good) == []
    spec.parse_run(good)
    for serving in ({"runtime": "torch", "gpusPerReplica": 1}, {"runtime": "onnx-int8", "gpusPerReplica": 0},
                    {"gpusPerReplica": 1.5}):
        assert _eval_rules(minimal_doc(serving=serving)) == []
        spec.parse_run(minimal_doc(serving=serving))
    cases = [
        (minimal_doc(serving={"replicas": {"min": 3, "max": 2}}), "min must be <= max"),
        (minimal_doc(annotation={"replicas": {"min": 5, "max": 1}}), "min must be <= max"),
        (minimal_doc(serving={"enabled": True}, student={"enabled": False}), "serving.enabled requires student.enabled"),
        (minimal_doc(serving={"maxBatchPairs": 50}), "maxBatchPairs must be >= maxServices"),
        (minimal_doc(serving={"maxServices": 600}), "maxBatchPairs must be >= maxServices"),
        (minimal_doc(serving={"runtime": "onnx-int8", "gpusPerReplica": 1}),
         "runtime onnx and onnx-int8 score on CPUs: set runtime torch (or leave it unset) for GPU replicas"),
        (minimal_doc(student={"compareObjectives": ["ce", "crsd"]}), "compareObjectives must not repeat objective"),
        (minimal_doc(student={"objective": "ce", "compareObjectives": ["ce"]}), "compareObjectives must not repeat objective"),
        (minimal_doc(data={"synthetic": {"corpusOnlyShare": 0.25}}),
         "corpusOnlyShare needs world: knowledge (only the knowledge world has corpus-only facts)"),
    ]
    for syn in ({"world": "knowledge", "corpusOnlyShare": 0.25}, {"corpusOnlyShare": 0}, {"world": "classic"}):
        assert _eval_rules(minimal_doc(data={"synthetic": syn})) == []
        spec.parse_run(minimal_doc(data={"synthetic": syn}))
    for doc, message in cases:
        assert message in _eval_rules(copy.deepcopy(doc))
        with pytest.raises(spec.SpecError):
            spec.parse_run(doc)


def test_the_storage_of_a_run_cannot_change_after_it_is_created():
    old = minimal_doc(storage={"uri": "s3://bucket/runs", "endpoint": "http://minio:9000"})
    assert _eval_rules(old) == []  # on create there is no old object
    assert _eval_rules(copy.deepcopy(old), old) == []  # an update that keeps it
    moved = minimal_doc(storage={"uri": "s3://other/runs", "endpoint": "http://minio:9000"})
    (message,) = _eval_rules(moved, old)
    assert message.startswith("spec.storage is immutable") and "create a new DistillationRun" in message
