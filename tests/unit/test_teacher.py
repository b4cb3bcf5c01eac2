"""Teacher components without Ray: the response format, losses on hand-computed cases, preference
pairs, tokenisation, the reward combination, resume, and the stages' input checks."""

from __future__ import annotations

import copy
import hashlib
import math
import random

import pytest
import torch

from kubedistill.core.spec import LoraSpec, TrainSpec
from kubedistill.core.stage import StageContext
from kubedistill.core.storage import Storage
from kubedistill.ml import losses
from kubedistill.ml.models import ModelNotFound
from kubedistill.stages import data
from kubedistill.stages.teacher import fmt, lm, pairs, stages, train
from tests.conftest import minimal_doc

LABELS = ["irrelevant", "partial", "relevant"]
ROW = {"query": "sushi in harbor", "service_id": "s1", "service_title": "Golden Sushi", "service_category": "japanese restaurant",
       "service_district": "Harbor", "service_price_level": 2, "service_tags": ["sushi", "ramen"],
       "service_description": "Fresh fish.", "label": "relevant", "reasoning": "It offers sushi in Harbor."}


# -- format ---------------------------------------------------------------------------------

def test_prompt_and_response_round_trip():
    assert fmt.prompt(ROW) == ("Query: sushi in harbor\nService: Golden Sushi | japanese restaurant | Harbor | $$ | "
                               "offers sushi, ramen | Fresh fish.\nJudge relevance.\n")
    text = fmt.response("It offers\nsushi.", "relevant")
    assert text == "Reasoning: It offers sushi.\nLabel: relevant"
    assert fmt.parse_response(text + "\n\ntrailing", LABELS) == fmt.Parsed("It offers sushi.", "relevant")


@pytest.mark.parametrize("text, why", [
    ("Reasoning: fine", "no 'Label:' line"),
    ("Label: relevant\nReasoning: fine", "expected 'Reasoning: ...' then 'Label: ...'"),
    ("Reasoning: fine\nLabel: great", "label 'great' is not one of"),
    ("Reasoning: \nLabel: relevant", "empty reasoning"),
])
def test_parse_says_what_is_wrong(text, why):
    with pytest.raises(fmt.ParseError, match=why):
        fmt.parse_response(text, LABELS)
    assert fmt.try_parse(text, LABELS) is None


# -- losses ---------------------------------------------------------------------------------

def test_causal_lm_loss_shifts_and_ignores():
    # vocabulary 2; position 0 predicts token at 1 with p = 0.75, position 1 predicts an ignored label
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[losses.IGNORE, 1, losses.IGNORE]])
    assert losses.causal_lm_loss(logits, labels).item() == pytest.approx(-math.log(0.75))
    assert losses.sequence_logprob(logits, labels).item() == pytest.approx(math.log(0.75))


def test_pairwise_reward_loss():
    loss = losses.pairwise_reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    expected = (-math.log(1 / (1 + math.exp(-2))) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected)


def test_dpo_loss():
    # margin = (-1 - -2) - (-3 - -2) = 2; beta 0.5 -> -log sigmoid(1)
    loss = losses.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    same = losses.dpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), 0.1)
    assert same.item() == pytest.approx(math.log(2))  # policy == reference: no preference yet


# -- pairs ----------------------------------------------------------------------------------

def test_each_perturbation_breaks_its_dimension_only():
    rng = random.Random(0)
    flipped = fmt.parse_response(pairs.flip_label(ROW["reasoning"], "relevant", LABELS, rng), LABELS)
    assert flipped.label != "relevant" and flipped.reasoning == ROW["reasoning"]
    other = "It is a bar with no sushi."
    assert fmt.parse_response(pairs.contradict("relevant", other), LABELS) == fmt.Parsed(other, "relevant")
    invented = fmt.parse_response(pairs.invent_attribute(ROW, ROW["reasoning"], "relevant", rng), LABELS)
    claim = invented.reasoning.removeprefix(ROW["reasoning"])
    assert invented.label == "relevant" and "known for its" in claim and "sushi" not in claim and "ramen" not in claim
    for seed in range(6):
        assert fmt.try_parse(pairs.break_format(ROW["reasoning"], "relevant", LABELS, random.Random(seed)), LABELS) is None


