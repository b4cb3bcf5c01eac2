"""Storage against a real S3 server (SeaweedFS), as the stages use it in a cluster."""

import pytest

from kubedistill.core.storage import Storage, StorageError

pytestmark = pytest.mark.s3


def test_s3_roundtrip_list_delete(bucket):
    st = Storage(f"s3://{bucket}/runs/r1")
    st.write_json("data/_SUCCESS.json", {"ok": True})
    st.write_bytes("data/logs/part-00000.parquet", b"PAR1")
    assert st.read_json("data/_SUCCESS.json") == {"ok": True}
    assert st.list("data") == ["data/_SUCCESS.json", "data/logs/part-00000.parquet"]
    st.write_bytes("data/v-b/x", b"1")
    assert st.dirs("data") == ["logs", "v-b"] and st.dirs() == ["data"] and st.dirs("missing") == []
    st.delete("data/v-b")
    assert st.exists("data/logs/part-00000.parquet")
    assert not st.exists("data/missing")
    st.delete("data/logs")
    assert st.list("data") == ["data/_SUCCESS.json"]
    with pytest.raises(FileNotFoundError):
        st.read_bytes("data/logs/part-00000.parquet")


def test_endpoint_from_spec_overrides_environment(bucket, s3_env, monkeypatch):
    from kubedistill.core.storage import S3Options

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    opts = S3Options.from_env(endpoint=s3_env.endpoint)
    assert opts.endpoint == s3_env.endpoint
    st = Storage(f"s3://{bucket}/x", opts)
    st.check_writable()
    st.write_json("probe.json", {"written": "through the spec's endpoint"})
    # the object is on the real server the spec named (read back by a client that only knows that server)
    assert Storage(f"s3://{bucket}/x", S3Options.from_env(endpoint=s3_env.endpoint)).read_json("probe.json") == {
        "written": "through the spec's endpoint"}
    with pytest.raises(StorageError, match="endpoint"):  # while the environment's endpoint alone reaches nothing
        Storage(f"s3://{bucket}/x", S3Options.from_env()).check_writable()


def test_wrong_credentials_are_rejected_with_a_hint(bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        Storage(f"s3://{bucket}/x").check_writable()


def test_unreachable_endpoint_says_so(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="endpoint"):
        Storage("s3://bucket/x").check_writable()


def _run_file(tmp_path, uri: str):
    import yaml

    from tests.conftest import minimal_doc

    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(minimal_doc(storage={"uri": uri}, teacher={"enabled": False},
                                            annotation={"enabled": False}, pruning={"enabled": False})))
    return f


def test_kubedistill_run_with_bad_credentials_says_which_variables_to_check(bucket, monkeypatch, tmp_path, capsys):
    from kubedistill import cli

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    assert cli.main(["run", str(_run_file(tmp_path, f"s3://{bucket}/runs")), "--serve-port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: storage: s3://") and "Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in err


def test_kubedistill_run_against_an_unreachable_s3_says_check_the_endpoint(monkeypatch, tmp_path, capsys):
    from kubedistill import cli

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert cli.main(["run", str(_run_file(tmp_path, "s3://bucket/runs")), "--serve-port", "0"]) == 1
    err = capsys.readouterr().err
    assert "Is the S3 endpoint reachable? Check spec.storage.endpoint or AWS_ENDPOINT_URL." in err
