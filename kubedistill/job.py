"""`python -m kubedistill.job <module>:<function>`: the entrypoint of every stage's Ray job.

The local runner submits it to a local Ray, the operator puts it in each stage's RayJob; the argument
is the stage's registry entry (`kubedistill.core.registry`), and the stage's config arrives as JSON in
$KUBEDISTILL_STAGE_CONFIG. The function runs under `stage.main`: skipped when already done, its
manifest written last, `_FAILED.json` and exit status 1 when it raises.
"""

from __future__ import annotations

import importlib
import sys
from typing import cast

from kubedistill.core import stage


def resolve(target: str) -> stage.StageFn:
    """The stage function named by `module:function`; a clear error when it does not exist."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"kubedistill.job: expected <module>:<function>, got {target!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"kubedistill.job: cannot load stage function {target!r}: {e}") from None
    if not callable(fn):
        raise SystemExit(f"kubedistill.job: {target!r} is not a function")
    return cast(stage.StageFn, fn)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m kubedistill.job <module>:<function>")
    stage.main(resolve(args[0]))


if __name__ == "__main__":
    main()
