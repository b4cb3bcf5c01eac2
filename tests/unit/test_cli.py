import textwrap

import pytest

from kubedistill import cli, crd
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
    assert "1. data" in out and "2. teacher-dapt" in out and "6. student-crsd" in out and "8. prune-search" in out
    assert "disabled: annotate\n" in out
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

    from kubedistill import k8s, spec

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