def test_a_misread_service_keeps_its_description_and_takes_another_services_verdict_and_label():
    other = {**ROW, "service_title": "Ramen Ya", "service_district": "Old Town", "label": "partial",
             "reasoning": "Query asks for sushi in Harbor. Ramen Ya is a bar in Old Town. It is in Old Town, not Harbor. Ramen Ya is loud."}
    row = {**ROW, "reasoning": "Query asks for sushi in Harbor. Golden Sushi is a japanese restaurant in Harbor. It offers sushi."}
    got = fmt.parse_response(pairs.misread_service(row, other), LABELS)
    # this row's chain through its sentence naming its title, then the other's after its own, titles swapped
    assert got == fmt.Parsed("Query asks for sushi in Harbor. Golden Sushi is a japanese restaurant in Harbor. "
                             "It is in Old Town, not Harbor. Golden Sushi is loud.", "partial")
    # a chain that names no title: the other's whole chain, its title replaced
    untitled = fmt.parse_response(pairs.misread_service({**row, "reasoning": "It fits."}, other), LABELS)
    assert untitled.reasoning == other["reasoning"].replace("Ramen Ya", "Golden Sushi") and untitled.label == "partial"


def test_grounding_pairs_misjudge_the_service_their_chain_describes():
    # the classic world's chains can be checked against their pair's fields (synthetic.refuted): the rejected chain
    # of a grounding pair mostly says what the shown service refutes, the chosen one never
    from kubedistill.stages import synthetic

    g = synthetic.generate(LABELS, 60, 80, 6, 1200, 10, 0)
    by_prompt = {fmt.prompt(r): r for r in g.sft}
    ps = pairs.reward_pairs(g.sft, LABELS, ["grounding"], seed=0)
    assert len(ps) > 0.9 * len(g.sft)
    refuted = relabelled = 0
    for p in ps:
        row, chosen, rejected = by_prompt[p.prompt], fmt.parse_response(p.chosen, LABELS), fmt.parse_response(p.rejected, LABELS)
        assert p.dimension == "grounding" and chosen.label == row["label"] and not synthetic.refuted(chosen.reasoning, row)
        description = chosen.reasoning[: chosen.reasoning.index(row["service_title"])]
        assert rejected.reasoning.startswith(description) and rejected.reasoning != chosen.reasoning
        refuted += bool(synthetic.refuted(rejected.reasoning, row))
        relabelled += rejected.label != row["label"]
    assert refuted > 0.75 * len(ps) and relabelled > 0.9 * len(ps), (refuted, relabelled, len(ps))


def test_reward_pairs_cover_every_dimension_and_refuse_unknown_ones():
    g = data.generate(LABELS, 30, 20, 3, 30, 10, 0)
    every = ["label", "consistency", "faithfulness", "format", "grounding"]
    ps = pairs.reward_pairs(g.sft, LABELS, every, seed=0)
    assert {p.dimension for p in ps} == set(every)
    assert all(p.chosen != p.rejected and fmt.try_parse(p.chosen, LABELS) for p in ps)
    with pytest.raises(ValueError, match="spec.teacher.rewardModel.dimensions: unknown dimension 'tone'"):
        pairs.reward_pairs(g.sft, LABELS, ["tone"], seed=0)


def test_choose_pair_takes_best_and_worst_above_the_margin():
    assert pairs.choose_pair(["a", "b", "c"], [0.2, 0.9, -0.5], 0.5) == ("b", "c")
    assert pairs.choose_pair(["a", "b"], [0.2, 0.25], 0.1) is None
    assert pairs.choose_pair(["a", "a"], [0.0, 1.0], 0.1) is None  # identical texts teach nothing
    with pytest.raises(ValueError):
        pairs.choose_pair(["a"], [1.0], 0.0)


def test_choose_by_label_rejects_the_worst_wrong_sample_and_chooses_the_best_right_one():
    right_low, right_high = fmt.response("a", "relevant"), fmt.response("b", "relevant")
    wrong_low, wrong_high = fmt.response("c", "partial"), fmt.response("d", "irrelevant")
    gold = fmt.response("the SFT set's chain", "relevant")
    samples = [right_low, wrong_high, right_high, wrong_low]
    # rewards rank within each side only: the wrong sample with the highest reward is still not chosen
    got = pairs.choose_by_label(samples, [0.1, 5.0, 0.2, -1.0], "relevant", gold, LABELS)
    assert got == (right_high, wrong_low)
    # no right sample: the SFT set's own response is chosen; an unparsable sample counts as wrong
    assert pairs.choose_by_label([wrong_high, "Reasoning: x"], [0.0, 1.0], "relevant", gold, LABELS) == (gold, wrong_high)
    assert pairs.choose_by_label(["Reasoning: x"], [1.0], "relevant", gold, LABELS) == (gold, "Reasoning: x")
    assert pairs.choose_by_label([right_low, right_high], [0.0, 1.0], "relevant", gold, LABELS) is None  # all right
    with pytest.raises(ValueError):
        pairs.choose_by_label([right_low], [], "relevant", gold, LABELS)


