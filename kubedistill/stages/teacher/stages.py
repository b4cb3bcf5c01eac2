"""The four teacher stages, each `run_<stage>(ctx) -> {"metrics", "outputs"}` (see kubedistill.core.stage).

Every stage checks its inputs on the driver before any worker starts (a base model that cannot be
loaded, an empty or malformed SFT set, an unknown reward dimension fail fast with the field's name)
and trains with `kubedistill.stages.teacher.train.run`. Everything that holds a model outside training
(measuring the start model, sampling for DPO, loading the trained weights, evaluating, saving under
`<stage>/v-<version>/model/`) runs as one Ray task with a training worker's resources (`on_worker`): on a GPU
cluster that is a GPU node, never the RayJob's driver. The manifest is written by
`kubedistill.core.stage.execute` only after all of that succeeded.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from kubedistill.core import memory
from kubedistill.core.spec import OWN_ANSWER_SAMPLES, REWARD_DIMENSIONS, DpoSpec, Resources, TrainSpec
from kubedistill.core.stage import StageContext
from kubedistill.core.storage import S3Options, Storage
from kubedistill.ml import sharded
from kubedistill.ml.models import device, resolve
from kubedistill.stages.data import RowError, read_dataset, split_by_query, validate_row, with_rationales, write_rows
from kubedistill.stages.teacher import fmt, lm, pairs
from kubedistill.stages.teacher.train import (
    RewardModel,
    TrainConfig,
    build,
    combined,
    encode,
    preference_accuracy,
    run,
)

EVAL_PROMPTS = 400  # held-out prompts each evaluation generates for
FIT_PAIRS = 512  # DPO's preference pairs scored after training (pairs_fitted), at most, in sampling order
HELD_PAIRS = 2000  # held-out reward-model pairs scored, at most (every dimension, in row order)


def _train_config(
    ctx: StageContext, task: str, start: str, examples: str, section: TrainSpec, **extra: Any
) -> TrainConfig:
    o = ctx.storage.options
    s3 = S3Options(endpoint=o.endpoint, region=o.region)  # credentials stay in the workers' environment
    t = ctx.spec.teacher
    shape, why = memory.read_shape(start, o)
    planned = memory.plan_stage(ctx.spec, ctx.name, shape, why)
    ctx.log(f"memory: {planned.line()}")
    if refusal := planned.refusal():
        raise ValueError(refusal)
    return TrainConfig(
        task=task,
        start=start,
        examples_uri=examples,
        train=section,
        s3=s3,
        max_length=t.max_length,
        strategy=planned.estimate.strategy if planned.estimate else memory.strategy(ctx.spec, ctx.name, None),
        gradient_checkpointing=t.gradient_checkpointing,
        precision=t.resources.precision,
        seed=t.seed,
        **extra,
    )


def _model_uri(ctx: StageContext, stage: str) -> str:
    return ctx.input(stage).uri("model")


def on_worker(resources: Resources, fn: Any, *args: Any) -> Any:
    """`fn(*args)` as a Ray task with one training worker's CPUs and GPUs; its result."""
    import ray

    task = ray.remote(fn).options(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker)
    return ray.get(task.remote(*args))


def trained_model(cfg: TrainConfig, checkpoint: Any, options: Any) -> tuple[Any, Any]:
    """The start model with the checkpoint's weights (LoRA merged), on this worker's device."""
    model, tokenizer, _ = build(cfg, options, reference=False)
    sharded.load_model(checkpoint, model)
    if cfg.lora:
        model = model.merge_and_unload()
    return model.to(device()), tokenizer


