"""The accuracy-predictor search of arXiv 2309.09507, as plain functions (the stage runs them on Ray Tune).

1. `sample`: random per-layer (attention, MLP) ratio vectors that remove `target` of the parameters
   (at least, and at most TOLERANCE more: every candidate fits the same parameter budget).
2. Each is pruned and evaluated for real (perplexity, label accuracy): the training set.
3. `fit_predictor`: a GBDT from the ratio vector to the metric; held-out R^2 and Kendall tau.
4. `narrow`: the predictor's most important features are confined to the range they take among
   the candidates it predicts best, shrinking the search space.
5. `propose`: many candidates from the narrowed space, scored by the predictor; the best `top_k`
   are evaluated for real.
`uniform` is the baseline the paper compares with: one ratio for every layer, same parameter count.
6. Recovery (`spec.pruning.recovery`): the searched and the uniform model, each tuned with LoRA on the SFT set
   for the same budget (Ray Train, checkpointed like the teacher stages), measured before and after on eval
   prompts the search never saw; the searched one merged is the stage's model.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kubedistill.core.progress import Target
from kubedistill.core.spec import PruningSpec
from kubedistill.core.stage import StageContext
from kubedistill.core.storage import StorageError
from kubedistill.ml.models import device, resolve
from kubedistill.ml.prune import Architecture, Shape

#: what a model that cannot be loaded is reported against
FIELD = "spec.pruning.model (the model to prune; default: the teacher-dpo stage's)"
MAX_RATIO = 0.9  # no layer loses more than this: a model with a gutted layer is not worth evaluating
TOLERANCE = 0.01  # how much more than the target an architecture may remove (never less)


def features(arch: Architecture) -> list[float]:
    """The predictor's input: attention ratios, then MLP ratios."""
    return [*arch.attn, *arch.mlp]


def _scaled(raw: np.ndarray, scale: float, layers: int) -> Architecture:
    r = np.clip(raw * scale, 0.0, MAX_RATIO)
    return Architecture(tuple(float(x) for x in r[:layers]), tuple(float(x) for x in r[layers:]))


def fit_to_target(shape: Shape, raw: np.ndarray, target: float) -> Architecture | None:
    """Scale a vector of relative ratios so the architecture removes at least `target` of the parameters,
    as little more as whole heads and channels allow (bisection); None if that is over TOLERANCE more."""
    lo, hi = 0.0, 1.0 / max(float(raw.max()), 1e-9)
    best = None
    for _ in range(40):
        mid = (lo + hi) / 2
        arch = _scaled(raw, mid, shape.layers)
        got = shape.removed_fraction(arch)
        if got < target:
            lo = mid
        else:
            hi = mid
            if best is None or got < shape.removed_fraction(best):
                best = arch
    if best is None or shape.removed_fraction(best) - target > TOLERANCE:
        return None
    return best


def sample(
    shape: Shape, target: float, rng: random.Random, bounds: list[tuple[float, float]] | None = None, tries: int = 50
) -> Architecture | None:
    """A random architecture at `target` whose features lie within `bounds` (when given)."""
    n = 2 * shape.layers
    for _ in range(tries):
        if bounds is None:
            raw = np.array([rng.random() for _ in range(n)])
        else:
            raw = np.array([rng.uniform(lo, hi) for lo, hi in bounds])
        arch = fit_to_target(shape, raw, target)
        if arch is not None and (bounds is None or _within(features(arch), bounds, slack=0.1)):
            return arch
    return None


def sample_many(
    shape: Shape,
    target: float,
    n: int,
    rng: random.Random,
    exclude: frozenset[Architecture] | set[Architecture] = frozenset(),
) -> list[Architecture]:
    """Up to `n` distinct random architectures at `target` (none of `exclude`), from at most 3n draws."""
    out: list[Architecture] = []
    seen = set(exclude)
    for _ in range(3 * n):
        a = sample(shape, target, rng)
        if a is not None and a not in seen:
            seen.add(a)
            out.append(a)
        if len(out) == n:
            break
    return out


def _within(x: list[float], bounds: list[tuple[float, float]], slack: float) -> bool:
    return all(lo - slack <= v <= hi + slack for v, (lo, hi) in zip(x, bounds, strict=True))


