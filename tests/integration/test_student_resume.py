"""A `kubedistill run` killed while the student trains (Ray Train DDP, 2 CPU workers) resumes from its
checkpoint. Its own file, so that `make test` can run it beside the other student test."""

from __future__ import annotations

import pytest

from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import Storage
from tests.conftest import artifact
from tests.integration.test_runner import _write, checkpoint_registered, kill_at
from tests.integration.test_student_stage import _doc

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.cost(105)
def test_killed_training_resumes_from_its_checkpoint(tmp_path, tiny_encoder):
    # killed at its first checkpoint (the end of epoch 1 of 2): the restart has one epoch left
    syn = {"services": 60, "queries": 60, "pairsPerQuery": 5, "sftSize": 20, "evalSize": 60, "seed": 2}
    f = _write(tmp_path, _doc(str(tmp_path / "store"), "resume", tiny_encoder, syn, {"epochs": 2}))
    kill_at(f, "train.checkpoint-reported", until=checkpoint_registered(tmp_path / "store" / "resume" / "student-crsd"))
    assert not (tmp_path / "store" / "resume" / "student-crsd" / MANIFEST).exists()

    # run again, up to the moment student-crsd has finished (evaluate is other tests' work)
    text = kill_at(f, "student-crsd.manifest-written")
    assert "data: done earlier, skipped" in text
    assert "resuming from checkpoint at step" in text, text[-3000:]
    assert artifact(Storage(str(tmp_path / "store" / "resume")), "student-crsd").exists("model/student.json")
