"""The operator's process: kopf's own `kopf run operator/handlers.py`, with two libraries refused first.

Run: python operator/run.py --namespace=NS ... | --all-namespaces [--standalone | --peering NAME]  (kopf's options)

`kopf run` imports kopf before it loads the handlers, and kopf imports the official Kubernetes client's
models when that package is importable (about 52 MiB; the operator talks to the API through
`kubedistill.cluster.kubeapi`, and the package stays installed for `kubedistill status`). numpy is refused for
the same reason (pyarrow imports it when it can: about 30 MiB, and nothing the operator does needs it).
"""

import sys
from pathlib import Path

for refused in ("kubernetes", "numpy"):
    sys.modules.setdefault(refused, None)  # type: ignore[arg-type]  # None marks a module as not importable

from kopf.cli import main  # noqa: E402 - after the refusals

if __name__ == "__main__":
    sys.argv = ["kopf", "run", str(Path(__file__).with_name("handlers.py")), *sys.argv[1:]]
    main()