def uniform(shape: Shape, target: float) -> Architecture:
    """The baseline: the same attention ratio in every layer and the same MLP ratio in every layer,
    removing `target` of the parameters, the two ratios as close to each other as whole heads allow
    (a layer with 4 KV groups prunes attention in steps of 25%; the MLP's channels fill the rest)."""
    n = min(shape.kv_heads)
    best: Architecture | None = None
    for j in range(n):
        a = j / n
        lo, hi, found = 0.0, MAX_RATIO, None
        for _ in range(40):
            m = (lo + hi) / 2
            arch = Architecture.uniform(shape.layers, a, 0.0)
            arch = Architecture(arch.attn, (m,) * shape.layers)
            if shape.removed_fraction(arch) < target:
                lo = m
            else:
                hi, found = m, arch
        if found is None and shape.removed_fraction(Architecture((a,) * shape.layers, (0.0,) * shape.layers)) >= target:
            found = Architecture((a,) * shape.layers, (0.0,) * shape.layers)
        if found is None or shape.removed_fraction(found) - target > TOLERANCE:
            continue
        if best is None or abs(found.attn[0] - found.mlp[0]) < abs(best.attn[0] - best.mlp[0]):
            best = found
    if best is None:
        raise ValueError(
            f"spec.pruning.targetRatio: {target} cannot be reached uniformly within {TOLERANCE} "
            f"on this model (its layers hold {1 - shape.other_params / shape.params():.0%} of the "
            f"parameters; at most {MAX_RATIO:.0%} of each layer's MLP is removed)"
        )
    return best


@dataclass
class Predictor:
    model: Any  # a fitted scikit-learn regressor
    diagnostics: dict[str, Any]

    def predict(self, archs: list[Architecture]) -> np.ndarray:
        return self.model.predict(np.array([features(a) for a in archs]))


#: out-of-fold predictions a fit's R^2 and Kendall tau are reported on, at least (fewer: "not enough samples")
MIN_FIT_POINTS = 16
FOLDS = 4


def fit_predictor(archs: list[Architecture], y: list[float], seed: int, kind: str = "gbdt") -> Predictor:
    """GBDT on architecture -> metric, refit on all; its fit judged out of fold (`FOLDS`-fold cross-validation:
    every architecture predicted by a model that never saw it), R^2 and Kendall tau only with `MIN_FIT_POINTS`."""
    from scipy.stats import kendalltau
    from sklearn.metrics import r2_score

    if len(archs) < 8:
        raise ValueError(
            f"spec.pruning.sampledArchitectures: the predictor needs at least 8 evaluated "
            f"architectures, got {len(archs)}"
        )
    X, Y = np.array([features(a) for a in archs]), np.array(y, dtype=float)
    idx = np.random.default_rng(seed).permutation(len(archs))
    folds = np.array_split(idx, FOLDS)
    pred = np.empty(len(archs))
    for test in folds:
        train = np.setdiff1d(idx, test)
        pred[test] = _regressor(kind, seed).fit(X[train], Y[train]).predict(X[test])
    enough = len(archs) >= MIN_FIT_POINTS
    tau = kendalltau(pred, Y).statistic
    diagnostics = {
        "kind": kind,
        "n_train": len(archs) - max(len(f) for f in folds),
        "n_test": len(archs),
        "r2": round(float(r2_score(Y, pred)), 4) if enough else None,
        "kendall_tau": None if not enough or np.isnan(tau) else round(float(tau), 4),
        "fit": f"out of fold, {FOLDS} folds"
        if enough
        else f"not enough samples: {len(archs)} architectures, a fit needs {MIN_FIT_POINTS} "
        "(spec.pruning.sampledArchitectures)",
        "test_measured": [round(float(v), 4) for v in Y],
        "test_predicted": [round(float(v), 4) for v in pred],
    }
    model = _regressor(kind, seed).fit(X, Y)
    diagnostics["feature_importances"] = [round(float(v), 4) for v in model.feature_importances_]
    return Predictor(model, diagnostics)


def _regressor(kind: str, seed: int) -> Any:
    if kind == "lightgbm":
        import lightgbm

        return lightgbm.LGBMRegressor(
            n_estimators=200, learning_rate=0.05, min_child_samples=3, random_state=seed, verbose=-1
        )
    from sklearn.ensemble import GradientBoostingRegressor

    return GradientBoostingRegressor(
        n_estimators=200, learning_rate=0.05, max_depth=3, subsample=0.8, random_state=seed
    )


