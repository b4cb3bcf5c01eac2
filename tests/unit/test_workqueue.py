"""The operator's work queue and workers: what is reconciled when, never one run twice at once. No sleeps: the
tests drive the event loop to the points they check (timers are asked for with delays of 0 or an hour)."""

import asyncio
import threading

import pytest

from kubedistill.cluster.workqueue import WorkQueue, Why, Workers


def test_a_run_named_many_times_is_queued_once_with_the_strongest_reason():
    async def go():
        q = WorkQueue()
        q.add("a")
        q.add("b", Why.FRESH)
        q.add("a", Why.DUE)
        q.add("a")
        assert len(q) == 2
        assert await q.get() == ("a", Why.DUE) and await q.get() == ("b", Why.FRESH) and len(q) == 0

    asyncio.run(go())


def test_a_run_named_while_it_is_reconciled_is_handed_out_again_only_when_its_worker_is_done():
    async def go():
        q = WorkQueue()
        q.add("a")
        key, _ = await q.get()
        q.add("a")  # an event while "a" is being reconciled
        q.add("b")
        assert await q.get() == ("b", Why.CHANGED)  # not "a": its worker has not finished
        waiting = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        assert not waiting.done()
        q.done(key)
        assert await waiting == ("a", Why.CHANGED)

    asyncio.run(go())


def test_the_earliest_wake_wins_and_a_forgotten_run_is_not_woken():
    async def go():
        q = WorkQueue()
        q.add_after("a", 3600)
        q.add_after("a", 0)  # earlier: replaces the hour
        q.add_after("a", 3600)  # later: ignored
        assert await asyncio.wait_for(q.get(), 5) == ("a", Why.DUE)
        q.done("a")
        q.add_after("b", 0)
        q.forget("b")
        await asyncio.sleep(0.01)  # the loop passes the (cancelled) wake time
        assert len(q) == 0

    asyncio.run(go())


def _workers(sync, keys=("a", "b", "c"), **kw):
    opts = {"workers": 2, "resync": 3600, "retry": 3600, **kw}
    return Workers(lambda k: f"body-{k}" if k in keys else None, sync, lambda: list(keys), **opts)


def test_workers_reconcile_in_threads_never_the_same_run_twice_at_once():
    busy: set[str] = set()
    seen: list[tuple[str, str, Why]] = []
    lock = threading.Lock()
    release = threading.Event()

    def sync(key, body, why):
        with lock:
            assert key not in busy, f"{key} reconciled twice at once"
            assert threading.current_thread() is not threading.main_thread()
            busy.add(key)
            seen.append((key, body, why))
        release.wait(10)
        with lock:
            busy.discard(key)
        return None

    async def go():
        w = _workers(sync)
        await w.start()
        w.add("a")
        w.add("b")
        for _ in range(500):  # until both are being reconciled (each blocks on `release`)
            if len(busy) == 2:
                break
            await asyncio.sleep(0.01)
        assert busy == {"a", "b"}
        w.add("a")  # while a is being reconciled
        release.set()
        for _ in range(200):
            if len(seen) == 3 and not busy and len(w.queue) == 0:
                break
            await asyncio.sleep(0.01)
        await w.stop()

    asyncio.run(go())
    assert sorted(k for k, _, _ in seen) == ["a", "a", "b"] and ("a", "body-a", Why.CHANGED) in seen


def test_a_resync_reconciles_every_run_fresh_as_one_measured_sweep_and_a_failing_run_is_retried():
    calls: list[tuple[str, Why]] = []
    swept = []

    def sync(key, body, why):
        calls.append((key, why))
        if key == "b" and why == Why.FRESH:
            raise RuntimeError("storage down")
        return None

    async def go():
        w = _workers(sync, retry=0.01, on_sweep_start=lambda: swept.append(True))
        await w.start()
        w.resync()
        for _ in range(300):
            if ("b", Why.DUE) in calls and w.sweeps:
                break
            await asyncio.sleep(0.01)
        await w.stop()
        return w.sweeps

    sweeps = asyncio.run(go())
    assert {(k, why) for k, why in calls if why == Why.FRESH} == {("a", Why.FRESH), ("b", Why.FRESH), ("c", Why.FRESH)}
    assert ("b", Why.DUE) in calls  # raised: tried again after `retry`
    assert swept == [True] and len(sweeps) == 1 and sweeps[0] >= 0


def test_a_run_that_asks_to_be_woken_is_reconciled_again_when_its_time_comes():
    calls: list[Why] = []

    def sync(key, body, why):
        calls.append(why)
        return 0.0 if len(calls) == 1 else None  # a retry backoff that has just ended

    async def go():
        w = _workers(sync)
        await w.start()
        w.add("a")
        for _ in range(300):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
        await w.stop()

    asyncio.run(go())
    assert calls == [Why.CHANGED, Why.DUE]


def test_a_run_that_is_gone_is_handed_to_sync_as_none():
    got = []

    async def go():
        w = _workers(lambda k, body, why: got.append((k, body)), keys=())
        await w.start()
        w.add("gone")
        for _ in range(300):
            if got:
                break
            await asyncio.sleep(0.01)
        await w.stop()

    asyncio.run(go())
    assert got == [("gone", None)]


@pytest.mark.parametrize("bad", [{"workers": 0}, {"resync": 0}, {"retry": -1}])
def test_workers_refuse_settings_that_cannot_work(bad):
    with pytest.raises(ValueError, match="workers must be"):
        _workers(lambda *a: None, **bad)
