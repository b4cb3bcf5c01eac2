"""Rewrite the generated blocks of README.md and benchmarks/RESULTS.md: the resource reference (`kubedistill
reference`, from the spec models), the stage registry's table (`kubedistill.core.registry`) and the benchmarks
summary (`kubedistill.benchrecord.summary_markdown`, from the JSON records the benchmark scripts wrote to
benchmarks/records/; the same table in both files). Each block sits between `<!-- BEGIN <name> -->` and
`<!-- END <name> -->`; tests/unit/test_docs.py fails when either file is stale.

Usage: python scripts/render_readme.py        (make docs)
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubedistill import benchrecord  # noqa: E402
from kubedistill.cluster.crd import reference_markdown  # noqa: E402
from kubedistill.core.pipeline import registry_markdown  # noqa: E402


def _benchmarks() -> str:
    records = benchrecord.load()
    return benchrecord.summary_markdown(records, benchrecord.unrecorded(records))


#: each generated block and what renders it (only the blocks a file holds are rendered)
BLOCKS = {"reference": reference_markdown, "stages": registry_markdown, "benchmarks": _benchmarks}


def render(readme: str, names: tuple[str, ...] = ("reference", "stages", "benchmarks")) -> str:
    """`readme` with the generated blocks `names` replaced by their current text."""
    for name in names:
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", flags=re.S)
        if not pattern.search(readme):
            raise ValueError(f"no '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' block")
        body = BLOCKS[name]()
        readme = pattern.sub(lambda m: m.group(1) + body + m.group(2), readme)
    return readme


RESULTS = ROOT / "benchmarks" / "RESULTS.md"

if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
    RESULTS.write_text(render(RESULTS.read_text(), ("benchmarks",)))
