"""A `kubedistill run` killed while a teacher stage trains (Ray Train DDP, 2 CPU workers) resumes from
the stage's checkpoint. Its own file, so that `make test` can run it beside the teacher stages' test."""

from __future__ import annotations

import pytest

from kubedistill.core.stage import MANIFEST
from tests.integration.test_runner import _write, checkpoint_registered, kill_at
from tests.integration.test_teacher_stages import SMALL, TEACHER, _doc

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.cost(180)
def test_a_killed_teacher_training_resumes_from_its_checkpoint(tmp_path):
    # about 33 steps, a checkpoint every 20: killed at the first (the hold), the restart has 13 left
    teacher = {**TEACHER, "dapt": {"epochs": 3, "batchSize": 16, "learningRate": 1e-3}}
    syn = SMALL
    f = _write(tmp_path, _doc(str(tmp_path / "store"), "tresume", teacher, syn))
    kill_at(f, "train.checkpoint-reported", until=checkpoint_registered(tmp_path / "store" / "tresume" / "teacher-dapt"))
    assert not (tmp_path / "store" / "tresume" / "teacher-dapt" / MANIFEST).exists()
    # run again, up to the moment teacher-dapt has finished (the later teacher stages are other tests' work)
    text = kill_at(f, "teacher-dapt.manifest-written")
    assert "data: done earlier, skipped" in text
    assert "[lm] resuming from checkpoint at step" in text, text[-3000:]
    assert (tmp_path / "store" / "tresume" / "teacher-dapt" / MANIFEST).exists()