def test_own_answer_pairs_put_a_right_sample_over_a_wrong_one_of_the_same_prompt():
    other = {**ROW, "query": "ramen in harbor", "label": "partial", "reasoning": "No ramen here."}
    right, wrong = fmt.response("It offers sushi.", "relevant"), fmt.response("It is elsewhere.", "partial")
    got = stages.own_answer_pairs(
        [ROW, other, {**ROW, "query": "sushi"}],
        [[wrong, right, wrong, "broken"], [wrong, wrong], [wrong, "Reasoning: x"]],
        LABELS,
    )
    gold = fmt.response(ROW["reasoning"], ROW["label"])
    assert got == [
        pairs.Pair(fmt.prompt(ROW), right, wrong, "label"),  # the first right sample over the first wrong one
        # every sample of the second row is right: no pair; none of the third's: the row's own response is chosen
        pairs.Pair(fmt.prompt({**ROW, "query": "sushi"}), gold, wrong, "label"),
    ]


def test_no_preference_pair_fails_naming_the_field_to_change():
    from kubedistill.core.spec import DpoSpec

    stages.check_preference_pairs(3, DpoSpec(prefer="label"), 10)  # pairs found: nothing to say
    with pytest.raises(ValueError, match="spec.teacher.dpo.prefer: label, but every one of the 4 samples of each of the 10 prompts"):
        stages.check_preference_pairs(0, DpoSpec(prefer="label"), 10)
    with pytest.raises(ValueError, match=r"spec.teacher.dpo.margin: no prompt's 4 samples differ by >= 0.5 in reward"):
        stages.check_preference_pairs(0, DpoSpec(margin=0.5), 10)


def test_preference_split_keeps_whole_queries_out_of_sft_the_same_ones_for_every_teacher_seed():
    rows = [{"query": f"q{i}", "pair": j} for i in range(50) for j in range(4)]
    assert stages.preference_split(rows, 0.0) == (rows, rows)  # off: SFT and DPO both see the whole set
    sft, held = stages.preference_split(rows, 0.2)
    assert len({r["query"] for r in held}) == 10 and len(sft) + len(held) == len(rows)
    assert not {r["query"] for r in sft} & {r["query"] for r in held}  # no pair of a held query trains SFT
    reordered = stages.preference_split(list(reversed(rows)), 0.2)[1]
    assert reordered != [] and {r["query"] for r in reordered} == {r["query"] for r in held}  # a fixed seed: the
    # same queries whatever the order or the teacher's seed
    # and not the reward model's held-out split (seed 0), so its own answers have prompts on both sides of it
    rm_held = {r["query"] for r in data.split_by_query(rows, 0.2, 0)[1]}
    assert {r["query"] for r in held} - rm_held and {r["query"] for r in held} & rm_held
    with pytest.raises(ValueError, match="spec.teacher.preferenceHoldout: 0.5 holds out every one"):
        stages.preference_split([{"query": "only", "pair": 0}], 0.5)


def test_ranking_auc_counts_right_over_wrong_pairs_ties_half():
    # right: 3.0 and 1.0; wrong: 2.0 and 1.0 -> pairs (3,2) win, (3,1) win, (1,2) lose, (1,1) tie -> 2.5 / 4
    assert pairs.ranking_auc([3.0, 2.0, 1.0, 1.0], [True, False, True, False]) == 0.625
    assert pairs.ranking_auc([1.0, 0.0], [True, False]) == 1.0 and pairs.ranking_auc([0.0, 1.0], [True, False]) == 0.0
    assert pairs.ranking_auc([1.0, 2.0], [True, True]) is None and pairs.ranking_auc([], []) is None