def sft_rows(ctx: StageContext, labels: list[str]) -> list[dict[str, Any]]:
    """The SFT seed set, every row checked: an empty or malformed set fails naming spec.data.sftSeed."""
    src = ctx.input("data").child("sft")
    try:
        raw = read_dataset(src)
    except ValueError as e:
        raise ValueError(f"spec.data.sftSeed: {e}") from e
    if not raw:
        raise ValueError(
            f"spec.data.sftSeed: the SFT set at {src.uri()} is empty; the teacher needs labeled pairs with reasoning"
        )
    rows = []
    for i, r in enumerate(raw, 1):
        try:
            rows.append(validate_row(r, labels, need_reasoning=False))
        except RowError as e:
            raise ValueError(f"spec.data.sftSeed: row {i}: {e}") from e
    if "rationalize" in ctx.inputs:  # another LLM explained the labels: its chains where a row has none
        rows = with_rationales(rows, read_dataset(ctx.input("rationalize").child("labeled")))
        explained = [r for r in rows if r["reasoning"].strip()]
        if not explained:
            raise ValueError(
                f"spec.data.sftSeed: none of its {len(rows)} row(s) has reasoning, its own or from spec.annotation.model"
            )
        return explained  # a row the model could not explain (it disagreed) teaches no chain
    missing = [i for i, r in enumerate(rows, 1) if not r["reasoning"].strip()]
    if missing:  # labeled rows without reasoning are valid data; only the teacher's SFT needs the chains
        raise ValueError(
            f"spec.data.sftSeed: {len(missing)} of {len(rows)} row(s) have no 'reasoning' (first: row {missing[0]}); "
            "the teacher is fine-tuned on reasoning chains: add them to the rows, have another LLM explain the labels "
            "(spec.annotation.model with spec.annotation.mode: rationalize), or train no teacher "
            "(spec.teacher.enabled: false) and let the student learn the labels (spec.student.objective: ce)"
        )
    return rows


#: Seed of the query split `teacher.preferenceHoldout` makes: fixed, so teachers of several seeds hold out the same
#: queries, and not the reward model's held-out split's (seed 0), so both sides of that split have preference rows.
PREFERENCE_SPLIT_SEED = 1


def preference_split(rows: list[dict[str, Any]], share: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the rows teacher-sft trains on, the rows DPO's prompts and the reward model's own answers come from): whole
    queries, `share` of them (`spec.teacher.preferenceHoldout`) kept out of SFT; share 0: the whole set, twice."""
    if not share:
        return rows, rows
    sft, held = split_by_query(rows, share, PREFERENCE_SPLIT_SEED)
    if not sft:
        raise ValueError(
            f"spec.teacher.preferenceHoldout: {share} holds out every one of the SFT set's "
            f"{len({r['query'] for r in rows})} queries; lower it or add SFT pairs"
        )
    return sft, held


def eval_rows(ctx: StageContext) -> list[dict[str, Any]]:
    return read_dataset(ctx.input("data").child("eval"))[:EVAL_PROMPTS]


# ---------------------------------------------------------------------------------------------
# Measurements


def perplexity(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 32, max_length: int = 256) -> float:
    """exp(mean next-token NLL) over every token of `texts`."""
    from kubedistill.ml.losses import IGNORE, sequence_logprob

    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            b = {
                k: v.to(model.device)
                for k, v in encode(
                    tokenizer, [""] * len(texts[i : i + batch_size]), texts[i : i + batch_size], max_length
                ).items()
            }
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            nll -= float(sequence_logprob(logits, b["labels"]).sum())
            n += int((b["labels"][:, 1:] != IGNORE).sum())
    return math.exp(nll / max(1, n))


def response_quality(responses: list[str], rows: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Parse rate, label accuracy (an unparseable response counts as wrong) and why responses failed to parse."""
    parsed: list[fmt.Parsed | None] = []
    errors: dict[str, int] = {}
    for text in responses:
        try:
            parsed.append(fmt.parse_response(text, labels))
        except fmt.ParseError as e:
            parsed.append(None)
            why = str(e).split(" is not one of")[0] if "is not one of" in str(e) else str(e)
            errors[why] = errors.get(why, 0) + 1
    ok = sum(1 for p in parsed if p is not None)
    correct = sum(1 for p, r in zip(parsed, rows, strict=True) if p is not None and p.label == r["label"])
    return {
        "prompts": len(rows),
        "parse_rate": ok / max(1, len(rows)),
        "label_accuracy": correct / max(1, len(rows)),
        "parse_errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }


def reward_scores(
    rm: RewardModel, tokenizer: Any, prompts: list[str], responses: list[str], batch_size: int = 64
) -> torch.Tensor:
    """(n, dimensions) scores of each (prompt, response)."""
    rm.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            b = encode(tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size], 256)
            device = rm.heads.weight.device
            out.append(rm(b["input_ids"].to(device), b["attention_mask"].to(device)).cpu())
    return torch.cat(out) if out else torch.zeros((0, len(rm.dimensions)))


