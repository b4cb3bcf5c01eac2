"""A small causal LM that writes the teacher's format, built here in about a minute on a CPU.

Nothing ships a causal LM offline, so the annotation tests (and benchmarks/annotate_throughput.py)
train the `scratch:llama-tiny` preset on the synthetic SFT set with the teacher's own training loop
and save it with `save_pretrained`: what vLLM and transformers load from a path or an s3:// prefix.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kubedistill.core.spec import TrainSpec
from kubedistill.stages import data
from kubedistill.stages.teacher import fmt, lm, train

LABELS = ["irrelevant", "partial", "relevant"]


def build(dest: Path, steps: int = 300, seed: int = 0) -> Path:
    """Train and save under `dest`; returns it (reused when already there)."""
    if (dest / "config.json").exists():
        return dest
    g = data.generate(LABELS, 120, 150, 4, 400, 50, seed)
    sft = [{"prompt": fmt.prompt(r), "response": fmt.response(r["reasoning"], r["label"])} for r in g.sft]
    texts = [r["text"] for r in g.corpus] + [x["prompt"] + x["response"] for x in sft]
    model, tok = lm.scratch("scratch:llama-tiny", texts, seed=seed)
    cfg = train.TrainConfig(task="lm", start="", examples_uri="", train=TrainSpec(epochs=1, learning_rate=3e-3, batch_size=16, max_steps=steps), checkpoint_every=10**9)
    train.fit(cfg, model, tok, None, sft)
    part = dest.with_name(dest.name + ".partial")  # renamed into place whole: `dest` is complete or absent
    shutil.rmtree(part, ignore_errors=True)
    model.save_pretrained(part)
    tok.save_pretrained(part)
    part.rename(dest)
    return dest