def narrow(
    shape: Shape,
    predictor: Predictor,
    target: float,
    rng: random.Random,
    candidates: int = 2000,
    important: int | None = None,
    best_fraction: float = 0.1,
) -> list[tuple[float, float]]:
    """Bounds per feature: the `important` most important features (by the GBDT's importances; half
    of them by default) are confined to the range they take in the best-predicted `best_fraction` of
    random candidates; the others keep [0, MAX_RATIO]."""
    pool = [a for a in (sample(shape, target, rng) for _ in range(candidates)) if a is not None]
    scores = predictor.predict(pool)
    best = [pool[i] for i in np.argsort(scores)[: max(2, int(len(pool) * best_fraction))]]
    imp = np.array(predictor.diagnostics["feature_importances"])
    k = important if important is not None else max(1, len(imp) // 2)
    bounds = [(0.0, MAX_RATIO)] * len(imp)
    for f in np.argsort(-imp)[:k]:
        vals = [features(a)[f] for a in best]
        bounds[f] = (min(vals), max(vals))
    return bounds


def propose(
    shape: Shape,
    predictor: Predictor,
    target: float,
    bounds: list[tuple[float, float]],
    n: int,
    top_k: int,
    rng: random.Random,
    exclude: frozenset[Architecture] | set[Architecture] = frozenset(),
) -> list[Architecture]:
    """The `top_k` architectures the predictor scores lowest among `n` sampled within `bounds`."""
    pool = list({a for a in (sample(shape, target, rng, bounds) for _ in range(n)) if a is not None} - set(exclude))
    if not pool:
        return []
    order = np.argsort(predictor.predict(pool))
    return [pool[i] for i in order[:top_k]]


# ---------------------------------------------------------------------------------------------
# Evaluating an architecture for real (inside a Ray Tune trial).


def arch_key(arch: Architecture) -> str:
    """A stable name for an architecture: its persisted result is `evals/<key>.json`."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([round(x, 6) for x in features(arch)]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EvalData:
    """What every trial measures on: held-out texts (perplexity) and labeled eval rows (label accuracy, of greedy
    answers of at most `gen_tokens`: the teacher's answer budget, `spec.teacher.maxNewTokens`)."""

    texts: list[str]
    rows: list[dict[str, Any]]
    labels: list[str]
    gen_tokens: int


def measure(model: Any, tokenizer: Any, data: EvalData) -> dict[str, float]:
    from kubedistill.stages.teacher import fmt, lm
    from kubedistill.stages.teacher.stages import perplexity, response_quality

    out: dict[str, float] = {"perplexity": round(perplexity(model, tokenizer, data.texts), 4)}
    if data.rows:
        t0 = time.perf_counter()
        generated = lm.generate(
            model,
            tokenizer,
            [fmt.prompt(r) for r in data.rows],
            max_new_tokens=data.gen_tokens,
            batch_size=64,
            with_token_counts=True,
        )
        seconds = time.perf_counter() - t0
        q = response_quality([text for text, _, _ in generated], data.rows, data.labels)
        out |= {
            "label_accuracy": round(q["label_accuracy"], 4),
            "parse_rate": round(q["parse_rate"], 4),
            # batched greedy generate (transformers), this worker's device: comparable between models measured alike
            "generated_tokens_per_s": round(sum(n for _, n, _ in generated) / max(seconds, 1e-9), 1),
        }
    return out


def evaluate(base: str, importance: Any, arch: Architecture, data: EvalData) -> dict[str, Any]:
    """Prune the base model by `arch` and measure it: the real evaluation the predictor learns from."""
    from kubedistill.ml import prune
    from kubedistill.stages.teacher import lm

    model, tokenizer = lm.load(base, "spec.pruning (base model)")
    model.to(device())
    prune.prune(model, arch, importance)
    return {
        "arch": {"attn": list(arch.attn), "mlp": list(arch.mlp)},
        "params": prune.param_count(model),
        **measure(model, tokenizer, data),
    }


# ---------------------------------------------------------------------------------------------
# The stage: Ray Tune trials, predictor, search, outputs.


def _trial(
    config: dict[str, Any],
    archs: dict[str, list[list[float]]],
    base: str,
    data: EvalData,
    out_uri: str,
    s3: dict[str, Any],
) -> None:
    """One Ray Tune trial: evaluate one architecture, persist its result (a retried job skips it)."""
    from ray import tune

    from kubedistill.core.storage import S3Options, Storage

    key = config["key"]
    out = Storage(out_uri, S3Options.from_env(s3.get("endpoint"), s3.get("region")))
    importance = _importance(out)
    attn, mlp = archs[key]
    path = resolve(base, FIELD, out.options)
    result = evaluate(path, importance, Architecture(tuple(attn), tuple(mlp)), data)
    out.write_json(f"evals/{key}.json", result)
    tune.report({k: v for k, v in result.items() if isinstance(v, (int, float))})


def run_trials(
    ctx: StageContext, archs: list[Architecture], base: str, data: EvalData, counter: dict[str, int]
) -> dict[str, dict[str, Any]]:
    """Evaluate every architecture without a persisted result as a Ray Tune trial; all results by key."""
    from ray import tune

    out = ctx.out
    todo = {arch_key(a): [list(a.attn), list(a.mlp)] for a in archs if not out.exists(f"evals/{arch_key(a)}.json")}
    counter["evaluated_this_run"] = counter.get("evaluated_this_run", 0) + len(todo)
    if todo:
        r = ctx.spec.teacher.resources
        o = ctx.storage.options
        trainable = tune.with_resources(
            tune.with_parameters(
                _trial,
                archs=todo,
                base=base,
                data=data,
                out_uri=out.uri(),
                s3={"endpoint": o.endpoint, "region": o.region},
            ),
            {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker},
        )
        # progress: the architectures whose result a trial has written (Tune pickles its callbacks: this counts
        # the results in storage from a thread of the driver instead)
        progress = Target.of(ctx.storage, ctx.name).start(len(todo), "architectures", label="search")
        searched = threading.Event()

        def count() -> None:
            while not searched.wait(5.0):
                if (n := _evaluated(out, todo)) is not None:
                    progress.update(n)

        threading.Thread(target=count, name="prune-search-progress", daemon=True).start()
        tuner = tune.Tuner(
            trainable,
            param_space={"key": tune.grid_search(sorted(todo))},
            # a trial reuses a finished one's actor: no process start and torch import per architecture
            tune_config=tune.TuneConfig(max_concurrent_trials=r.workers, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"trials-{ctx.config_hash}",
                storage_path=out.path("tune"),
                storage_filesystem=out.fs,
                verbose=0,
            ),
        )
        try:
            grid = tuner.fit()
        finally:
            searched.set()
            if (n := _evaluated(out, todo)) is not None:
                progress.update(n)
            progress.close()
        if grid.errors:
            raise RuntimeError(
                f"prune-search: {len(grid.errors)} of {len(todo)} trial(s) failed; first: {grid.errors[0]}"
            )
    return {arch_key(a): out.read_json(f"evals/{arch_key(a)}.json") for a in archs}


def _evaluated(out: Any, todo: dict[str, Any]) -> int | None:
    """How many of `todo`'s architectures have their result in storage (None when storage cannot say now)."""
    try:
        return sum(1 for f in out.list("evals") if f.rsplit("/", 1)[-1].removesuffix(".json") in todo)
    except (OSError, StorageError):
        return None


#: where `_prepare` saves the Taylor importance for the trials (safetensors: tensors only, never code)
IMPORTANCE_FILE = "importance.safetensors"


def _importance(out: Any) -> Any:
    """The Taylor importance `_prepare` saved for the trials."""
    from kubedistill.ml.prune import Importance

    return Importance.from_bytes(out.read_bytes(IMPORTANCE_FILE))


def _on_worker_setup(base: str, out_uri: str, s3: dict[str, Any]) -> tuple[Any, Any, Any]:
    """In a trial or worker task: the stage's storage and the base model (its tokenizer too), loaded there."""
    from kubedistill.core.storage import S3Options, Storage
    from kubedistill.stages.teacher import lm

    out = Storage(out_uri, S3Options.from_env(s3.get("endpoint"), s3.get("region")))
    model, tok = lm.load(resolve(base, FIELD, out.options), FIELD)
    return out, model, tok


def _prepare(
    base: str, calib: list[str], data: EvalData, held: EvalData, out_uri: str, s3: dict[str, Any]
) -> dict[str, Any]:
    """On a worker: the base model's shape, its Taylor importance (saved for the trials), its own metrics on the
    search's eval data and on the held-out prompts."""

    from kubedistill.ml import prune
    from kubedistill.stages.teacher.train import encode

    out, model, tok = _on_worker_setup(base, out_uri, s3)
    model.to(device())
    shape = prune.shape_of(model)
    batches = [
        {k: v.to(model.device) for k, v in encode(tok, [""] * len(calib[i : i + 8]), calib[i : i + 8], 256).items()}
        for i in range(0, len(calib), 8)
    ]
    out.write_bytes(IMPORTANCE_FILE, prune.taylor_importance(model, batches).to_bytes())
    return {
        "shape": shape,
        "base": {"params": prune.param_count(model), **measure(model, tok, data)},
        "held_out": measure(model, tok, held),
    }


def save_pruned(model: Any, tokenizer: Any, out: Any) -> str:
    """`prune.save` into storage (local or S3) under `out`; its URI."""
    import tempfile
    from pathlib import Path

    from kubedistill.ml import prune

    with tempfile.TemporaryDirectory() as d:
        prune.save(model, tokenizer, d)
        for f in sorted(Path(d).iterdir()):
            out.write_bytes(f.name, f.read_bytes())
    return out.uri()


def _finish(
    base: str, archs: dict[str, Architecture], where: dict[str, str], held: EvalData, out_uri: str, s3: dict[str, Any]
) -> dict[str, Any]:
    """On a worker: prune the base by each named architecture, measure it on the held-out prompts and save it
    under `where[name]` (when named there); {name: {"held_out", ["uri"]}}."""
    from kubedistill.ml import prune
    from kubedistill.stages.teacher import lm

    out, model, tok = _on_worker_setup(base, out_uri, s3)
    importance, path = _importance(out), resolve(base, FIELD, out.options)  # the local copy, fetched once
    done: dict[str, Any] = {}
    for i, (name, arch) in enumerate(archs.items()):
        if i:  # pruning works in place: each architecture starts from the base again
            model, tok = lm.load(path, FIELD)
        prune.prune(model, arch, importance)
        done[name] = {"held_out": measure(model.to(device()), tok, held)}
        if name in where:
            done[name]["uri"] = save_pruned(model.cpu(), tok, out.child(where[name]))
    return done


# ---------------------------------------------------------------------------------------------
# Recovery: LoRA on the SFT set, through the teacher stages' Ray Train loop.

#: every projection of every layer gets an adapter (LLM-Pruner's recovery; PEFT knows no defaults for a pruned Llama)
RECOVERY_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def recovery_config(ctx: StageContext, start: str, examples: str) -> Any:
    """The Ray Train config of one recovery: LoRA over `start` (a pruned model's URI) for the spec's budget."""
    from kubedistill.core.spec import LoraSpec, TrainSpec
    from kubedistill.core.storage import S3Options
    from kubedistill.stages.teacher.train import TrainConfig

    r, t, o = ctx.spec.pruning.recovery, ctx.spec.teacher, ctx.storage.options
    return TrainConfig(
        task="lm",
        start=start,
        examples_uri=examples,
        train=TrainSpec(epochs=1, max_steps=r.steps, batch_size=r.batch_size, learning_rate=r.learning_rate),
        lora=LoraSpec(r=r.rank, alpha=r.alpha, dropout=0.0),
        lora_targets=RECOVERY_TARGETS,
        # LoRA holds the frozen pruned weights once per worker, smaller than the teacher they came from: data parallel
        # unless the teacher's resources ask for sharding
        strategy="fsdp" if t.resources.strategy == "fsdp" else "ddp",
        max_length=t.max_length,
        gradient_checkpointing=t.gradient_checkpointing,
        precision=t.resources.precision,
        seed=ctx.spec.pruning.seed,
        s3=S3Options(endpoint=o.endpoint, region=o.region),
    )


def _recovered(
    cfg: Any, checkpoint: Any, evals: dict[str, EvalData], save_uri: str | None, options: Any
) -> dict[str, Any]:
    """On a worker: the pruned model with the recovery's LoRA merged, measured on each of `evals` (name -> data);
    saved (`prune.save`, the standard loader reads it) under `save_uri` when given."""
    from kubedistill.core.storage import Storage
    from kubedistill.stages.teacher.stages import trained_model

    model, tok = trained_model(cfg, checkpoint, options)
    out: dict[str, Any] = {name: measure(model, tok, data) for name, data in evals.items()}
    if save_uri:
        out["uri"] = save_pruned(model.cpu(), tok, Storage(save_uri, options))
    return out


@dataclass
class Recovered:
    """One recovered model: its training's config and last checkpoint, metrics, and measurements."""

    cfg: Any
    checkpoint: Any
    train: dict[str, Any]
    measured: dict[str, Any]  # "held_out", "search": `measure` on each


def recover(ctx: StageContext, pruned: dict[str, str], held: EvalData, search: EvalData) -> dict[str, Recovered]:
    """Tune each pruned model (name -> URI) with the same LoRA budget and measure it merged, on the held-out data
    and on the search's (what a choice among candidates is made on). A retried job resumes each tuning from its
    last checkpoint."""
    from kubedistill.stages.data import write_rows
    from kubedistill.stages.teacher import fmt
    from kubedistill.stages.teacher.stages import on_worker, sft_rows
    from kubedistill.stages.teacher.train import run

    rows = sft_rows(ctx, ctx.spec.labels)
    examples = [{"prompt": fmt.prompt(r), "response": fmt.response(r["reasoning"], r["label"])} for r in rows]
    write_rows(ctx.out, "recovery/examples/part-00000", examples, "jsonl")
    res, r = ctx.spec.teacher.resources, ctx.spec.pruning.recovery
    done: dict[str, Recovered] = {}
    for name, start in pruned.items():
        cfg = recovery_config(ctx, start, ctx.out.uri("recovery/examples"))
        ctx.log(
            f"recovery of the {name} model: LoRA r={r.rank} on every projection, {r.steps} steps, {len(rows)} SFT pairs"
        )
        checkpoint, metrics = run(ctx, cfg, res, f"recovery-{name}")
        evals = {"held_out": held, "search": search}
        measured = on_worker(res, _recovered, cfg, checkpoint, evals, None, ctx.storage.options)
        done[name] = Recovered(cfg, checkpoint, metrics, measured)
    return done


def _eval_data(ctx: StageContext, p: PruningSpec) -> tuple[EvalData, EvalData, list[str]]:
    """(the search's eval data, the held-out data of the final comparison, calibration texts). The comparison's
    texts and prompts are the eval rows after every row the search measured on (the search's own when the eval
    set has no more), as many as it had."""
    from kubedistill.stages.data import read_dataset
    from kubedistill.stages.teacher import fmt

    labels = ctx.spec.labels
    rows = read_dataset(ctx.input("data").child("eval"))
    if not rows:
        raise ValueError("prune-search: the data stage's eval set is empty")

    def text(r: dict[str, Any]) -> str:
        return fmt.prompt(r) + (
            fmt.response(r["reasoning"], r["label"]) if r.get("reasoning") else f"Label: {r['label']}"
        )

    sft = read_dataset(ctx.input("data").child("sft"))
    calib = [text(r) for r in (sft or rows)[: p.calibration_samples]]
    budget = ctx.spec.teacher.max_new_tokens
    search = EvalData([text(r) for r in rows[: p.eval_texts]], rows[: p.eval_prompts], labels, budget)
    rest = rows[max(p.eval_texts, p.eval_prompts) :]
    held = EvalData([text(r) for r in rest[: p.eval_texts]], rest[: p.eval_prompts], labels, budget) if rest else search
    return search, held, calib


def plot(diag: dict[str, Any], proposed: list[tuple[float, float]], objective: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(diag["test_measured"], diag["test_predicted"], label="sampled architectures (out of fold)")
    if proposed:
        ax.scatter(
            [m for _, m in proposed],
            [p for p, _ in proposed],
            marker="x",
            s=60,
            label="predictor's picks, then measured",
        )
    vals = diag["test_measured"] + diag["test_predicted"] + [v for pair in proposed for v in pair]
    lo, hi = min(vals), max(vals)
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8)
    ax.set_xlabel(f"measured {OBJECTIVE_AXIS[objective]}")
    ax.set_ylabel("predicted")
    fit = f"R^2 {diag['r2']}, Kendall tau {diag['kendall_tau']}" if diag["r2"] is not None else diag["fit"]
    ax.set_title(f"predictor: {fit}", fontsize=9)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


OBJECTIVE_AXIS = {
    "perplexity": "log perplexity",
    "labelAccuracy": "label error (1 - accuracy)",
    "both": "standardised log perplexity + label error",
}


def objective_values(
    results: list[dict[str, Any]], objective: str, reference: list[dict[str, Any]] | None = None
) -> list[float]:
    """Lower is better, one per result: log perplexity, label error (1 - accuracy), or for `both` the sum of the
    two, each standardised by its mean and spread over `reference` (the sampled architectures: one scale for the
    whole search)."""
    log_ppl = np.log([r["perplexity"] for r in results])
    error = 1.0 - np.array([r["label_accuracy"] for r in results], dtype=float)
    if objective == "perplexity":
        return log_ppl.tolist()
    if objective == "labelAccuracy":
        return error.tolist()
    ref = reference if reference is not None else results
    ref_ppl, ref_err = np.log([r["perplexity"] for r in ref]), 1.0 - np.array([r["label_accuracy"] for r in ref])

    def z(x: np.ndarray, of: np.ndarray) -> np.ndarray:
        return (x - of.mean()) / (of.std() or 1.0)

    return (z(log_ppl, ref_ppl) + z(error, ref_err)).tolist()


def run_stage(ctx: StageContext) -> dict[str, Any]:
    import json

    from kubedistill.stages.teacher.stages import on_worker

    p, res = ctx.spec.pruning, ctx.spec.teacher.resources
    target, objective, seed = p.target_ratio, p.objective, p.seed
    base = p.model or ctx.input("teacher-dpo").uri("model")
    o = ctx.storage.options
    s3 = {"endpoint": o.endpoint, "region": o.region}
    data, held, calib = _eval_data(ctx, p)
    prep = on_worker(res, _prepare, base, calib, data, held, ctx.out.uri(), s3)
    shape, base_metrics = prep["shape"], prep["base"]
    ctx.log(
        f"base: {base_metrics}; {shape.layers} layers; target: remove {target:.0%} of {shape.params():,} parameters"
    )

    rng = random.Random(seed)
    uni = uniform(shape, target)
    sampled = sample_many(shape, target, p.sampled_architectures, rng, exclude={uni})
    ctx.log(f"phase 1: {len(sampled)} sampled architectures + the uniform baseline, evaluated as Ray Tune trials")
    counter: dict[str, int] = {}
    results = run_trials(ctx, [uni, *sampled], base, data, counter)
    reference = [results[arch_key(a)] for a in sampled]

    def scores(archs: list[Architecture]) -> list[float]:
        return objective_values([results[arch_key(a)] for a in archs], objective, reference)

    predictor = fit_predictor(sampled, scores(sampled), seed, p.predictor)
    d = predictor.diagnostics
    fit = f"R^2 {d['r2']}, Kendall tau {d['kendall_tau']} ({d['fit']})" if d["r2"] is not None else d["fit"]
    ctx.log(f"predictor ({p.predictor}, {objective}): {fit}")
    acc_diag = None
    if objective == "perplexity" and len({r["label_accuracy"] for r in reference}) > 1:
        acc_diag = fit_predictor(sampled, [r["label_accuracy"] for r in reference], seed, p.predictor).diagnostics
    bounds = narrow(shape, predictor, target, rng, candidates=max(200, p.candidates // 4))
    top = propose(shape, predictor, target, bounds, n=p.candidates, top_k=p.top_k, rng=rng, exclude={uni, *sampled})
    ctx.log(
        f"phase 2: the predictor's best {len(top)} of {p.candidates} candidates in the narrowed space, "
        f"evaluated for real"
    )
    results |= run_trials(ctx, top, base, data, counter)

    predicted_top: list[float] = predictor.predict(top).tolist() if top else []
    proposed = [(float(pr), m) for pr, m in zip(predicted_top, scores(top), strict=True)]
    searched = [*sampled, *top]
    order = np.argsort(scores(searched), kind="stable")
    best = searched[int(order[0])]

    r = p.recovery
    if r.enabled:
        # the paper's order: the search's best `candidates`, each recovered, judged after recovery on the search's
        # prompts; the uniform baseline gets the same budget
        cands = {f"candidate-{i}": searched[int(k)] for i, k in enumerate(order[: r.candidates])}
        to_prune = {**cands, "uniform": uni}
        where = {name: f"pruned/{name}" for name in to_prune}
    else:  # the searched model saved as it is, the uniform one only measured
        cands = {"candidate-0": best}
        to_prune, where = {"candidate-0": best, "uniform": uni}, {"candidate-0": "model"}
    pruned = on_worker(res, _finish, base, to_prune, where, held, ctx.out.uri(), s3)
    recovered = recover(ctx, {k: v["uri"] for k, v in pruned.items() if "uri" in v}, held, data) if r.enabled else {}
    chosen = "candidate-0"
    if recovered:
        after = [recovered[name].measured["search"] for name in cands]
        chosen = list(cands)[int(np.argmin(objective_values(after, objective, reference)))]
        best = cands[chosen]
        rc = recovered[chosen]
        model_uri = on_worker(res, _recovered, rc.cfg, rc.checkpoint, {}, ctx.out.uri("model"), o)["uri"]
    else:
        model_uri = pruned[chosen]["uri"]
    ctx.log(f"chosen: {chosen} of {len(cands)} candidate(s)" + (" (judged after recovery)" if recovered else ""))

    rows = []
    for phase, archs in (("uniform", [uni]), ("sampled", sampled), ("proposed", top)):
        for a in archs:
            rows.append(
                {
                    "phase": phase,
                    "key": arch_key(a),
                    "removed_fraction": round(shape.removed_fraction(a), 4),
                    "predicted": None,
                    **results[arch_key(a)],
                }
            )
    for (pr, _), a in zip(proposed, top, strict=True):
        next(x for x in rows if x["key"] == arch_key(a))["predicted"] = round(pr, 4)
    ctx.out.write_text("architectures.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
    ctx.out.write_json(
        "predictor.json", {"objective": objective, **d, "bounds": bounds, "label_accuracy_predictor": acc_diag}
    )
    ctx.out.write_bytes("predicted_vs_measured.png", plot(d, proposed, objective))

    def summary(a: Architecture) -> dict[str, Any]:
        x = results[arch_key(a)]
        return {
            "perplexity": x["perplexity"],
            "label_accuracy": x.get("label_accuracy"),
            "params": x["params"],
            "removed_fraction": round(shape.removed_fraction(a), 4),
            "attn": list(a.attn),
            "mlp": list(a.mlp),
        }

    s, u = summary(best), summary(uni)
    change = round(100 * (s["perplexity"] - u["perplexity"]) / u["perplexity"], 2)
    held_out = comparison(
        prep["held_out"],
        {"searched": pruned[chosen], "uniform": pruned["uniform"]},
        {"searched": recovered[chosen].measured, "uniform": recovered["uniform"].measured} if recovered else {},
        held,
        data,
    )
    candidates = [
        {
            "name": name,
            "key": arch_key(a),
            "before_recovery": {k: v for k, v in results[arch_key(a)].items() if k != "arch"},
            "after_recovery": recovered[name].measured["search"] if recovered else None,
            "chosen": name == chosen,
        }
        for name, a in cands.items()
    ]
    ctx.log(
        f"searched: perplexity {s['perplexity']} vs uniform {u['perplexity']} ({change:+.2f}%); "
        f"label accuracy {s['label_accuracy']} vs {u['label_accuracy']} (the search's prompts)"
    )
    ctx.log(f"held-out prompts ({held_out['prompts']}): {held_out['summary']}; model at {model_uri}")
    metrics = {
        "target_ratio": target,
        "objective": objective,
        "base": base_metrics,
        "searched": s,
        "uniform": u,
        "perplexity_vs_uniform_pct": change,
        "predictor": {k: d[k] for k in ("kind", "r2", "kendall_tau", "n_train", "n_test", "fit")},
        "label_accuracy_predictor": None
        if acc_diag is None
        else {k: acc_diag[k] for k in ("r2", "kendall_tau", "fit")},
        "evaluated": len(results),
        "evaluated_this_run": counter["evaluated_this_run"],
        "sampled": len(sampled),
        "proposed": len(top),
        "held_out": held_out,
        "recovery": {
            "enabled": r.enabled,
            **({"steps": r.steps, "rank": r.rank, "learning_rate": r.learning_rate} if r.enabled else {}),
            "train": {k: v.train for k, v in recovered.items()},
            "candidates": candidates,
        },
    }
    outputs = {
        "model": model_uri,
        "architectures": ctx.out.uri("architectures.jsonl"),
        "predictor": ctx.out.uri("predictor.json"),
        "plot": ctx.out.uri("predicted_vs_measured.png"),
    }
    if r.enabled:
        outputs |= {f"pruned_{k}": v["uri"] for k, v in pruned.items()}
    return {"metrics": metrics, "outputs": outputs}


def comparison(
    base: dict[str, Any],
    pruned: dict[str, dict[str, Any]],
    recovered: dict[str, dict[str, Any]],
    held: EvalData,
    search: EvalData,
) -> dict[str, Any]:
    """Base, and each pruned model before and after recovery, on the held-out prompts: what the run report shows."""
    out: dict[str, Any] = {
        "prompts": len(held.rows),
        "disjoint_from_search": held is not search,
        "base": base,
    }
    for name in ("searched", "uniform"):
        if name in pruned:
            out[name] = {"pruned": pruned[name]["held_out"], "recovered": recovered.get(name, {}).get("held_out")}
    final = (out["searched"]["recovered"] or out["searched"]["pruned"]).get("label_accuracy")
    if final is not None and base.get("label_accuracy"):
        out["searched_keeps_of_base_accuracy"] = round(final / base["label_accuracy"], 4)
    parts = [f"base label accuracy {base.get('label_accuracy')}"]
    for name in ("searched", "uniform"):
        if name in out:
            before, after = out[name]["pruned"], out[name]["recovered"]
            parts.append(
                f"{name} {before.get('label_accuracy')}"
                + (f" -> {after.get('label_accuracy')} after recovery" if after else "")
            )
    out["summary"] = ", ".join(parts)
    return out
