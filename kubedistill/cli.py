"""`kubedistill`: validate, plan and run DistillationRuns; generate the CRD; read a run's status."""

from __future__ import annotations

import argparse
import sys
import textwrap

from kubedistill import __version__

EXAMPLES = {
    "validate": "kubedistill validate manifests/samples/quickstart.yaml",
    "crd": "kubedistill crd > manifests/crds/kubedistill.io_distillationruns.yaml",
    "plan": "kubedistill plan manifests/samples/quickstart.yaml",
    "run": "kubedistill run manifests/samples/quickstart.yaml\n  kubedistill run run.yaml --serve-port 8080 --no-wait"
           "\n  RAY_ADDRESS=127.0.0.1:6379 kubedistill run run.yaml --address auto",
    "status": "kubedistill status manifests/samples/quickstart.yaml",
    "render": "kubedistill render manifests/samples/quickstart.yaml > rayjobs.yaml",
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
        return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {EXAMPLES[name]}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    v = cmd("validate", "Check a DistillationRun file; print every problem with its field path.")
    v.add_argument("file")
    cmd("crd", "Print the DistillationRun CustomResourceDefinition generated from the spec models.")
    pl = cmd("plan", "Print the stage graph a DistillationRun expands to.")
    pl.add_argument("file")
    r = cmd("run", "Run a DistillationRun's stages on a local Ray cluster; finished stages are skipped.")
    r.add_argument("file")
    r.add_argument("--address", help="connect to this Ray cluster instead of starting one (e.g. 'auto')")
    r.add_argument("--serve-port", type=int, default=8000, help="HTTP port of the served student (default 8000)")
    r.add_argument("--no-wait", action="store_true",
                   help="exit when the stages are done, even if the local cluster is serving the student")
    s = cmd("status", "Show a run's stages from its storage.")
    s.add_argument("file")
    rn = cmd("render", "Print, as a YAML stream, every RayJob and the RayService the operator creates for a run.")
    rn.add_argument("file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kubedistill.spec import SpecError

    try:
        return _dispatch(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from kubedistill import crd, pipeline, spec

    if args.command == "crd":
        sys.stdout.write(crd.render_yaml())
        return 0
    if args.command == "validate":
        runs = spec.load_runs(args.file)
        for run in runs:
            print(f"{args.file}: DistillationRun {run.name} is valid")
        return 0
    run = spec.with_absolute_paths(spec.load_run(args.file), ".")
    if args.command == "plan":
        print(pipeline.render_plan(run, pipeline.build(run)))
        return 0
    if args.command == "status":
        return _status(run)
    if args.command == "render":
        import yaml

        from kubedistill import k8s

        sys.stdout.write(yaml.safe_dump_all(k8s.render(run), sort_keys=False))
        return 0
    if args.command == "run":
        return _run(run, args.address, args.serve_port, not args.no_wait)
    raise AssertionError(args.command)


def _status(run) -> int:  # type: ignore[no-untyped-def]
    from kubedistill import pipeline, runner
    from kubedistill.stage import run_storage
    from kubedistill.storage import StorageError

    stages = pipeline.build(run)
    try:
        status = runner.read_status(run_storage(stages[0].config))
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if status is None:
        print(f"run {run.name}: no status in storage yet (has it been started with `kubedistill run`?)")
        return 1
    print(f"run {run.name}: {status.phase}" + (f" (at {status.current_stage})" if status.current_stage else ""))
    for st in status.stages:
        scalars = {k: v for k, v in st.metrics.items() if isinstance(v, (int, float, str))}
        shown = "  ".join(f"{k}={v}" for k, v in list(scalars.items())[:4])
        msg = f"  {st.message}" if st.message else ""
        print(f"  {st.name:<13} {st.phase:<10} {shown}{msg}")
    return 0 if status.phase != "Failed" else 1


def _run(run, address: str | None, serve_port: int, keep_serving: bool) -> int:  # type: ignore[no-untyped-def]
    from kubedistill import runner
    from kubedistill.storage import StorageError

    runner.install_signal_handlers()
    try:
        runner.run_local(run, address=address, serve_port=serve_port, keep_serving=keep_serving)
    except StorageError as e:
        print(f"error: storage: {e}", file=sys.stderr)
        return 1
    except runner.RunFailed as e:
        print(f"error: {e}\n" + textwrap.indent("finished stages are kept; fix the cause and run the same command again", "  "),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
