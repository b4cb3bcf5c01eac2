import os

import pytest

from kubedistill.core.storage import Storage, StorageError, filesystem_for


def test_local_roundtrip_list_delete(tmp_path):
    st = Storage(str(tmp_path / "root"))
    assert st.write_json("a/b.json", {"x": 1}) == str(tmp_path / "root" / "a" / "b.json")
    st.write_text("a/c/d.txt", "hi")
    assert st.read_json("a/b.json") == {"x": 1}
    assert st.list() == ["a/b.json", "a/c/d.txt"]
    assert st.list("a/c") == ["a/c/d.txt"]
    assert st.dirs() == ["a"] and st.dirs("a") == ["c"] and st.dirs("a/c") == [] and st.dirs("missing") == []
    assert st.exists("a/b.json") and st.is_file("a/b.json") and not st.is_file("a")
    st.delete("a/c")
    assert st.list() == ["a/b.json"]
    st.delete("nothing/here")  # missing is fine
    assert st.list("missing") == []


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    st = Storage(str(tmp_path))
    st.write_bytes("f.bin", b"1" * 1000)
    st.write_bytes("f.bin", b"2" * 10)
    assert st.read_bytes("f.bin") == b"2" * 10
    assert os.listdir(tmp_path) == ["f.bin"]


def test_missing_file_raises_file_not_found_with_uri(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Storage(str(tmp_path)).read_json("nope.json")


def test_bad_uris():
    with pytest.raises(StorageError, match="unsupported scheme"):
        filesystem_for("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        filesystem_for("s3://")


def test_child_and_uri_naming(tmp_path):
    st = Storage(f"{tmp_path}/")
    assert st.child("run").uri("stage/x") == f"{tmp_path}/run/stage/x"
    assert Storage("s3://bucket/prefix/").uri("a") == "s3://bucket/prefix/a"


def test_a_fetched_prefix_is_cached_whole_and_a_partial_copy_is_replaced(tmp_path, monkeypatch):
    from kubedistill.ml.models import fetch_prefix

    monkeypatch.setenv("KUBEDISTILL_CACHE", str(tmp_path / "cache"))
    src = Storage(str(tmp_path / "src" / "v-1"))
    src.write_text("encoder/config.json", "{}")
    src.write_text("head.bin", "h")
    dest = fetch_prefix(src.uri())
    assert (dest / "encoder" / "config.json").read_text() == "{}" and (dest / ".complete").exists()
    assert fetch_prefix(src.uri()) == dest
    (dest / ".complete").unlink()  # what a copy cut short by an older release left
    (dest / "head.bin").unlink()
    assert fetch_prefix(src.uri()) == dest and (dest / "head.bin").read_text() == "h"
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temporary copies left behind


def test_an_unreachable_endpoint_is_not_called_a_credentials_error_when_the_key_holds_403():
    from kubedistill.core.storage import _explain

    err = _explain("s3://b/x/.kubedistill-probe-c34e6403", OSError("curlCode: 7, Could not connect to server"))
    assert "endpoint" in str(err) and "AWS_ACCESS_KEY_ID" not in str(err)
    assert "AWS_ACCESS_KEY_ID" in str(_explain("s3://b/k", OSError("HTTP 403 Forbidden")))
