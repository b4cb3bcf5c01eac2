"""Causal LMs for the teacher: load (hub id, local directory, `s3://` prefix, or a `scratch:` preset)
and save (to a local directory or an `s3://` prefix, through `Storage`).

`scratch:<preset>` builds a randomly initialised Llama from a documented config with a byte-level
BPE tokenizer trained on the run's domain corpus. It exists for CPU quickstarts and tests, where
no causal LM ships offline; everything after loading (DAPT, SFT, ...) is the same code path that
takes `Qwen/Qwen2.5-7B-Instruct` from a hub or a checkpoint from S3.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kubedistill.core.memory import SCRATCH
from kubedistill.core.storage import S3Options, Storage
from kubedistill.ml.models import ModelNotFound, resolve

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def is_scratch(uri: str) -> bool:
    return uri.startswith("scratch:")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer learned from `texts` (a PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def scratch(uri: str, texts: Iterable[str], seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) for `scratch:<preset>`; ModelNotFound names the presets otherwise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    preset = uri.removeprefix("scratch:")
    if preset not in SCRATCH:
        raise ModelNotFound(
            f"spec.teacher.baseModel: unknown preset {uri!r}; expected one of "
            f"{['scratch:' + p for p in SCRATCH]}, a hub id, a local directory or an s3:// prefix"
        )
    shape = SCRATCH[preset]
    tokenizer = train_tokenizer(texts, shape["vocab_size"])
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{**shape, "vocab_size": len(tokenizer)},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def load(uri: str, field: str, options: S3Options | None = None, *, dtype: Any = None) -> tuple[Any, Any]:
    """(AutoModelForCausalLM, tokenizer) from a hub id, a local directory or an s3:// prefix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubedistill.ml import prune

    path = resolve(uri, field, options)
    # a pruned teacher ships kubedistill's own modeling code (checked byte for byte): the one trusted case
    # (the tokenizer reads the same config: without the flag, transformers asks on stdin whether to run it)
    trusted = prune.is_pruned(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trusted)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trusted)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotFound(f"{field}: cannot load a causal LM from {uri}: {e}") from e
    ensure_specials(tokenizer, model)
    return model, tokenizer


def check_loadable(uri: str, field: str, options: S3Options | None = None) -> None:
    """Fail fast, without loading weights: the files resolve and hold a causal LM's config and a tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from kubedistill.ml import prune

    path = resolve(uri, field, options)
    trusted = prune.is_pruned(path)
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trusted)
        AutoTokenizer.from_pretrained(path, trust_remote_code=trusted)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotFound(f"{field}: cannot load a causal LM from {uri}: {e}") from e


def ensure_specials(tokenizer: Any, model: Any) -> None:
    """Generation and padding need eos and pad: reuse eos as pad when a tokenizer has none."""
    if tokenizer.eos_token is None:
        raise ModelNotFound(
            "the tokenizer has no end-of-sequence token; the teacher cannot learn where a response ends"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def save(model: Any, tokenizer: Any, out: Storage) -> str:
    """Write `save_pretrained` files under `out` (local or S3); returns its URI."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                out.write_bytes(f.relative_to(d).as_posix(), f.read_bytes())
    return out.uri()


def row_seed(seed: int, key: str | int) -> int:
    """A row's own sampling seed from the call's `seed` and the row's key (its prompt, or its place in the
    call): stable across processes and Python versions (not `hash`, which is salted per process)."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # what torch.Generator.manual_seed takes


class SeededSampling:
    """A logits processor that samples each row from softmax(logits / temperature) with the row's own generator,
    by the Gumbel-max trick: argmax(logits / T + G), G i.i.d. standard Gumbel, is distributed as
    softmax(logits / T) (Gumbel 1954; Maddison, Tarlow & Minka 2014). Generation then takes the argmax
    (`do_sample=False`). A row's draws come only from its seed and its step, so its sample does not depend on
    which rows share its batch or how a caller cut the prompts into calls (as vLLM's per-request seed)."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        tiny = torch.finfo(torch.float32).tiny
        u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        minus_gumbel = u.clamp_min_(tiny).log_().neg_().clamp_min_(tiny).log_()  # log(-log u) = -Gumbel
        return scores.float() / self.temperature - minus_gumbel.to(scores.device)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    with_token_counts: bool = False,
) -> list[Any]:
    """Batched `generate` with left padding: the response text of each prompt (greedy at temperature 0);
    with `with_token_counts`, (text, generated tokens up to and including end-of-sequence, whether it ended
    with end-of-sequence: False when `max_new_tokens` cut it) triples.

    At temperature > 0 each prompt is sampled with its own seed: `seeds[i]`, or `row_seed(seed, i)` (its place
    in `prompts`), so the same prompts and seeds give the same samples whatever `batch_size` is."""
    import torch
    from transformers import LogitsProcessorList

    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds: {len(seeds)} for {len(prompts)} prompts")
    row_seeds: list[int] = []  # only sampling draws from them
    if temperature > 0:
        row_seeds = list(seeds) if seeds is not None else [row_seed(seed, i) for i in range(len(prompts))]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    out: list[Any] = []  # texts, or (text, tokens, ended) triples
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            sampler = [SeededSampling(row_seeds[i : i + batch_size], temperature)] if temperature > 0 else []
            with torch.no_grad():
                ids = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    do_sample=False,
                    logits_processor=LogitsProcessorList(sampler),
                )
            new = ids[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            if not with_token_counts:
                out.extend(texts)
                continue
            is_eos = (new == tokenizer.eos_token_id).int()
            ended = is_eos.any(dim=1)
            counts = torch.where(
                ended, is_eos.argmax(dim=1) + 1, torch.full_like(ended, new.shape[1], dtype=torch.long)
            )
            out.extend(zip(texts, counts.tolist(), ended.tolist(), strict=True))
    finally:
        tokenizer.padding_side = side
    return out