def test_preference_truth_checks_the_pairs_against_the_known_labels():
    truth = {"p1": "relevant", "p2": "irrelevant", "p3": "partial"}
    got = pairs.preference_truth(
        [
            # chosen right, rejected wrong: ordered
            {"prompt": "p1", "chosen": fmt.response("r", "relevant"), "rejected": fmt.response("r", "partial")},
            # chosen wrong, rejected right: misordered
            {"prompt": "p2", "chosen": fmt.response("r", "partial"), "rejected": fmt.response("r", "irrelevant")},
            # both wrong (the rejected one unparsable): no order to judge
            {"prompt": "p3", "chosen": fmt.response("r", "relevant"), "rejected": "Reasoning: r"},
            # chosen right, rejected wrong: ordered
            {"prompt": "p3", "chosen": fmt.response("r", "partial"), "rejected": fmt.response("r", "relevant")},
        ],
        truth,
        LABELS,
    )
    # chosen right in pairs 1 and 4 (2/4); rejected right in pair 2 (1/4); exactly one right in pairs 1, 2, 4,
    # chosen in 1 and 4 -> 2/3
    assert got == {"chosen_right": 0.5, "rejected_right": 0.25, "ordered": pytest.approx(2 / 3)}
    assert pairs.preference_truth([], truth, LABELS) == {"chosen_right": 0.0, "rejected_right": 0.0, "ordered": 0.0}


