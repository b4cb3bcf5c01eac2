"""Run a script in a fresh Python that can import only the standard library and the packages named.

The interpreter starts isolated (`-I -S`: no site hooks, no editable-install finders, no user paths), sees
this environment's site-packages, and refuses every other top-level import, so a script that works here
works for someone who installed only those packages."""

import json
import site
import subprocess
import sys
from pathlib import Path

_GUARD = """
import sys
allowed = set(sys.stdlib_module_names) | set({allowed!r})
sys.path[:0] = {paths!r}


class OnlyThese:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in allowed:
            raise ImportError(f"{{name}} is not installed in this fresh Python (only {allowed_list})")
        return None


sys.meta_path.insert(0, OnlyThese())
sys.argv = {argv!r}
import runpy

runpy.run_path({script!r}, run_name="__main__")
loaded = sorted({{m.split(".")[0] for m in sys.modules}} - set(sys.stdlib_module_names) - {{"__main__"}})
print("LOADED " + " ".join(loaded), file=sys.stderr)
"""


def run_only(packages: list[str], script: Path, args: list[str], stdin: str) -> tuple[str, set[str]]:
    """(stdout, top-level non-stdlib modules loaded) of `script args` in a fresh Python allowing only `packages`."""
    guard = _GUARD.format(
        allowed=packages,
        allowed_list=", ".join(packages),
        paths=site.getsitepackages(),
        argv=[str(script), *args],
        script=str(script),
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", guard], input=stdin, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = next(line for line in out.stderr.splitlines() if line.startswith("LOADED"))
    return out.stdout, set(loaded.split()[1:])


def score_onnx_fresh(directory: Path, query: str, texts: list[str], model: str) -> tuple[list[dict], set[str]]:
    """examples/score_onnx.py on an ONNX export, in a Python with only onnxruntime, tokenizers and numpy."""
    script = Path(__file__).resolve().parents[1] / "examples" / "score_onnx.py"
    stdout, loaded = run_only(
        ["onnxruntime", "tokenizers", "numpy"], script, [str(directory), model], json.dumps({"query": query, "texts": texts})
    )
    return json.loads(stdout), loaded
