"""The README's generated blocks are current: the resource reference (from the spec models) and the
benchmarks table (from benchmarks/RESULTS.md). `make docs` rewrites them."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "scripts" / "render_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_blocks_are_generated_and_current():
    readme = (ROOT / "README.md").read_text()
    assert _script().render(readme) == readme, "README.md is stale: run `make docs`"


def test_the_reference_lists_every_spec_field_with_its_effective_default():
    from kubedistill.cluster.crd import reference_markdown
    from kubedistill.core import spec

    ref = reference_markdown()
    for path in ("spec.storage.uri` (required)", "spec.teacher.dpo.prompts", "spec.student.compareObjectives",
                 "spec.annotation.replicas.max", "spec.serving.maxBatchPairs"):
        assert f"`{path}" in ref
    row = next(line for line in ref.splitlines() if line.startswith("| `spec.student.train.epochs`"))
    assert f"`{spec.StudentSpec().train.epochs}`" in row  # the student's own default, not TrainSpec's
    assert "one of `ce`, `kd`, `crsd`" in next(line for line in ref.splitlines() if "`spec.student.objective`" in line)


def test_a_missing_block_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="BEGIN reference"):
        _script().render("# README without blocks\n")
