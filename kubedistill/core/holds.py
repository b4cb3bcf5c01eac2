"""Named points where a test can stop a running stage, to interrupt it exactly there.

A test that kills, evicts or fails a run does it at a point it controls, never after a sleep. Each
point is a call such as `hold("annotate.shard-written")`. When $KUBEDISTILL_HOLD_AT names that point,
the process reaching it writes $KUBEDISTILL_HOLD_DIR/<point> (its pid, atomically) and waits there
until it is killed; the test waits for that file, an event, then interrupts. A held process whose
parent dies (a job driver whose Ray head and job supervisor were killed around it: it runs in a
session of its own, beyond a kill of the run's process group) ends at once with status 1, writing
nothing, as if it had been killed with them; otherwise it would outlive the test, orphaned. Outside
tests the variable is unset and a hold is one environment lookup.

Points: `<stage>.manifest-written` (after a stage's manifest, before the job exits),
`annotate.shard-written` (after a shard's outputs and marker), `train.checkpoint-reported` (rank 0,
after a Ray Train checkpoint was handed to Ray Train).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

HOLD_AT_ENV = "KUBEDISTILL_HOLD_AT"
HOLD_DIR_ENV = "KUBEDISTILL_HOLD_DIR"


def hold(point: str) -> None:
    """Wait here until killed (or orphaned) when $KUBEDISTILL_HOLD_AT names `point`; otherwise return at once."""
    if os.environ.get(HOLD_AT_ENV) != point:
        return
    parent = os.getppid()
    d = Path(os.environ.get(HOLD_DIR_ENV) or ".")
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{point}.{os.getpid()}"
    tmp.write_text(str(os.getpid()))
    tmp.replace(d / point)
    print(f"kubedistill: holding at {point} (pid {os.getpid()}) until killed", flush=True)
    while os.getppid() == parent:
        time.sleep(0.2)
    # Orphaned: whatever ran this process was killed. No cleanup, no atexit, no finally: the test killed the
    # run here, and nothing may be written after that.
    os._exit(1)
