"""A TCP proxy that adds latency: every chunk is held `delay` seconds in each direction, in order.

Put in front of a real server (SeaweedFS's S3 gateway in `benchmarks/operator_scale.py`), it makes every
request and response cross a slow link: one round trip costs twice the delay more, as with an object store a
network hop away. This is the userspace form of `tc qdisc ... netem delay`, which needs the kernel's
sch_netem module (not in every kernel: not in this project's CI machines). What it does not model: a
delay on connection set-up (it accepts at once) and packet loss.

Run: python -m tests.latency --port P --to HOST:PORT [--delay-ms 10]   (prints "ready" when listening)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await held.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = asyncio.create_task(release())
    try:
        while data := await reader.read(1 << 16):
            held.put_nowait((loop.time() + delay, data))
    except OSError:
        pass
    finally:
        held.put_nowait((loop.time() + delay, b""))  # the end, after what came before it
        with contextlib.suppress(OSError):
            await sender


async def serve(port: int, host: str, target: int, delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, target)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(_pipe(client_r, server_w, delay), _pipe(server_r, client_w, delay))
        except asyncio.CancelledError:  # the proxy is stopping
            pass
        finally:
            for w in (client_w, server_w):
                w.close()

    _listening = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    os._exit(0)  # connections still open are cut, as a link going down would: nothing to drain or save


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--to", required=True, help="HOST:PORT of the real server")
    p.add_argument("--delay-ms", type=float, default=10.0, help="held in each direction (a round trip: twice this)")
    a = p.parse_args()
    host, _, target = a.to.rpartition(":")
    asyncio.run(serve(a.port, host, int(target), a.delay_ms / 1000))
