import textwrap

import pytest

from kubedistill import cli
from kubedistill.cluster import crd
from tests.conftest import SAMPLES


def test_validate_ok(capsys):
    assert cli.main(["validate", str(SAMPLES / "quickstart.yaml")]) == 0
    assert "DistillationRun quickstart is valid" in capsys.readouterr().out


def test_validate_reports_every_problem_and_exits_nonzero(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text(textwrap.dedent("""
        apiVersion: kubedistill.io/v1alpha1
        kind: DistillationRun
        metadata: {name: bad}
        spec:
          storage: {uri: ./runs}
          labels: [only-one]
          evaluation: {minMacroF1: 1.5}
          serving: {replicas: {min: 1, max: 0}}
        """))
    assert cli.main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    for path in ("spec.labels:", "spec.evaluation.minMacroF1:", "spec.serving.replicas.max:"):
        assert path in err


def test_plan_and_crd(capsys):
    assert cli.main(["plan", str(SAMPLES / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    for n, stage in enumerate(("data", "teacher-dapt", "teacher-sft", "reward-model", "teacher-dpo", "annotate",
                               "student-crsd", "evaluate", "prune-search", "serve"), 1):
        assert f"{n:>2}. {stage}" in out  # the quickstart runs every stage but rationalize (annotation.mode)
    assert out.rstrip().endswith("disabled: rationalize")
    assert cli.main(["crd"]) == 0
    assert capsys.readouterr().out == crd.render_yaml()


@pytest.mark.parametrize("command", list(cli.EXAMPLES))
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"kubedistill {command}" in capsys.readouterr().out


def test_status_before_any_run(tmp_path, capsys):
    f = tmp_path / "r.yaml"
    f.write_text((SAMPLES / "quickstart.yaml").read_text().replace("uri: ./runs", f"uri: {tmp_path}/store"))
    assert cli.main(["status", str(f)]) == 1
    assert "no status in storage yet" in capsys.readouterr().out


def test_render_prints_every_object_as_a_yaml_stream(capsys):
    import yaml

    from kubedistill.cluster import k8s
    from kubedistill.core import spec

    assert cli.main(["render", str(SAMPLES / "quickstart.yaml")]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    run = spec.with_absolute_paths(spec.load_run(SAMPLES / "quickstart.yaml"), ".")
    assert docs == k8s.render(run)
    assert [d["metadata"]["name"] for d in docs][:2] == ["quickstart-data", "quickstart-teacher-dapt"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signals_become_keyboard_interrupt(sig):
    import os
    import signal

    from kubedistill import runner

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
        runner.install_signal_handlers()
        with pytest.raises(KeyboardInterrupt, match="signal"):
            os.kill(os.getpid(), getattr(signal, sig))
            signal.sigtimedwait([], 1)  # let the handler run
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_an_ignored_sigint_stays_ignored():
    """A run started in the background by a shell ignores SIGINT; SIGTERM still stops it."""
    import signal

    from kubedistill import runner

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        runner.install_signal_handlers()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _file(tmp_path, **spec_fields):
    import yaml

    from tests.conftest import minimal_doc

    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(minimal_doc(storage={"uri": str(tmp_path / "store")}, **spec_fields)))
    return f


def test_run_refuses_a_busy_serve_port_before_starting_anything(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["run", str(_file(tmp_path)), "--serve-port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"port {port} is in use" in err and "--serve-port" in err
    assert not (tmp_path / "store").exists()  # nothing was started or written


def test_a_busy_port_does_not_matter_when_nothing_is_served(tmp_path):
    from kubedistill.core import spec

    run = spec.load_run(_file(tmp_path, serving={"enabled": False}))
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert cli.preflight(run, None, busy.getsockname()[1]) is None


def test_run_without_ray_installed_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray looks like to `import ray`
    assert cli.main(["run", str(_file(tmp_path)), "--serve-port", "0"]) == 1
    err = capsys.readouterr().err
    assert "Ray is not installed" in err and "make dev" in err


def test_run_against_an_address_without_ray_says_how_to_start_one(tmp_path, capsys):
    from tests.conftest import free_port

    f = _file(tmp_path, teacher={"enabled": False}, annotation={"enabled": False}, pruning={"enabled": False})
    assert cli.main(["run", str(f), "--address", f"127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to Ray at" in err and "ray start --head" in err


def test_status_of_a_name_without_a_cluster_says_what_to_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["status", "relevance-2026w48"]) == 1
    err = capsys.readouterr().err
    assert "'relevance-2026w48' is not a file" in err and "set KUBECONFIG" in err


def test_reference_prints_the_generated_field_table(capsys):
    assert cli.main(["reference"]) == 0
    assert capsys.readouterr().out == crd.reference_markdown()


def test_status_shows_a_running_stages_progress(capsys):
    status = {"phase": "Running", "currentStage": "student-crsd", "stages": [
        {"name": "data", "phase": "Succeeded", "metrics": {"rows": 200}},
        {"name": "student-crsd", "phase": "Running", "progress": {
            "done": 120, "total": 226, "unit": "steps", "updatedAt": "2026-12-05T02:00:00Z",
            "summary": "crsd student: 120/226 steps (53%) loss 0.4120 · 3.10 steps/s · ETA 34s"}}]}
    cli._print_status("default/r1", status)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "run default/r1: Running (at student-crsd)"
    assert out[2].split() == ["student-crsd", "Running", "crsd", "student:", "120/226", "steps", "(53%)", "loss",
                              "0.4120", "·", "3.10", "steps/s", "·", "ETA", "34s", "(at", "2026-12-05T02:00:00Z)"]
