"""Rewrite the generated blocks of README.md: the resource reference (`kubedistill reference`, from the
spec models), the stage registry's table (`kubedistill.core.registry`) and the benchmarks table (the "Summary" section of benchmarks/RESULTS.md, where results
are recorded). Each block sits between `<!-- BEGIN <name> -->` and `<!-- END <name> -->`;
tests/unit/test_docs.py fails when the README's copy is stale.

Usage: python scripts/render_readme.py        (make docs)
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubedistill.cluster.crd import reference_markdown  # noqa: E402
from kubedistill.core.pipeline import registry_markdown  # noqa: E402


def benchmarks_summary(results: str) -> str:
    """The body of RESULTS.md's `## Summary` section (up to the next `## ` heading)."""
    m = re.search(r"^## Summary\n(.*?)(?=^## )", results, flags=re.S | re.M)
    if not m:
        raise ValueError("benchmarks/RESULTS.md has no '## Summary' section")
    return m.group(1).strip() + "\n"


def blocks() -> dict[str, str]:
    return {"reference": reference_markdown(),
            "stages": registry_markdown(),
            "benchmarks": benchmarks_summary((ROOT / "benchmarks" / "RESULTS.md").read_text())}


def render(readme: str) -> str:
    """`readme` with every generated block replaced by its current text."""
    for name, body in blocks().items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", flags=re.S)
        if not pattern.search(readme):
            raise ValueError(f"README.md has no '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' block")
        readme = pattern.sub(lambda m: m.group(1) + body + m.group(2), readme)
    return readme


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
