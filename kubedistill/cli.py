"""`kubedistill`: validate, plan and run DistillationRuns; generate the CRD; read a run's status."""

from __future__ import annotations

import argparse
import importlib
import socket
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubedistill import __version__

if TYPE_CHECKING:  # imported where used: `kubedistill --help` stays fast
    from kubedistill.core.spec import DistillationRun

EXAMPLES = {
    "validate": "kubedistill validate manifests/samples/quickstart.yaml",
    "crd": "kubedistill crd > manifests/crds/kubedistill.io_distillationruns.yaml",
    "plan": "kubedistill plan manifests/samples/quickstart.yaml",
    "run": "kubedistill run manifests/samples/quickstart.yaml\n  kubedistill run run.yaml --serve-port 8080 --no-wait"
    "\n  RAY_ADDRESS=127.0.0.1:6379 kubedistill run run.yaml --address auto",
    "status": "kubedistill status manifests/samples/quickstart.yaml     # from the run's storage"
    "\n  kubedistill status relevance-2026w48 -n search-ml   # from the cluster (KUBECONFIG)",
    "render": "kubedistill render manifests/samples/quickstart.yaml > rayjobs.yaml",
    "report": "kubedistill report manifests/samples/quickstart.yaml   # prints where report.html was written",
    "reference": "kubedistill reference > reference.md",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubedistill",
        description="Distil an LLM relevance teacher into a fast student, as a pipeline of Ray stages.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"kubedistill {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    v = cmd("validate", "Check a DistillationRun file; print every problem with its field path.")
    v.add_argument("file")
    cmd("crd", "Print the DistillationRun CustomResourceDefinition generated from the spec models.")
    pl = cmd("plan", "Print the stage graph a DistillationRun expands to.")
    pl.add_argument("file")
    r = cmd("run", "Run a DistillationRun's stages on a local Ray cluster; finished stages are skipped.")
    r.add_argument("file")
    r.add_argument("--address", help="connect to this Ray cluster instead of starting one (e.g. 'auto')")
    r.add_argument("--serve-port", type=int, default=8000, help="HTTP port of the served student (default 8000)")
    r.add_argument(
        "--no-wait",
        action="store_true",
        help="exit when the stages are done, even if the local cluster is serving the student",
    )
    s = cmd(
        "status", "Show a run's stages: from its storage (a DistillationRun file), or from the cluster (a run's name)."
    )
    s.add_argument(
        "target", metavar="FILE|NAME", help="a DistillationRun file (local status), or the name of a run in the cluster"
    )
    s.add_argument(
        "-n", "--namespace", help="the run's namespace (cluster; default: the kubeconfig context's, else default)"
    )
    rp = cmd(
        "report", "Write the run's HTML report (metrics, objectives compared, gate, pruning, lineage) to its storage."
    )
    rp.add_argument("file")
    cmd("reference", "Print the DistillationRun field reference (Markdown), generated from the spec models.")
    rn = cmd("render", "Print, as a YAML stream, every RayJob and the RayService the operator creates for a run.")
    rn.add_argument("file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kubedistill.core.spec import SpecError

    try:
        return _dispatch(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from kubedistill.cluster import crd
    from kubedistill.core import pipeline, spec

    if args.command == "crd":
        sys.stdout.write(crd.render_yaml())
        return 0
    if args.command == "reference":
        sys.stdout.write(crd.reference_markdown())
        return 0
    if args.command == "status" and not Path(args.target).is_file():
        return _cluster_status(args.target, args.namespace)
    if args.command == "validate":
        runs = spec.load_runs(args.file)
        for run in runs:
            print(f"{args.file}: DistillationRun {run.name} is valid")
        return 0
    run = spec.with_absolute_paths(spec.load_run(args.target if args.command == "status" else args.file), ".")
    if args.command == "plan":
        stages = pipeline.build(run)
        mem = memory_plan(run, stages)
        print(pipeline.render_plan(run, stages, {k: f"memory: {p.line()}" for k, p in mem.stages.items()}))
        for why in mem.refusals():
            print(f"error: {why}", file=sys.stderr)
        return 1 if mem.refusals() else 0
    if args.command == "status":
        return _status(run)
    if args.command == "report":
        return _report(run)
    if args.command == "render":
        import yaml

        from kubedistill.cluster import k8s

        sys.stdout.write(yaml.safe_dump_all(k8s.render(run), sort_keys=False))
        return 0
    if args.command == "run":
        return _run(run, args.address, args.serve_port, not args.no_wait)
    raise AssertionError(args.command)


def _status(run: DistillationRun) -> int:
    from kubedistill import runner
    from kubedistill.core import pipeline
    from kubedistill.core.stage import run_storage
    from kubedistill.core.storage import StorageError

    stages = pipeline.build(run)
    try:
        status = runner.read_status(run_storage(stages[0].config))
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if status is None:
        print(f"run {run.name}: no status in storage yet (has it been started with `kubedistill run`?)")
        return 1
    _print_status(run.name, status.model_dump(by_alias=True))
    return 0 if status.phase != "Failed" else 1


def _print_status(name: str, status: dict[str, Any]) -> None:
    """The run's phase, then one line per stage: phase, its progress while it runs, its first scalar metrics,
    its message."""
    at = f" (at {status['currentStage']})" if status.get("currentStage") else ""
    print(f"run {name}: {status.get('phase') or 'Pending'}{at}")
    for st in status.get("stages") or []:
        scalars = {k: v for k, v in (st.get("metrics") or {}).items() if isinstance(v, (int, float, str))}
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(scalars.items())[:4])
        msg = f"  {st['message']}" if st.get("message") else ""
        if (p := st.get("progress")) and p.get("summary"):
            shown = f"{p['summary']} (at {p.get('updatedAt', '?')})  {shown}".rstrip()
        print(f"  {st['name']:<13} {st.get('phase') or 'Pending':<10} {shown}{msg}")
    for c in status.get("conditions") or []:
        if c.get("status") == "False":
            print(f"  condition {c['type']}=False ({c.get('reason')}): {c.get('message', '')}")


def _cluster_status(name: str, namespace: str | None) -> int:
    """A run's `.status` from the Kubernetes API (kubeconfig, or in-cluster credentials)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from kubedistill.core import spec

    try:
        try:
            config.load_incluster_config()
            ns = namespace or "default"
        except config.ConfigException:
            config.load_kube_config()
            ns = namespace or config.list_kube_config_contexts()[1]["context"].get("namespace") or "default"
    except (config.ConfigException, OSError) as e:
        print(
            f"error: {name!r} is not a file, and there is no cluster to look it up in: {e}. Pass a DistillationRun "
            "file for a local run, or set KUBECONFIG for a cluster.",
            file=sys.stderr,
        )
        return 1
    api = client.CustomObjectsApi()
    try:
        body = api.get_namespaced_custom_object(spec.API_GROUP, spec.API_VERSION, ns, "distillationruns", name)
    except ApiException as e:
        if e.status == 404:
            print(
                f"error: no DistillationRun {name!r} in namespace {ns} (and no file of that name); "
                f"`kubectl get dr -A` lists the runs",
                file=sys.stderr,
            )
        else:
            print(
                f"error: the cluster refused to read DistillationRun {ns}/{name}: {e.status} {e.reason}",
                file=sys.stderr,
            )
        return 1
    except (HTTPError, OSError) as e:
        print(f"error: cannot reach the Kubernetes API of the current kubeconfig context: {e}", file=sys.stderr)
        return 1
    status = body.get("status") or {}
    _print_status(f"{ns}/{name}", status)
    uri = ((body.get("spec") or {}).get("storage") or {}).get("uri")
    if uri:
        from kubedistill.core.stage import run_prefix

        print(f"  artifacts and report: {run_prefix(uri, name)}/ (report.html)")
    return 0 if status.get("phase") != "Failed" else 1


def _report(run: DistillationRun) -> int:
    from kubedistill import report, runner
    from kubedistill.core import pipeline
    from kubedistill.core.stage import run_storage
    from kubedistill.core.storage import StorageError

    stages = pipeline.build(run)
    storage = run_storage(stages[0].config)
    try:
        print(report.write(storage, run.name, [s.name for s in stages], runner.read_status(storage)))
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def memory_plan(run: DistillationRun, stages: list[Any]) -> Any:
    """The teacher training stages' memory plan (`kubedistill.core.memory`), model configs read with the run's
    storage endpoint and the environment's credentials."""
    from kubedistill.core import memory
    from kubedistill.core.stage import run_storage

    options = run_storage(stages[0].config).options if stages else None
    return memory.plan(run.spec, [s.name for s in stages], options)


def preflight(run: DistillationRun, address: str | None, serve_port: int) -> str | None:
    """What stops `kubedistill run` before anything starts, said with what to do; None when it can start."""
    from kubedistill.core import pipeline

    refusals = memory_plan(run, pipeline.build(run)).refusals()
    if refusals:
        return "; ".join(refusals) + " (`kubedistill plan` shows every stage's estimate)"
    try:
        for module in ("ray", "ray.job_submission"):  # Ray, and its job API (ray[default])
            importlib.import_module(module)
    except ImportError as e:
        return (
            f"Ray is not installed in this environment ({e}). kubedistill runs its stages on Ray: "
            "`make dev` (or pip install -e '.[dev]') installs it"
        )
    if address and address != "auto" and not address.startswith(("ray://", "http")):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
        except (OSError, ValueError) as e:
            return (
                f"cannot connect to Ray at {address}: {e}. Start one with `ray start --head` (its GCS address is "
                "host:6379), or omit --address to start a local one for this run"
            )
    if run.spec.serving.enabled and run.spec.student.enabled and not address:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", serve_port))
            except OSError:
                return (
                    f"port {serve_port} is in use, and the student is served on it when the run ends. Stop what "
                    f"holds it (another `kubedistill run` still serving? `lsof -i :{serve_port}`), or pass "
                    f"--serve-port {serve_port + 80 if serve_port + 80 < 65536 else 8080}"
                )
    return None


def _run(run: DistillationRun, address: str | None, serve_port: int, keep_serving: bool) -> int:
    from kubedistill import runner
    from kubedistill.core.storage import StorageError

    if why := preflight(run, address, serve_port):
        print(f"error: {why}", file=sys.stderr)
        return 1
    runner.install_signal_handlers()
    try:
        runner.run_local(run, address=address, serve_port=serve_port, keep_serving=keep_serving)
    except StorageError as e:
        print(f"error: storage: {e}", file=sys.stderr)
        return 1
    except runner.RayUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except runner.RunFailed as e:
        print(
            f"error: {e}\n"
            + textwrap.indent("finished stages are kept; fix the cause and run the same command again", "  "),
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
