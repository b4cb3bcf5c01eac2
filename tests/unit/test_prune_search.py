"""The predictor search's pieces without Ray: architectures at the target ratio, the uniform
baseline, the predictor's diagnostics, narrowing and proposing."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kubedistill.ml.prune import Architecture, Shape
from kubedistill.stages import prune_search as ps

# 4 layers: 4 KV groups of 1 query head x 32 dims, 256 MLP channels, 128 wide; 40,000 other parameters
SHAPE = Shape(hidden=128, head_dim=32, groups=1, kv_heads=(4,) * 4, intermediate=(256,) * 4, other_params=40_000)


def test_sampled_architectures_remove_the_target_fraction():
    rng = random.Random(0)
    archs = [ps.sample(SHAPE, 0.25, rng) for _ in range(30)]
    assert all(a is not None for a in archs)
    for a in archs:
        a.check(4)
        assert 0.25 <= SHAPE.removed_fraction(a) <= 0.25 + ps.TOLERANCE  # within the budget, never over it
        assert max(ps.features(a)) <= ps.MAX_RATIO
    assert len({a for a in archs}) == 30  # they differ


def test_uniform_is_one_ratio_everywhere_at_the_same_count():
    u = ps.uniform(SHAPE, 0.25)
    assert len(set(u.attn)) == 1 and len(set(u.mlp)) == 1
    # attention goes in steps of a quarter (4 KV groups): the nearest step, the MLP makes up the rest
    assert u.attn[0] in (0.0, 0.25, 0.5, 0.75) and abs(u.attn[0] - u.mlp[0]) <= 0.125 + 1e-9
    assert 0.25 <= SHAPE.removed_fraction(u) <= 0.25 + ps.TOLERANCE
    with pytest.raises(ValueError, match="spec.pruning.targetRatio: 0.95 cannot be reached"):
        ps.uniform(SHAPE, 0.95)


def _truth(a: Architecture) -> float:
    """A known landscape: attention of layer 0 and the MLP of layer 3 matter, the rest barely."""
    return 10 + 8 * a.attn[0] ** 2 + 6 * a.mlp[3] + 0.2 * sum(a.attn[1:]) + 0.1 * sum(a.mlp[:3])


@pytest.mark.parametrize("kind", ["gbdt", "lightgbm"])
def test_the_predictor_learns_a_known_landscape_and_reports_its_out_of_fold_fit(kind):
    rng = random.Random(1)
    archs = [ps.sample(SHAPE, 0.25, rng) for _ in range(80)]
    p = ps.fit_predictor(archs, [_truth(a) for a in archs], seed=0, kind=kind)
    d = p.diagnostics
    # 4 folds: each architecture predicted by a model trained on the other 60
    assert d["n_test"] == 80 and d["n_train"] == 60 and len(d["test_measured"]) == 80
    assert d["r2"] > 0.7 and d["kendall_tau"] > 0.6 and d["fit"] == "out of fold, 4 folds", d
    imp = np.array(d["feature_importances"])
    assert set(np.argsort(-imp)[:2]) == {0, 7}  # attn[0] and mlp[3]
    with pytest.raises(ValueError, match="at least 8 evaluated architectures, got 3"):
        ps.fit_predictor(archs[:3], [1.0, 2.0, 3.0], seed=0)


def test_a_fit_on_too_few_architectures_is_not_reported_as_one():
    rng = random.Random(3)
    archs = [ps.sample(SHAPE, 0.25, rng) for _ in range(ps.MIN_FIT_POINTS - 1)]
    d = ps.fit_predictor(archs, [_truth(a) for a in archs], seed=0).diagnostics
    assert d["r2"] is None and d["kendall_tau"] is None
    assert d["fit"] == "not enough samples: 15 architectures, a fit needs 16 (spec.pruning.sampledArchitectures)"
    assert len(d["test_predicted"]) == 15  # the out-of-fold points are still there to plot
    assert ps.plot(d, [], "perplexity")[:8] == b"\x89PNG\r\n\x1a\n"
    more = archs + [ps.sample(SHAPE, 0.25, rng)]
    assert ps.fit_predictor(more, [_truth(a) for a in more], seed=0).diagnostics["r2"] is not None


def test_objective_values_lower_is_better_and_both_weighs_the_two_on_one_scale():
    import math

    results = [{"perplexity": 10.0, "label_accuracy": 0.9}, {"perplexity": 20.0, "label_accuracy": 0.5},
               {"perplexity": 40.0, "label_accuracy": 0.7}]
    assert ps.objective_values(results, "perplexity") == pytest.approx([math.log(10), math.log(20), math.log(40)])
    assert ps.objective_values(results, "labelAccuracy") == pytest.approx([0.1, 0.5, 0.3])
    # log perplexity ln10 + (0, ln2, 2 ln2): z = (-1.2247, 0, 1.2247); error (0.1, 0.5, 0.3): z = (-1.2247, 1.2247, 0)
    z = math.sqrt(1.5)
    both = ps.objective_values(results, "both")
    assert both == pytest.approx([-2 * z, z, z])
    # scored on the reference's scale: a new architecture is judged against the sampled ones, not itself
    assert ps.objective_values(results[:1], "both", reference=results) == pytest.approx([-2 * z])
    # a metric that does not vary adds nothing (no division by zero)
    flat = [{"perplexity": 10.0, "label_accuracy": a} for a in (0.2, 0.4)]
    assert ps.objective_values(flat, "both") == pytest.approx([1.0, -1.0])


def test_narrowing_and_proposing_find_better_architectures_than_random():
    rng = random.Random(2)
    archs = [ps.sample(SHAPE, 0.25, rng) for _ in range(60)]
    p = ps.fit_predictor(archs, [_truth(a) for a in archs], seed=0)
    bounds = ps.narrow(SHAPE, p, 0.25, rng, candidates=400, important=2)
    assert bounds[0][1] < 0.5 and bounds[7][1] < 0.5  # the costly features are kept low
    assert all(b == (0.0, ps.MAX_RATIO) for i, b in enumerate(bounds) if i not in (0, 7))
    top = ps.propose(SHAPE, p, 0.25, bounds, n=400, top_k=4, rng=rng, exclude=set(archs))
    assert len(top) == 4 and not set(top) & set(archs)
    assert all(0.25 <= SHAPE.removed_fraction(a) <= 0.25 + ps.TOLERANCE for a in top)
    random_best = min(_truth(a) for a in [ps.sample(SHAPE, 0.25, rng) for _ in range(4)])
    assert min(_truth(a) for a in top) <= random_best
    assert min(_truth(a) for a in top) < np.median([_truth(a) for a in archs])


def test_search_progress_counts_the_architectures_whose_result_is_in_storage(tmp_path):
    from kubedistill.core.storage import Storage
    from kubedistill.stages.prune_search import _evaluated

    out = Storage(str(tmp_path / "v"))
    assert _evaluated(out, {"a1": [], "b2": []}) == 0
    out.write_json("evals/a1.json", {"perplexity": 9.0})
    out.write_json("evals/zz.json", {"perplexity": 9.0})  # an earlier attempt's, not searched now
    assert _evaluated(out, {"a1": [], "b2": []}) == 1


def test_label_accuracy_is_judged_on_answers_of_the_teachers_budget(teacher):
    """The search's label accuracy reads greedy answers of at most `spec.teacher.maxNewTokens` (EvalData.gen_tokens):
    a budget shorter than the teacher's chains cuts every answer before its label line (none parses), one that
    fits them parses them."""
    from kubedistill.stages import data
    from kubedistill.stages.teacher import fmt, lm
    from tests.teacher_model import LABELS

    rows = data.generate(LABELS, 120, 150, 4, 400, 50, 0).eval[:16]  # the teacher's own world, held-out pairs
    texts = [fmt.prompt(r) + fmt.response(r["reasoning"], r["label"]) for r in rows]
    model, tok = lm.load(teacher, "teacher")
    cut = ps.measure(model, tok, ps.EvalData(texts, rows, LABELS, gen_tokens=8))
    fits = ps.measure(model, tok, ps.EvalData(texts, rows, LABELS, gen_tokens=128))
    assert cut["parse_rate"] == 0.0 and cut["label_accuracy"] == 0.0
    assert fits["parse_rate"] >= 0.9 and fits["perplexity"] == cut["perplexity"], fits