# ---------------------------------------------------------------------------------------------
# teacher-dapt


def domain_texts(ctx: StageContext) -> list[str]:
    """The domain corpus (service descriptions, category knowledge) plus the log's distinct queries."""
    data = ctx.input("data")
    texts = [r["text"] for r in read_dataset(data.child("corpus"))] if data.list("corpus") else []
    seen: set[str] = set()
    for r in read_dataset(data.child("logs")) if data.list("logs") else []:
        if r["query"] not in seen:
            seen.add(r["query"])
            texts.append(r["query"])
    return texts


def _start_perplexity(start: str, texts: list[str], options: Any) -> float:
    model, tokenizer = lm.load(start, "spec.teacher.baseModel", options)
    return perplexity(model.to(device()), tokenizer, texts)


def _finish_dapt(cfg: TrainConfig, checkpoint: Any, out_uri: str, options: Any, held: list[str]) -> dict[str, Any]:
    model, tokenizer = trained_model(cfg, checkpoint, options)
    return {
        "perplexity_after": perplexity(model, tokenizer, held),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": lm.save(model, tokenizer, Storage(out_uri, options)),
    }


def run_dapt(ctx: StageContext) -> dict[str, Any]:
    t = ctx.spec.teacher
    base, res, options = t.base_model, t.resources, ctx.storage.options
    texts = domain_texts(ctx)
    if len(texts) < 10:
        raise ValueError(
            f"spec.data.corpus: {len(texts)} domain text(s); domain-adaptive pre-training needs at least 10"
        )
    rng = random.Random(0)
    rng.shuffle(texts)
    held = texts[: max(5, len(texts) // 20)]
    train = texts[len(held) :]
    if lm.is_scratch(base):
        sft = read_dataset(ctx.input("data").child("sft")) if ctx.input("data").list("sft") else []
        extra = [fmt.prompt(r) + fmt.response(r.get("reasoning") or "", r["label"]) for r in sft if r.get("label")]
        model, tokenizer = lm.scratch(base, texts + extra, seed=t.seed)
        start = lm.save(model, tokenizer, ctx.out.child("init"))
        ctx.log(f"built {base}: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)}")
    else:
        lm.check_loadable(base, "spec.teacher.baseModel", options)  # fail before any worker starts
        start = base
    before = on_worker(res, _start_perplexity, start, held, options)
    write_rows(ctx.out, "examples/part-00000", [{"text": x} for x in train], "jsonl")
    cfg = _train_config(ctx, "lm", start, ctx.out.uri("examples"), t.dapt)
    ctx.log(f"{len(train)} domain texts ({len(held)} held out), held-out perplexity before {before:.2f}")
    checkpoint, metrics = run(ctx, cfg, res, "dapt")
    done = on_worker(res, _finish_dapt, cfg, checkpoint, ctx.out.uri("model"), options, held)
    ctx.log(f"held-out perplexity {before:.2f} -> {done['perplexity_after']:.2f}; model at {done['model']}")
    return {
        "metrics": {
            **metrics,
            "perplexity_before": before,
            "perplexity_after": done["perplexity_after"],
            "train_texts": len(train),
            "heldout_texts": len(held),
            "parameters": done["parameters"],
        },
        "outputs": {"model": done["model"]},
    }


# ---------------------------------------------------------------------------------------------
# teacher-sft


def _finish_sft(
    cfg: TrainConfig,
    checkpoint: Any,
    out_uri: str,
    options: Any,
    ev: list[dict[str, Any]],
    labels: list[str],
    max_new_tokens: int,
) -> dict[str, Any]:
    model, tokenizer = trained_model(cfg, checkpoint, options)
    responses = lm.generate(model, tokenizer, [fmt.prompt(r) for r in ev], max_new_tokens=max_new_tokens)
    return {
        "eval": response_quality(responses, ev, labels),
        "model": lm.save(model, tokenizer, Storage(out_uri, options)),
    }


def replay_texts(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """`n` of `texts` for SFT to replay: seeded passes over them, each text once per pass (a corpus
    smaller than `n` is replayed whole, more than once).

    Replaying pre-training data while fine-tuning keeps what it taught (Ibrahim et al. 2024, "Simple and
    Scalable Strategies to Continually Pre-train Large Language Models": a small share of replay
    undoes most of the forgetting)."""
    if n <= 0:
        return []
    if not texts:
        raise ValueError("no domain texts to replay")
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        order = list(texts)
        rng.shuffle(order)
        out += order[: n - len(out)]
    return out


def sft_examples(rows: list[dict[str, Any]], replay: list[str]) -> list[dict[str, Any]]:
    """The SFT stage's training rows: each pair's prompt and response (the response trained), then each
    replayed domain text (every token trained, as in DAPT); the loop shuffles them together."""
    pairs = [{"prompt": fmt.prompt(r), "response": fmt.response(r["reasoning"], r["label"])} for r in rows]
    return pairs + [{"text": t} for t in replay]


def sft_replay(ctx: StageContext, pairs: int) -> list[str]:
    """The domain texts SFT replays beside its `pairs` pairs (`spec.teacher.sft.corpusReplay` per pair), drawn
    from teacher-dapt's training texts (never its held-out ones)."""
    ratio = ctx.spec.teacher.sft.corpus_replay
    if not ratio:
        return []
    dapt = ctx.input("teacher-dapt")
    texts = [r["text"] for r in read_dataset(dapt.child("examples"))]  # a missing prefix reads as no rows
    if not texts:
        raise ValueError(
            f"spec.teacher.sft.corpusReplay: teacher-dapt's output at {dapt.uri()} holds no training texts to "
            "replay (examples/); set corpusReplay to 0, or run teacher-dapt again"
        )
    return replay_texts(texts, round(ratio * pairs), seed=ctx.spec.teacher.seed)


def run_sft(ctx: StageContext) -> dict[str, Any]:
    labels, t = ctx.spec.labels, ctx.spec.teacher
    s, res = t.sft, t.resources
    rows = preference_split(sft_rows(ctx, labels), t.preference_holdout)[0]
    start = _model_uri(ctx, "teacher-dapt")
    replay = sft_replay(ctx, len(rows))
    write_rows(ctx.out, "examples/part-00000", sft_examples(rows, replay), "jsonl")
    cfg = _train_config(ctx, "lm", start, ctx.out.uri("examples"), s, lora=s.lora)
    ctx.log(
        f"{len(rows)} SFT pairs"
        + (f" (the queries of {t.preference_holdout:.0%} held out for DPO)" if t.preference_holdout else "")
        + (f" and {len(replay)} replayed domain texts" if replay else "")
        + (f", LoRA r={s.lora.r}" if s.lora else ", full fine-tuning")
    )
    checkpoint, metrics = run(ctx, cfg, res, "sft")
    done = on_worker(
        res,
        _finish_sft,
        cfg,
        checkpoint,
        ctx.out.uri("model"),
        ctx.storage.options,
        eval_rows(ctx),
        labels,
        t.max_new_tokens,
    )
    q = done["eval"]
    ctx.log(
        f"eval: {q['parse_rate']:.1%} parseable, label accuracy {q['label_accuracy']:.1%}; model at {done['model']}"
    )
    return {
        "metrics": {**metrics, "sft_rows": len(rows), "replayed_texts": len(replay), "eval": q},
        "outputs": {"model": done["model"]},
    }


# ---------------------------------------------------------------------------------------------
# reward-model


def dimensions_of(spec_dims: dict[str, float]) -> list[str]:
    unknown = sorted(set(spec_dims) - set(REWARD_DIMENSIONS))
    if unknown or not spec_dims:
        raise ValueError(
            f"spec.teacher.rewardModel.dimensions: unknown {unknown or 'none given'}; "
            f"expected some of {list(REWARD_DIMENSIONS)}"
        )
    return [d for d in REWARD_DIMENSIONS if d in spec_dims]


def save_reward_model(rm: RewardModel, tokenizer: Any, weights: dict[str, float], out: Storage) -> str:

    from safetensors.torch import save

    uri = lm.save(rm.backbone, tokenizer, out)
    out.write_bytes("reward_heads.safetensors", save({k: v.contiguous() for k, v in rm.heads.state_dict().items()}))
    out.write_json("reward.json", {"dimensions": rm.dimensions, "weights": weights})
    return uri


def load_reward_model(uri: str, options: Any) -> tuple[RewardModel, Any, dict[str, float]]:
    from safetensors.torch import load
    from transformers import AutoModel, AutoTokenizer

    path = resolve(uri, "reward model", options)
    st = Storage(uri, options)
    meta = st.read_json("reward.json")
    rm = RewardModel(AutoModel.from_pretrained(path), meta["dimensions"])
    rm.heads.load_state_dict(load(st.read_bytes("reward_heads.safetensors")))
    return rm, AutoTokenizer.from_pretrained(path), meta["weights"]


def _finish_reward(
    cfg: TrainConfig,
    checkpoint: Any,
    out_uri: str,
    options: Any,
    held_pairs: list[pairs.Pair],
    weights: dict[str, float],
    held_own: list[pairs.Pair],
) -> dict[str, Any]:
    rm, tokenizer = trained_model(cfg, checkpoint, options)
    dims = rm.dimensions
    sc = reward_scores(rm, tokenizer, [p.prompt for p in held_pairs], [p.chosen for p in held_pairs])
    sr = reward_scores(rm, tokenizer, [p.prompt for p in held_pairs], [p.rejected for p in held_pairs])
    accuracy: dict[str, float] = {}
    for i, d in enumerate(dims):
        idx = [k for k, p in enumerate(held_pairs) if p.dimension == d]
        if idx:
            accuracy[d] = float((sc[idx, i] > sr[idx, i]).float().mean())
    combined_acc = float((combined(sc, dims, weights) > combined(sr, dims, weights)).float().mean())
    own = None
    if held_own:
        oc = reward_scores(rm, tokenizer, [p.prompt for p in held_own], [p.chosen for p in held_own])
        orj = reward_scores(rm, tokenizer, [p.prompt for p in held_own], [p.rejected for p in held_own])
        own = float((combined(oc, dims, weights) > combined(orj, dims, weights)).float().mean())
    return {
        "own_answers_accuracy": own,
        "pairwise_accuracy": accuracy,
        "combined_pairwise_accuracy": combined_acc,
        "model": save_reward_model(rm, tokenizer, weights, Storage(out_uri, options)),
    }


def _own_samples(
    start: str, options: Any, prompts: list[str], k: int, seed: int, max_new_tokens: int
) -> list[list[str]]:
    """k samples (temperature 1, `seed`) of the SFT teacher for each prompt."""
    sft, tokenizer = lm.load(start, "teacher-sft model", options)
    sft = sft.to(device())
    repeated = [p for p in prompts for _ in range(k)]
    out = lm.generate(sft, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    return [out[i * k : (i + 1) * k] for i in range(len(prompts))]


def own_answer_pairs(rows: list[dict[str, Any]], samples: list[list[str]], labels: list[str]) -> list[pairs.Pair]:
    """Label pairs of the teacher's own answers: per row, a sample with its label over one without (the row's own
    response where no sample has it); none where every sample is right."""
    out = []
    for row, these in zip(rows, samples, strict=True):
        gold = fmt.response(row["reasoning"], row["label"])
        pair = pairs.choose_by_label(these, [0.0] * len(these), row["label"], gold, labels)
        if pair:
            out.append(pairs.Pair(fmt.prompt(row), pair[0], pair[1], "label"))
    return out


def run_reward(ctx: StageContext) -> dict[str, Any]:
    labels, r, seed = ctx.spec.labels, ctx.spec.teacher.reward_model, ctx.spec.teacher.seed
    dims = dimensions_of(r.dimensions)
    rows = sft_rows(ctx, labels)
    train_rows, held_rows = split_by_query(rows, 0.2, 0)
    unseen = {x["query"] for x in preference_split(rows, ctx.spec.teacher.preference_holdout)[1]}
    train_pairs = pairs.reward_pairs(train_rows, labels, dims, seed=seed)
    held_pairs = pairs.reward_pairs(held_rows, labels, dims, seed=1)[:HELD_PAIRS]
    start, res = _model_uri(ctx, "teacher-sft"), ctx.spec.teacher.resources
    held_own: list[pairs.Pair] = []
    n_own = 0
    if r.own_answers:
        n_held = max(1, r.own_answers // 5)
        pool = [x for x in train_rows if x["query"] in unseen]
        pool_held = [x for x in held_rows if x["query"] in unseen]
        ask = random.Random(seed).sample(pool, min(r.own_answers - n_held, len(pool)))
        ask_held = random.Random(seed).sample(pool_held, min(n_held, len(pool_held)))
        prompts = [fmt.prompt(x) for x in ask + ask_held]
        samples = on_worker(
            res,
            _own_samples,
            start,
            ctx.storage.options,
            prompts,
            OWN_ANSWER_SAMPLES,
            seed,
            ctx.spec.teacher.max_new_tokens,
        )
        own = own_answer_pairs(ask, samples[: len(ask)], labels)
        held_own = own_answer_pairs(ask_held, samples[len(ask) :], labels)
        n_own, train_pairs = len(own), train_pairs + own
        random.Random(seed).shuffle(train_pairs)
        ctx.log(
            f"{len(own)} + {len(held_own)} held-out label pairs of the teacher's own answers from {len(prompts)} prompts"
        )
    write_rows(ctx.out, "examples/part-00000", [p.__dict__ for p in train_pairs], "jsonl")
    cfg = _train_config(ctx, "reward", start, ctx.out.uri("examples"), r, dimensions=tuple(dims))
    ctx.log(f"{len(train_pairs)} training / {len(held_pairs)} held-out pairs over {dims}")
    checkpoint, metrics = run(ctx, cfg, res, "reward")
    done = on_worker(
        res,
        _finish_reward,
        cfg,
        checkpoint,
        ctx.out.uri("model"),
        ctx.storage.options,
        held_pairs,
        r.dimensions,
        held_own,
    )
    ctx.log(
        "held-out pairwise accuracy: "
        + ", ".join(f"{d} {a:.1%}" for d, a in done["pairwise_accuracy"].items())
        + f", combined {done['combined_pairwise_accuracy']:.1%}"
        + (f"; on the teacher's own answers {done['own_answers_accuracy']:.1%}" if held_own else "")
    )
    return {
        "metrics": {
            **metrics,
            "pairwise_accuracy": done["pairwise_accuracy"],
            "combined_pairwise_accuracy": done["combined_pairwise_accuracy"],
            "own_answers_accuracy": done["own_answers_accuracy"],
            "train_pairs": len(train_pairs),
            "heldout_pairs": len(held_pairs),
            "own_answer_pairs": {"train": n_own, "heldout": len(held_own)},
        },
        "outputs": {"model": done["model"]},
    }


# ---------------------------------------------------------------------------------------------
# teacher-dpo


def judge(
    rm: RewardModel,
    rm_tok: Any,
    weights: dict[str, float],
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    labels: list[str],
    max_new_tokens: int,
) -> dict[str, Any]:
    """Greedy responses (at most `max_new_tokens`) to `rows`' prompts: mean combined reward, parse rate, label
    accuracy, and how well the reward ranks the responses with the right label over the wrong ones (`reward_auc`:
    0.5 is chance; None when all are right or all wrong): whether the reward model can judge this teacher's own
    answers, which its held-out pairs (perturbations of the SFT set's responses) do not show."""
    prompts = [fmt.prompt(r) for r in rows]
    responses = lm.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    reward = combined(reward_scores(rm, rm_tok, prompts, responses), rm.dimensions, weights).tolist()
    right = [fmt.gives(t, r["label"], labels) for t, r in zip(responses, rows, strict=True)]
    return {
        **response_quality(responses, rows, labels),
        "mean_reward": sum(reward) / max(1, len(reward)),
        "reward_auc": pairs.ranking_auc(reward, right),
    }


def _reward_model_on_device(rm_uri: str, options: Any) -> tuple[RewardModel, Any, dict[str, float]]:
    rm, rm_tok, weights = load_reward_model(rm_uri, options)
    return rm.to(device()), rm_tok, weights


def _sample_dpo(
    start: str,
    rm_uri: str,
    options: Any,
    rows: list[dict[str, Any]],
    d: DpoSpec,
    ev: list[dict[str, Any]],
    labels: list[str],
    seed: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """`d.samples_per_prompt` samples per prompt of `rows` from the SFT teacher (sampled with `seed`, each at most
    `max_new_tokens`), scored; the preference pairs (`d.prefer`); the SFT teacher's eval."""
    k, prompts = d.samples_per_prompt, [fmt.prompt(r) for r in rows]
    rm, rm_tok, weights = _reward_model_on_device(rm_uri, options)
    sft, tokenizer = lm.load(start, "teacher-sft model", options)
    sft = sft.to(device())
    repeated = [p for p in prompts for _ in range(k)]
    samples = lm.generate(sft, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    rewards = combined(reward_scores(rm, rm_tok, repeated, samples), rm.dimensions, weights).tolist()
    chosen_rejected = []
    for i, (p, row) in enumerate(zip(prompts, rows, strict=True)):
        these, scored = samples[i * k : (i + 1) * k], rewards[i * k : (i + 1) * k]
        if d.prefer == "label":
            gold = fmt.response(row["reasoning"], row["label"])
            pair = pairs.choose_by_label(these, scored, row["label"], gold, labels)
        else:
            pair = pairs.choose_pair(these, scored, d.margin)
        if pair:
            chosen_rejected.append({"prompt": p, "chosen": pair[0], "rejected": pair[1]})
    return {"pairs": chosen_rejected, "before": judge(rm, rm_tok, weights, sft, tokenizer, ev, labels, max_new_tokens)}


def _finish_dpo(
    cfg: TrainConfig,
    checkpoint: Any,
    out_uri: str,
    options: Any,
    rm_uri: str,
    ev: list[dict[str, Any]],
    labels: list[str],
    fit_pairs: list[dict[str, str]],
    max_new_tokens: int,
) -> dict[str, Any]:
    """The DPO teacher's held-out eval, the share of (at most FIT_PAIRS of) its preference pairs it now prefers as
    they say (`pairs_fitted`), and the saved model."""
    rm, rm_tok, weights = _reward_model_on_device(rm_uri, options)
    model, tokenizer = trained_model(cfg, checkpoint, options)
    reference, _ = lm.load(cfg.start, "teacher-sft model", options)
    fitted = preference_accuracy(model, reference.to(device()).eval(), tokenizer, fit_pairs, cfg.max_length)
    return {
        "after": judge(rm, rm_tok, weights, model, tokenizer, ev, labels, max_new_tokens),
        "pairs_fitted": fitted,
        "model": lm.save(model, tokenizer, Storage(out_uri, options)),
    }


def check_preference_pairs(found: int, d: DpoSpec, prompts: int) -> None:
    """ValueError naming the field to change when DPO's sampling made no preference pair."""
    if found:
        return
    k = d.samples_per_prompt
    if d.prefer == "label":
        raise ValueError(
            f"spec.teacher.dpo.prefer: label, but every one of the {k} samples of each of the {prompts} prompts "
            "gave the prompt's label: nothing to prefer; raise samplesPerPrompt or prompts"
        )
    raise ValueError(
        f"spec.teacher.dpo.margin: no prompt's {k} samples differ by >= {d.margin} in reward; "
        "lower the margin or raise samplesPerPrompt"
    )


def run_dpo(ctx: StageContext) -> dict[str, Any]:
    labels, t = ctx.spec.labels, ctx.spec.teacher
    d, res, options = t.dpo, t.resources, ctx.storage.options
    dims = dimensions_of(ctx.spec.teacher.reward_model.dimensions)
    rm_uri = _model_uri(ctx, "reward-model")
    trained_on = Storage(rm_uri, options).read_json("reward.json")["dimensions"]
    if trained_on != dims:
        raise ValueError(
            f"spec.teacher.rewardModel.dimensions: {dims} but the reward model was trained on {trained_on}"
        )
    start = _model_uri(ctx, "teacher-sft")
    rows, ev = preference_split(sft_rows(ctx, labels), t.preference_holdout)[1], eval_rows(ctx)
    if d.prompts and d.prompts < len(rows):
        rows = random.Random(ctx.spec.teacher.seed).sample(rows, d.prompts)
    k = d.samples_per_prompt
    prompts = [fmt.prompt(r) for r in rows]
    sampled = on_worker(res, _sample_dpo, start, rm_uri, options, rows, d, ev, labels, t.seed, t.max_new_tokens)
    check_preference_pairs(len(sampled["pairs"]), d, len(rows))
    write_rows(ctx.out, "examples/part-00000", sampled["pairs"], "jsonl")
    truth = pairs.preference_truth(
        sampled["pairs"], {p: r["label"] for p, r in zip(prompts, rows, strict=True)}, labels
    )
    ctx.log(
        f"{len(sampled['pairs'])} preference pairs from {len(rows)} prompts x {k} samples; chosen gives the true "
        f"label in {truth['chosen_right']:.0%}, rejected in {truth['rejected_right']:.0%}"
    )
    cfg = _train_config(ctx, "dpo", start, ctx.out.uri("examples"), d, beta=d.beta, nll_weight=d.nll_weight)
    checkpoint, metrics = run(ctx, cfg, res, "dpo")
    fit_pairs = sampled["pairs"][:FIT_PAIRS]
    done = on_worker(
        res,
        _finish_dpo,
        cfg,
        checkpoint,
        ctx.out.uri("model"),
        options,
        rm_uri,
        ev,
        labels,
        fit_pairs,
        t.max_new_tokens,
    )
    before, after = sampled["before"], done["after"]
    ctx.log(
        f"held-out mean reward {before['mean_reward']:.3f} -> {after['mean_reward']:.3f}, label accuracy "
        f"{before['label_accuracy']:.1%} -> {after['label_accuracy']:.1%}; its preference pairs fitted "
        f"{done['pairs_fitted']:.0%}; model at {done['model']}"
    )
    return {
        "metrics": {
            **metrics,
            "preference_pairs": len(sampled["pairs"]),
            "preference_truth": truth,
            "pairs_fitted": done["pairs_fitted"],
            "before": before,
            "after": after,
        },
        "outputs": {"model": done["model"]},
    }
