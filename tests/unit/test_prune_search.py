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
def test_the_predictor_learns_a_known_landscape_and_reports_held_out_r2_and_tau(kind):
    rng = random.Random(1)
    archs = [ps.sample(SHAPE, 0.25, rng) for _ in range(80)]
    p = ps.fit_predictor(archs, [_truth(a) for a in archs], seed=0, kind=kind)
    d = p.diagnostics
    assert d["n_test"] == 20 and d["n_train"] == 60 and len(d["test_measured"]) == 20
    assert d["r2"] > 0.7 and d["kendall_tau"] > 0.6, d
    imp = np.array(d["feature_importances"])
    assert set(np.argsort(-imp)[:2]) == {0, 7}  # attn[0] and mlp[3]
    with pytest.raises(ValueError, match="at least 8 evaluated architectures, got 3"):
        ps.fit_predictor(archs[:3], [1.0, 2.0, 3.0], seed=0)


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
