"""TCP ports for the servers kubedistill starts on one machine (a local Ray, the student's Serve, test
services), chosen so that no other process can be handed them.

Binding port 0 and releasing the socket is a race: the kernel hands that port out again, to the next
`bind(0)` in this process (two services got the same port) or to any other process drawing from the
ephemeral range (Ray workers, outgoing connections). So ports come from *below* the ephemeral range,
which the kernel never assigns on its own, and each is claimed with an exclusive `flock` on a file
named after it: parallel runs on one machine (two `kubedistill run`s, two test sessions) never pick the
same port, and a claim vanishes with the process that held it, however it died. A port some other
program bound by number is skipped; one bound after our check is the caller's to detect and retry
(see `start_with_retries`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

#: Below the ephemeral range and above Ray's default worker ports (10002-19999), which other Ray
#: clusters on the machine may use.
LOWEST = 20000
LOCK_DIR_ENV = "KUBEDISTILL_PORT_LOCK_DIR"

T = TypeVar("T")


class PortsUnavailable(RuntimeError):
    """No free port was found in the range."""


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux), or the IANA one elsewhere."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 49152, 65535


def allowed_range() -> range:
    """Ports we may claim: from LOWEST up to the start of the ephemeral range (or, if the ephemeral
    range starts too low to leave room, the ports above it)."""
    lo, hi = ephemeral_range()
    if lo - LOWEST >= 1000:
        return range(LOWEST, lo)
    return range(max(hi + 1, LOWEST), 65536)


def _lock_dir() -> Path:
    """Shared by every user of the machine, like /tmp itself (world-writable, sticky)."""
    d = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "kubedistill-ports")
    if not d.is_dir():
        d.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):  # another user made it first
            d.chmod(0o1777)
    return d


def _free_now(port: int) -> bool:
    """Nothing listens on or holds `port` on any local address (binding 0.0.0.0 conflicts with all)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class Ports:
    """Ports claimed by this process until `release()` (or its exit): `ports = Ports.claim(3)`."""

    def __init__(self, claimed: dict[int, int | None]):
        self._fds = claimed  # port -> its open lock file descriptor (None: given by number, not claimed)

    @classmethod
    def given(cls, numbers: Iterable[int]) -> Ports:
        """Ports chosen elsewhere (a user's flag, a test), held without a claim."""
        return cls(dict.fromkeys(numbers))

    @classmethod
    def claim(cls, n: int, *, candidates: Iterable[int] | None = None, attempts: int = 2000) -> Ports:
        """Claim `n` distinct ports, tried in `candidates` order (default: random order over
        `allowed_range()`); a port is taken only if its lock is free and nothing is bound to it."""
        pool: Iterable[int] = (
            candidates if candidates is not None else random.sample(allowed_range(), len(allowed_range()))
        )
        claimed: dict[int, int | None] = {}
        lock_dir = _lock_dir()
        for tried, port in enumerate(pool):
            if len(claimed) == n:
                break
            if tried >= attempts:
                break
            if port in claimed:
                continue
            try:  # read-only is enough for flock, and opens another user's lock file too
                fd = os.open(lock_dir / f"{port}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
            except PermissionError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if not _free_now(port):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                continue
            claimed[port] = fd
        ports = cls(claimed)
        if len(claimed) < n:
            ports.release()
            raise PortsUnavailable(
                f"found {len(claimed)} of {n} free port(s) in {allowed_range()} (lock files in {lock_dir})"
            )
        return ports

    @property
    def numbers(self) -> list[int]:
        return list(self._fds)

    def __iter__(self) -> Iterator[int]:
        return iter(self.numbers)

    def __getitem__(self, i: int) -> int:
        return self.numbers[i]

    def __len__(self) -> int:
        return len(self._fds)

    def release(self) -> None:
        for fd in self._fds.values():
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._fds = {}

    def __enter__(self) -> Ports:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def start_with_retries(
    service: str,
    start: Callable[[Ports], T],
    n_ports: int,
    *,
    tries: int = 3,
    claim: Callable[[int], Ports] = Ports.claim,
    retry_on: tuple[type[Exception], ...] = (),
) -> tuple[T, Ports]:
    """Start `service` on `n_ports` freshly claimed ports; when `start` raises `PortInUse` (a port was
    bound by another program after it was checked), or one of `retry_on` (a start-up race outside our
    control that the caller documents), try again with fresh ports. Returns what `start` returned and
    the claimed ports (the caller releases them when the service stops)."""
    failures: list[str] = []
    last: Exception = PortInUse()
    for _ in range(tries):
        ports = claim(n_ports)
        try:
            return start(ports), ports
        except (PortInUse, *retry_on) as e:  # type: ignore[misc]  # mypy cannot type a starred tuple here
            ports.release()
            failures.append(str(e))
            last = e
        except BaseException:
            ports.release()
            raise
    what = "could not bind its ports" if isinstance(last, PortInUse) else "did not start"
    raise type(last)(f"{service} {what} in {tries} tries:\n" + "\n---\n".join(failures))


class PortInUse(RuntimeError):
    """A service failed to start because a port it was given is taken; the message carries its log tail."""


BIND_ERRORS = ("address already in use", "bind: address", "errno 98", "eaddrinuse", "failed to bind")


def looks_like_bind_failure(log: str) -> bool:
    low = log.lower()
    return any(s in low for s in BIND_ERRORS)
