"""A stage job's driver log, kept in storage: readable after KubeRay's TTL has deleted the Ray cluster.

`captured()` tees everything the job's process writes to its stdout and stderr (file descriptors 1 and 2:
its own prints, the worker lines Ray forwards to the driver, what C libraries write) into a local file,
while the job log (`kubectl logs`, Ray's job log) gets it all as before. `keep()` uploads that file to
`<run>/<stage>/logs/<UTC time>-<id>.log` when the job ends, succeeded or failed, and keeps the newest
`KEEP_LOGS` of the stage. The run report links them. A process killed outright (SIGKILL, the OOM killer)
uploads nothing: its log is then only where Kubernetes keeps pod logs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from kubedistill.core.storage import Storage

LOGS_DIR = "logs"
KEEP_LOGS = 10


@contextlib.contextmanager
def captured() -> Iterator[Path]:
    """Tee fds 1 and 2 into a temporary file (yielded, complete once the block ends; the caller deletes it)."""
    fd, name = tempfile.mkstemp(prefix="kubedistill-driver-", suffix=".log")
    os.close(fd)
    path = Path(name)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with open(path, "ab") as f:
            while chunk := os.read(read_end, 65536):
                os.write(saved_out, chunk)  # the job log first: it must never wait on the copy
                with contextlib.suppress(OSError):
                    f.write(chunk)
                    f.flush()

    thread = threading.Thread(target=pump, name="driver-log", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        # EOF once every copy of the write end is closed; a child process still holding one (an engine that
        # outlived its job) ends the wait after a while instead
        thread.join(10)
        if not thread.is_alive():
            os.close(read_end)
        os.close(saved_out)
        os.close(saved_err)


def log_name(at: datetime | None = None) -> str:
    """`<stage>/logs/` name of a job's log: its UTC start time (names sort by time) and a random id."""
    stamp = (at or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:8]}.log"


def keep(storage: Storage, stage: str, path: Path, name: str, keep_logs: int = KEEP_LOGS) -> str:
    """Upload the captured log as `<stage>/logs/<name>` and delete all but the newest `keep_logs`; its URI."""
    uri = storage.write_bytes(f"{stage}/{LOGS_DIR}/{name}", path.read_bytes())
    for old in stage_logs(storage, stage)[keep_logs:]:
        storage.delete(f"{stage}/{LOGS_DIR}/{old}")
    return uri


def stage_logs(storage: Storage, stage: str) -> list[str]:
    """The stage's kept driver logs, newest first (names relative to `<stage>/logs/`)."""
    names = storage.list(f"{stage}/{LOGS_DIR}", recursive=False)
    return sorted((n.rsplit("/", 1)[-1] for n in names if n.endswith(".log")), reverse=True)