# -- models, tokenisation, training -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    g = data.generate(LABELS, 30, 20, 3, 30, 10, 0)
    texts = [r["text"] for r in g.corpus] + [fmt.prompt(r) + fmt.response(r["reasoning"], r["label"]) for r in g.sft]
    model, tok = lm.scratch("scratch:llama-tiny", texts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    yield model, tok, g
    # shared by the module's tests: one that trained it in place would change what the later ones see
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a test mutated the shared model"


def test_encode_trains_only_the_response_and_its_end(tiny):
    _, tok, _ = tiny
    b = train.encode(tok, ["Query: a\n", ""], ["Reasoning: b\nLabel: relevant", "x"], 64)
    p_len = len(tok("Query: a\n", add_special_tokens=False).input_ids)
    row = b["labels"][0]
    assert (row[:p_len] == losses.IGNORE).all() and (row[p_len:b["attention_mask"][0].sum()] != losses.IGNORE).all()
    assert b["input_ids"][0, b["attention_mask"][0].sum() - 1] == tok.eos_token_id
    assert (b["labels"][1][b["attention_mask"][1] == 0] == losses.IGNORE).all()  # padding is never trained
    assert b["labels"][1][0] != losses.IGNORE  # no prompt: every token trained (DAPT)


def test_combined_reward_weights_dimensions():
    scores = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    assert train.combined(scores, ["label", "format"], {"label": 1.0, "format": 0.5}).tolist() == [2.0, -0.5]


def test_fit_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_does(tiny, tmp_path):
    shared, tok, g = tiny
    model = copy.deepcopy(shared)  # trained in place below
    rows = [{"text": r["text"]} for r in g.corpus]
    cfg = train.TrainConfig(task="lm", start="", examples_uri="", train=TrainSpec(epochs=1, learning_rate=1e-3, batch_size=4, max_steps=6), checkpoint_every=3)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    train.fit(cfg, model, tok, None, rows)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(init)
    saved = []

    def keep(save, metrics):
        d = tmp_path / f"step-{metrics['step']}"
        d.mkdir()
        assert save(d)  # rank 0 of a ddp run writes the whole state
        saved.append(d)

    train.fit(cfg, model, tok, None, rows, on_checkpoint=keep)
    assert [d.name for d in saved] == ["step-3", "step-6"]
    model.load_state_dict(init)
    metrics = train.fit(cfg, model, tok, None, rows, resume=saved[0])["metrics"]
    assert metrics["resumed_at_step"] == 3
    for k in full:
        torch.testing.assert_close(model.state_dict()[k], full[k])


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_fit_trains_in_the_arithmetic_asked_and_says_so(tiny, requested):
    shared, tok, g = tiny
    model = copy.deepcopy(shared)
    rows = [{"text": r["text"]} for r in g.corpus]
    cfg = train.TrainConfig(task="lm", start="", examples_uri="", train=TrainSpec(epochs=1, learning_rate=1e-3, batch_size=4, max_steps=3), precision=requested)
    metrics = train.fit(cfg, model, tok, None, rows)["metrics"]
    assert metrics["precision"] == requested and math.isfinite(metrics["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights stay fp32


def test_the_teacher_seed_sets_a_scratch_models_weights_and_every_training_stages_seed(tmp_path):
    from kubedistill.core import pipeline, spec

    texts = [f"The Kiru Ritual is a house name for sauna {i}." for i in range(20)]
    w = {s: lm.scratch("scratch:llama-tiny", texts, seed=s)[0].state_dict() for s in (0, 1)}
    again = lm.scratch("scratch:llama-tiny", texts, seed=1)[0].state_dict()
    assert all(torch.equal(again[k], w[1][k]) for k in w[1])  # the same seed, the same weights
    assert not torch.equal(w[0]["model.embed_tokens.weight"], w[1]["model.embed_tokens.weight"])
    model, tok = lm.scratch("scratch:llama-tiny", texts)
    start = lm.save(model, tok, Storage(str(tmp_path / "start")))
    run = spec.parse_run(minimal_doc(storage={"uri": str(tmp_path)}, teacher={"seed": 7}))
    for stage in ("teacher-dapt", "teacher-sft", "reward-model", "teacher-dpo"):
        ctx = StageContext(next(s for s in pipeline.build(run) if s.name == stage).config, Storage(str(tmp_path)))
        assert stages._train_config(ctx, "lm", start, "x", TrainSpec()).seed == 7, stage


def test_unknown_scratch_preset_and_unloadable_model_name_the_field(tmp_path):
    with pytest.raises(ModelNotFound, match="spec.teacher.baseModel: unknown preset 'scratch:huge'"):
        lm.scratch("scratch:huge", ["x"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="spec.teacher.baseModel"):
        lm.load(str(tmp_path), "spec.teacher.baseModel")
    with pytest.raises(ModelNotFound, match="spec.teacher.baseModel"):
        lm.load(str(tmp_path / "missing"), "spec.teacher.baseModel")


def test_generate_returns_only_the_new_text(tiny):
    model, tok, g = tiny
    out = lm.generate(model, tok, [fmt.prompt(g.eval[0]), fmt.prompt(g.eval[1])], max_new_tokens=5)
    assert len(out) == 2 and all("Query:" not in o for o in out)


def test_a_sampled_answer_depends_on_its_prompts_seed_not_on_the_batch_it_was_in(tiny):
    """Each row's sample comes from its own seed: the same prompts and seeds give the same answers in one batch or
    many, alone or among others, in any order (what makes annotation's votes and retries the same whatever call
    sizes a replica measured); another seed gives other answers."""
    model, tok, g = tiny
    prompts = [fmt.prompt(r) for r in g.eval[:6]]
    seeds = [lm.row_seed(7, p) for p in prompts]
    kw = {"max_new_tokens": 12, "temperature": 1.0}
    together = lm.generate(model, tok, prompts, seeds=seeds, batch_size=6, **kw)
    assert lm.generate(model, tok, prompts, seeds=seeds, batch_size=2, **kw) == together
    assert lm.generate(model, tok, prompts[::-1], seeds=seeds[::-1], **kw) == together[::-1]
    assert lm.generate(model, tok, prompts[4:5], seeds=seeds[4:5], **kw) == together[4:5]
    other = lm.generate(model, tok, prompts, seeds=[lm.row_seed(8, p) for p in prompts], **kw)
    assert other != together
    # without seeds, a row's seed is its place in the call: a prompt repeated in one call is sampled afresh
    repeated = lm.generate(model, tok, [prompts[0]] * 4, seed=3, batch_size=3, **kw)
    assert repeated == lm.generate(model, tok, [prompts[0]] * 4, seed=3, batch_size=4, **kw)
    assert len(set(repeated)) > 1
    with pytest.raises(ValueError, match="seeds: 2 for 6 prompts"):
        lm.generate(model, tok, prompts, seeds=seeds[:2], **kw)


def test_row_seed_is_stable_across_processes():
    # blake2b of "<seed>\x1f<key>", not Python's per-process salted hash: fixed values
    assert lm.row_seed(0, "a") == lm.row_seed(0, "a") != lm.row_seed(1, "a") != lm.row_seed(0, "b")
    assert lm.row_seed(0, 0) == int.from_bytes(hashlib.blake2b(b"0\x1f0", digest_size=8).digest(), "big") >> 1
    assert 0 <= lm.row_seed(5, "x") < 2**63


def test_seeded_sampling_draws_from_the_softmax_at_its_temperature():
    """Gumbel-max: the argmax of logits / T plus each row's Gumbel noise is a draw from softmax(logits / T).
    20,000 rows of fixed seeds (deterministic, so the check cannot flake): each token's share within 0.01 of its
    probability, at T = 1 and T = 2; a row's noise is its generator's alone."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for t in (1.0, 2.0):
        proc = lm.SeededSampling(range(20_000), t)
        picks = proc(None, logits.repeat(20_000, 1)).argmax(-1)
        shares = torch.bincount(picks, minlength=4).float() / 20_000
        torch.testing.assert_close(shares, (logits / t).softmax(-1), atol=0.01, rtol=0)
    one = lm.SeededSampling([11], 1.0)(None, logits[None])
    torch.testing.assert_close(one, lm.SeededSampling([5, 11], 1.0)(None, logits.repeat(2, 1))[1:])


def test_preference_accuracy_counts_the_pairs_dpo_fitted(tiny):
    """pairs_fitted: the share of pairs whose implicit reward margin is positive. Before training (policy =
    reference) every margin is 0: none fitted. After a few DPO steps on two pairs both are; the same pairs with
    chosen and rejected swapped are then none."""
    model, tok, g = tiny
    rows = g.sft[:2]
    pairs_ = [{"prompt": fmt.prompt(r), "chosen": fmt.response(r["reasoning"], r["label"]),
               "rejected": fmt.response(r["reasoning"], next(x for x in LABELS if x != r["label"]))} for r in rows]
    assert train.preference_accuracy(model, model, tok, pairs_, 256) == 0.0
    policy = copy.deepcopy(model).train()
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    c = train.encode(tok, [p["prompt"] for p in pairs_], [p["chosen"] for p in pairs_], 256)
    r = train.encode(tok, [p["prompt"] for p in pairs_], [p["rejected"] for p in pairs_], 256)
    for _ in range(10):
        opt.zero_grad()
        train.dpo_step(policy, model, c, r, beta=0.1).backward()
        opt.step()
    policy.eval()
    assert train.preference_accuracy(policy, model, tok, pairs_, 256, batch_size=1) == 1.0
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs_]
    assert train.preference_accuracy(policy, model, tok, swapped, 256) == 0.0
    assert train.preference_accuracy(policy, model, tok, [], 256) == 0.0


def test_label_shares_count_the_answers_that_parse():
    answers = [fmt.response("a", "relevant"), fmt.response("b", "partial"), "Label: relevant", fmt.response("c", "relevant")]
    assert fmt.label_shares(answers, LABELS) == [0.0, 1 / 3, 2 / 3]  # the third has no reasoning: not counted
    assert fmt.label_shares(["no label here"], LABELS) is None


def test_label_probabilities_are_each_label_lines_likelihood_whatever_the_batch(tiny):
    model, tok, g = tiny
    rows = g.eval[:3]
    prompts, reasonings = [fmt.prompt(r) for r in rows], [r["reasoning"] for r in rows]
    assert len({len(tok(p + r).input_ids) for p, r in zip(prompts, reasonings, strict=True)}) > 1  # padded
    probs = train.label_probabilities(model, tok, prompts, reasonings, LABELS)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    alone = [train.label_probabilities(model, tok, [p], [r], LABELS) for p, r in zip(prompts, reasonings, strict=True)]
    torch.testing.assert_close(probs, torch.cat(alone))
    # the first row by hand: the log-likelihood of each whole response (and its end) after the prompt
    p_ids = tok(prompts[0], add_special_tokens=False).input_ids
    ll = []
    for label in LABELS:
        r_ids = [*tok(fmt.response(reasonings[0], label), add_special_tokens=False).input_ids, tok.eos_token_id]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([p_ids + r_ids])).logits.float().log_softmax(-1)[0]
        ll.append(sum(logp[len(p_ids) + j - 1, t] for j, t in enumerate(r_ids)))
    torch.testing.assert_close(probs[0], torch.stack(ll).softmax(-1))
    with pytest.raises(ValueError, match="row 1: the prompt and response exceed the model's 512 tokens"):
        train.label_probabilities(model, tok, prompts[:2], [reasonings[0], "word " * 600], LABELS)


# -- stage input checks ----------------------------------------------------------------------

def _ctx(tmp_path, sft_rows):
    root = Storage(str(tmp_path / "run"))
    if sft_rows is not None:
        data.write_rows(root.child("data"), "sft/part-00000", sft_rows, "jsonl")
    root.write_json("data/_SUCCESS.json", {"digest": "d", "artifact": root.uri("data")})
    return StageContext({"run": "r", "stage": "teacher-sft", "inputs": ["data"], "spec": {}}, root)


def test_an_empty_or_malformed_sft_set_fails_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="spec.data.sftSeed: the SFT set .* is empty"):
        stages.sft_rows(_ctx(tmp_path / "a", None), LABELS)
    bad = [dict(ROW), {**ROW, "label": "great"}]
    with pytest.raises(ValueError, match=r"spec.data.sftSeed: row 2: field 'label': expected one of"):
        stages.sft_rows(_ctx(tmp_path / "b", bad), LABELS)
    no_reasoning = [dict(ROW), {**ROW, "reasoning": ""}, {k: v for k, v in ROW.items() if k != "reasoning"}]
    with pytest.raises(ValueError, match=r"spec.data.sftSeed: 2 of 3 row\(s\) have no 'reasoning' \(first: row 2\)"
                                         r".*spec.teacher.enabled: false.*objective: ce"):
        stages.sft_rows(_ctx(tmp_path / "c", no_reasoning), LABELS)


def test_teacher_sft_takes_another_llms_reasoning_for_labels_without_their_own(tmp_path):
    """spec.annotation.mode: rationalize with spec.annotation.model: the SFT set's rows without reasoning take
    the rationalize stage's chain; a row the model did not explain (it disagreed) teaches no chain."""
    from kubedistill.core import pipeline, spec

    run = spec.parse_run(minimal_doc(storage={"uri": str(tmp_path)}, annotation={"mode": "rationalize",
                                                                                  "model": "s3://m/llm"}))
    sft = next(s for s in pipeline.build(run) if s.name == "teacher-sft")
    assert sft.config["inputs"][-1] == "rationalize"
    root = Storage(str(tmp_path / "test-run"))
    a, b, c = ({**ROW, "query": q, "reasoning": ""} for q in ("sushi a", "sushi b", "sushi c"))
    data.write_rows(root.child("data"), "sft/part-00000", [a, b, {**c, "reasoning": "A person's chain."}], "jsonl")
    root.write_json("data/_SUCCESS.json", {"digest": "d", "artifact": root.uri("data")})
    explained = {**data.validate_row(a, LABELS, False), "reasoning": "The model's chain."}
    data.write_rows(root.child("rationalize"), "labeled/part-00000", [explained], "jsonl")
    root.write_json("rationalize/_SUCCESS.json", {"digest": "r", "artifact": root.uri("rationalize")})
    rows = stages.sft_rows(StageContext(sft.config, root), LABELS)
    assert [(r["query"], r["reasoning"]) for r in rows] == [("sushi a", "The model's chain."),
                                                            ("sushi c", "A person's chain.")]
    # nothing explained and no chain of its own: the stage says so, naming the field
    data.write_rows(root.child("rationalize"), "labeled/part-00000", [], "jsonl")
    data.write_rows(root.child("data"), "sft/part-00000", [a, b], "jsonl")
    with pytest.raises(ValueError, match=r"spec.data.sftSeed: none of its 2 row\(s\) has reasoning, its own or from "
                                         r"spec.annotation.model"):
        stages.sft_rows(StageContext(sft.config, root), LABELS)


def test_replay_draws_seeded_passes_over_the_domain_texts():
    texts = ["a", "b", "c"]
    assert stages.replay_texts(texts, 0) == []
    two = stages.replay_texts(texts, 2)
    assert len(set(two)) == 2 and set(two) <= set(texts)
    seven = stages.replay_texts(texts, 7)
    # each pass holds every text once: a corpus smaller than asked for is replayed whole, then again
    assert sorted(seven[:3]) == sorted(seven[3:6]) == texts and seven[6] in texts
    assert seven == stages.replay_texts(texts, 7) and stages.replay_texts(texts, 7, seed=1) != seven
    with pytest.raises(ValueError, match="no domain texts"):
        stages.replay_texts([], 1)


def test_sft_examples_train_the_pairs_responses_and_every_token_of_a_replayed_text(tiny):
    _, tok, _ = tiny
    ex = stages.sft_examples([ROW], ["Basalt stone therapy is a hot-stone massage."])
    assert ex == [{"prompt": fmt.prompt(ROW), "response": fmt.response(ROW["reasoning"], ROW["label"])},
                  {"text": "Basalt stone therapy is a hot-stone massage."}]
    # what the training loop makes of each row (train.fit's lm task)
    b = train.encode(tok, [r.get("prompt", "") for r in ex], [r.get("response") or r["text"] for r in ex], 256)
    p_len = len(tok(fmt.prompt(ROW), add_special_tokens=False).input_ids)
    assert (b["labels"][0][:p_len] == losses.IGNORE).all()  # the pair: its prompt is not trained
    n = int(b["attention_mask"][1].sum())
    assert (b["labels"][1][:n] != losses.IGNORE).all()  # the replayed text: every token is


def test_sft_replays_teacher_dapts_training_texts_per_pair_and_says_when_there_are_none(tmp_path):
    from kubedistill.core import pipeline, spec

    run = spec.parse_run(minimal_doc(storage={"uri": str(tmp_path)}, teacher={"sft": {"corpusReplay": 0.5}}))
    sft = next(s for s in pipeline.build(run) if s.name == "teacher-sft")
    root = Storage(str(tmp_path / "test-run"))
    for stage in ("data", "teacher-dapt"):
        root.write_json(f"{stage}/_SUCCESS.json", {"digest": stage, "artifact": root.uri(stage)})
    ctx = StageContext(sft.config, root)
    with pytest.raises(ValueError, match=r"spec.teacher.sft.corpusReplay: teacher-dapt's output at .* holds no "
                                         r"training texts to replay"):
        stages.sft_replay(ctx, 10)
    texts = [f"Domain text {i}." for i in range(8)]
    data.write_rows(root.child("teacher-dapt"), "examples/part-00000", [{"text": t} for t in texts], "jsonl")
    replay = stages.sft_replay(ctx, 10)
    assert len(replay) == 5 and len(set(replay)) == 5 and set(replay) <= set(texts)
    off = spec.parse_run(minimal_doc(storage={"uri": str(tmp_path)}))  # the default replays nothing
    assert stages.sft_replay(StageContext(next(s for s in pipeline.build(off) if s.name == "teacher-sft").config,
                                          root), 10) == []


def test_reward_dimensions_are_checked():
    assert stages.dimensions_of({"format": 1.0, "label": 2.0}) == ["label", "format"]
    with pytest.raises(ValueError, match="spec.teacher.rewardModel.dimensions: unknown \\['tone'\\]"):
        stages.dimensions_of({"tone": 1.0})


def test_perplexity_of_a_model_that_learned_the_text_is_lower(tiny):
    model, tok, g = tiny
    texts = [r["text"] for r in g.corpus][:8]
    before = stages.perplexity(model, tok, texts)
    cfg = train.TrainConfig(task="lm", start="", examples_uri="", train=TrainSpec(epochs=1, learning_rate=3e-3, batch_size=4, max_steps=20))

    m = copy.deepcopy(model)
    train.fit(cfg, m, tok, None, [{"text": t} for t in texts])
    assert stages.perplexity(m, tok, texts) < before <= len(tok) * 3


def test_lora_through_the_stages_own_build_train_checkpoint_and_merge(tiny, tmp_path):
    """The path the teacher stages take with `lora:` (train.build wraps the start model, train.fit trains it,
    the checkpoint holds its state, stages.trained_model reloads and merges): the adapters alone train, and the
    merged model computes what the trained unmerged one did, in the base model's shape."""
    import ray.train

    model, tok, g = tiny
    start = tmp_path / "start"
    lm.save(model, tok, Storage(str(start)))
    cfg = train.TrainConfig(task="lm", start=str(start), examples_uri="",
                            train=TrainSpec(epochs=1, learning_rate=1e-2, batch_size=4, max_steps=3),
                            lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    peft_model, tokenizer, frozen = train.build(cfg, None, reference=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert frozen is None and trainable and all("lora_" in n for n in trainable)
    base = {k: v.clone() for k, v in lm.load(str(start), "start")[0].state_dict().items()}
    ex = [{"prompt": fmt.prompt(r), "response": fmt.response(r["reasoning"], r["label"])} for r in g.sft[:8]]
    (tmp_path / "ckpt").mkdir()
    train.fit(cfg, peft_model, tokenizer, None, ex, on_checkpoint=lambda save, m: save(tmp_path / "ckpt"))
    merged, _ = stages.trained_model(cfg, ray.train.Checkpoint.from_directory(str(tmp_path / "ckpt")), None)
    assert set(merged.state_dict()) == set(base)  # no adapter left: the base model's own parameter names
    assert any(not torch.equal(merged.state_dict()[k], base[k]) for k in base)  # and the training is in it
    batch = tok([fmt.prompt(r) for r in g.eval[:3]], return_tensors="pt", padding=True)
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, peft_model(**batch).logits, rtol=1e-4, atol=1e-4)
