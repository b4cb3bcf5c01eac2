"""The knowledge world's guarantees: every pair is gradable from its standard input and the corpus, the
reasoning cites only corpus facts, and the knowledge sits in a long tail a label alone rarely shows."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from kubedistill.core.spec import SpecError, parse_run
from kubedistill.stages import world
from kubedistill.stages.data import service_text
from kubedistill.stages.teacher import fmt
from tests.conftest import minimal_doc

LABELS = ["irrelevant", "partial", "relevant"]


@pytest.fixture(scope="module", params=[(0, 0.0), (7, 0.0), (0, 0.25)], ids=["seed0", "seed7", "corpus-only"])
def gen(request):
    seed, share = request.param
    return world.generate(LABELS, 300, 400, 6, 300, 400, seed=seed, corpus_only_share=share)


def corpus_of(g) -> list[str]:
    return [d["text"] for d in g.corpus]


def sentences(text: str) -> list[str]:
    return re.split(r"(?<=\.) ", text.strip())


def test_every_pair_is_graded_from_its_standard_input_and_the_corpus_alone(gen):
    kb = world.knowledge_from_corpus(corpus_of(gen))  # the knowledge read back from text, not the generator's
    for rows in (gen.labeled, gen.sft, gen.eval):
        for r in rows:
            assert world.grade_text(r["query"], service_text(r), kb, LABELS) == r["label"], r


def test_the_log_holds_only_the_standard_input(gen):
    row = gen.log[0]
    assert "label" not in row and "reasoning" not in row
    assert service_text(row) == f"{row['service_title']} | {row['service_description']}"  # free text, no fields


def test_reasoning_states_no_fact_the_corpus_does_not(gen):
    corpus = set(corpus_of(gen))
    cited = 0
    for r in gen.labeled + gen.sft + gen.eval:
        for s in sentences(r["reasoning"]):
            if world.fact_kind(s) is not None:
                assert s in corpus, s
                cited += 1
    assert cited > len(gen.labeled) // 2  # the chains do cite knowledge


def test_the_oracle_cites_the_facts_that_decided_the_grade():
    rng = random.Random(3)
    kb = world.make_knowledge(rng, 8, 6)
    places = world.make_places(200, kb, rng, 0.3, 0.65)
    corpus = set(kb.sentences())
    for _ in range(300):
        ask = world.make_ask(rng, places, kb)
        for p in world.candidates(ask, places, 6, rng):
            v = world.judge(ask, p, kb)
            assert set(v.facts) <= corpus
            rest = v.reasoning
            for f in v.facts:
                rest = rest.replace(f, "")
            assert all(world.fact_kind(s) is None for s in sentences(rest)), v.reasoning  # the rest restates
            if ask.item in p.offers and p.offers[ask.item] != ask.item:
                assert world.fact("house", p.offers[ask.item], ask.item) in v.facts  # a house name is explained
            if ask.phrase != ask.item:
                assert world.fact("synonyms", ask.phrase, ask.item) in v.facts


def test_a_hand_checked_pair():
    kb = world.Knowledge(
        house={"Kiru Ritual": "hot stone"},
        streets={"Tamo Lane": "Old Town"},
        nicknames={"the old quarter": "Old Town"},
        cues={"bargain rates": 1, "white-glove service": 4},
        synonyms={},
        kinds={"spa": "spa", "bar": "bar"},
    )
    spa = world.Place("svc-1", "Velo Spa", "", "spa", "Old Town", "Tamo Lane", 1, "bargain rates", {"hot stone": "Kiru Ritual"})
    ask = world.Ask("hot stone", "hot stone", "Old Town", "the old quarter", 1, "cheap hot stone in the old quarter")
    v = world.judge(ask, spa, kb)
    assert v.grade == 1.0
    assert v.reasoning == (
        "The query asks for hot stone in Old Town at $ or less. Locals call Old Town \"the old quarter\". "
        "Velo Spa is a spa. The Kiru Ritual is a house name for hot stone. It offers hot stone. Tamo Lane is in "
        "Old Town. It is in Old Town, as asked. A place with bargain rates is priced $. It is priced $, within the "
        "budget."
    )
    text = "Velo Spa | A quiet spa on Tamo Lane. Known for the Kiru Ritual. Expect bargain rates."
    assert world.grade_text(ask.text, text, kb, LABELS) == "relevant"
    pricey = text.replace("bargain rates", "white-glove service")
    assert world.grade_text(ask.text, pricey, kb, LABELS) == "partial"  # over budget: one constraint missed
    assert world.grade_text("hot stone", pricey, kb, LABELS) == "relevant"  # no budget asked
    assert world.deciding_house_fact(v.reasoning) == "The Kiru Ritual is a house name for hot stone."
    # a spa that may or may not sell hot stones: whether it does rests on every house name it lists, so the
    # chain decodes each (as the corpus states it), and none names the asked item
    kb = world.Knowledge(**{**kb.__dict__, "house": {"Kiru Ritual": "hot stone", "Salo Journey": "sauna", "Pemi Therapy": "massage"}})
    nada = world.Place("svc-2", "Nada Spa", "", "spa", "Harbor", None, 1, "bargain rates",
                       {"sauna": "Salo Journey", "facial": "facial", "massage": "Pemi Therapy"})
    v = world.judge(world.Ask("hot stone", "hot stone", text="hot stone"), nada, kb)
    assert v.grade == 0.5 and v.reasoning == (
        "The query asks for hot stone. Nada Spa is a spa. The Salo Journey is a house name for sauna. The Pemi "
        "Therapy is a house name for massage. It does not offer hot stone."
    )
    assert world.deciding_house_fact(v.reasoning) is None
    # a place of another kind: its kind decides, no house name is decoded
    bar = world.Place("svc-3", "Lumo Bar", "", "bar", "Harbor", None, 2, "fair prices", {"craft beer": "Vika Hour"})
    v = world.judge(world.Ask("hot stone", "hot stone", text="hot stone"), bar, kb)
    assert v.grade == 0.0 and v.facts == ()
    assert v.reasoning == "The query asks for hot stone. Lumo Bar is a bar, and a bar does not offer hot stone."


def test_grading_refuses_text_the_world_does_not_write(gen):
    kb = world.knowledge_from_corpus(corpus_of(gen))
    with pytest.raises(ValueError, match="query item or place not known"):
        world.grade_text("quantum tunnelling", "X | A quiet spa in Harbor. Known for sauna. Expect fair prices.", kb, LABELS)
    with pytest.raises(ValueError, match="service text not in the world's form"):
        world.grade_text("sauna", "X | a sauna, somewhere", kb, LABELS)


def test_knowledge_is_a_long_tail_that_labels_rarely_show(gen):
    def house_facts(r):  # the house name the grade rests on, if any
        return [f] if (f := world.deciding_house_fact(r["reasoning"])) else []

    in_log = Counter(f for r in gen.labeled for f in house_facts(r))
    needed = [f for r in gen.eval for f in house_facts(r)]
    assert len(needed) >= len(gen.eval) // 5  # a house name decides a fifth of the held-out pairs or more
    seen = sorted(in_log[f] for f in needed)
    assert seen[len(seen) // 2] <= 5  # the median one decided at most 5 of the log's 2,400 pairs
    # the common names are there too: a lexical model has a head to get right
    head = [r for r in gen.eval if r["label"] == "relevant" and not house_facts(r)]
    assert len(head) >= 10


def test_splits_are_query_disjoint_and_generation_is_deterministic(gen):
    q = {name: {r["query"] for r in getattr(gen, name)} for name in ("labeled", "sft", "eval")}
    assert not (q["labeled"] & q["eval"]) and not (q["labeled"] & q["sft"]) and not (q["sft"] & q["eval"])
    again = world.generate(LABELS, 300, 400, 6, 300, 400, seed=0)
    assert again.eval == world.generate(LABELS, 300, 400, 6, 300, 400, seed=0).eval
    assert Counter(r["label"] for r in gen.labeled).keys() == set(LABELS)


def test_the_spec_selects_the_world():
    run = parse_run(minimal_doc(data={"synthetic": {"world": "knowledge"}}))
    assert run.spec.data.synthetic.world == "knowledge"
    assert parse_run(minimal_doc()).spec.data.synthetic.world == "classic"
    with pytest.raises(SpecError) as e:
        parse_run(minimal_doc(data={"synthetic": {"world": "fantasy"}}))
    assert "spec.data.synthetic.world" in str(e.value.problems[0])


def test_the_data_stage_writes_the_knowledge_world(tmp_path):
    from kubedistill.core import spec
    from kubedistill.core.stage import StageContext
    from kubedistill.core.storage import Storage
    from kubedistill.stages import data

    syn = {"services": 40, "queries": 30, "pairsPerQuery": 4, "sftSize": 10, "evalSize": 12, "seed": 0, "world": "knowledge"}
    section = spec.to_wire(spec.DataSpec.model_validate({"synthetic": syn}))
    ctx = StageContext({"run": "r", "stage": "data", "inputs": [], "spec": {"labels": LABELS, "data": section}},
                       Storage(str(tmp_path)), version="one")
    out = data.run_stage(ctx)
    assert out["metrics"]["world"] == "knowledge"
    assert out["metrics"]["corpus_only_share"] == 0.0 and out["metrics"]["eval_needing_unseen_facts"] >= 0
    rows = data.read_dataset(Storage(str(tmp_path)).child("data/v-one/eval"))
    assert len(rows) == 12 and rows[0]["service_category"] is None and rows[0]["service_tags"] == []
    corpus = [r["text"] for r in data.read_dataset(Storage(str(tmp_path)).child("data/v-one/corpus"))]
    kb = world.knowledge_from_corpus(corpus)
    assert all(world.grade_text(r["query"], service_text(r), kb, LABELS) == r["label"] for r in rows)


def test_faithfulness_is_judged_against_the_corpus_alone():
    corpus = {"The Kiru Ritual is a house name for hot stone.", "Tamo Lane is in Old Town."}
    oracle = [
        "The query asks for hot stone. Velo Spa is a spa. The Kiru Ritual is a house name for hot stone. It offers hot stone.",
        "The query asks for hot stone in Old Town. Tamo Lane is in Old Town. It is in Old Town, as asked.",
    ]
    chains = [
        # the cited fact, and an invented one (the corpus never says it)
        "The query asks for hot stone. The Kiru Ritual is a house name for hot stone. The Salo Journey is a house name for sauna.",
        # no fact at all: faithful, but it recalls nothing the oracle cited
        "The query asks for hot stone in Old Town. It is in Old Town, as asked.",
    ]
    # stated facts: 2 in chain 1 (1 in the corpus), 0 in chain 2 -> precision 1/2; chains with no invented
    # fact: chain 2 only -> 1/2; the oracle cited 2 facts, chain 1 states 1 of them -> recall 1/2
    assert world.faithfulness(chains, oracle, corpus) == {"fact_precision": 0.5, "faithful_chains": 0.5, "fact_recall": 0.5}
    assert world.faithfulness(oracle, oracle, corpus) == {"fact_precision": 1.0, "faithful_chains": 1.0, "fact_recall": 1.0}


def test_a_true_fact_about_a_name_the_prompt_lacks_is_not_grounded():
    """A chain that misreads the prompt's house name and recalls the corpus's fact for the name it wrote states
    a true fact, counted by `fact_precision` but not by `grounded_precision`."""
    corpus = {"The Kiru Ritual is a house name for hot stone.", "The Kira Ritual is a house name for sauna."}
    prompts = ["Query: hot stone\nService: Velo Spa | A quiet spa. Known for the Kiru Ritual.\nJudge relevance.\n"] * 2
    oracle = ["The query asks for hot stone. The Kiru Ritual is a house name for hot stone. It offers hot stone."] * 2
    chains = [
        # the prompt's name, true: grounded
        "The query asks for hot stone. The Kiru Ritual is a house name for hot stone. It offers hot stone.",
        # a misread name (Kira), true of that name, the prompt never shows it; and an invented one
        "The query asks for hot stone. The Kira Ritual is a house name for sauna. "
        "The Kiru Ritual is a house name for massage. It does not offer hot stone.",
    ]
    # stated: 1 + 2 facts; in the corpus: 2 of 3 (precision 2/3); grounded and true: chain 1's only (1/3);
    # chains all of whose facts are grounded and true: chain 1 (1/2)
    got = world.faithfulness(chains, oracle, corpus, prompts)
    assert got["fact_precision"] == pytest.approx(2 / 3)
    assert got["grounded_precision"] == pytest.approx(1 / 3)
    assert got["grounded_chains"] == 0.5
    assert world.fact_name("Locals call University \"Studentville\".") == "Studentville"
    assert world.grounded('Locals call University "Studentville".', "Query: massage in studentville")  # case aside
    assert world.fact_name("It offers hot stone.") is None


def test_every_fact_the_oracle_cites_is_grounded_in_its_pair():
    g = world.generate(LABELS, 300, 200, 6, 600, 200, seed=5)
    rows = g.labeled + g.eval
    assert any(world.cited_facts(r["reasoning"]) for r in rows)
    for r in rows:
        for f in world.cited_facts(r["reasoning"]):
            assert world.grounded(f, fmt.prompt(r)), (f, fmt.prompt(r))


def test_corpus_only_names_are_stated_by_the_corpus_and_never_by_an_sft_pair():
    """`corpusOnlyShare`: the SFT pairs never show a place using a corpus-only name, so no SFT chain states its
    fact; the corpus states every one, and the log and the eval set need them."""
    g = world.generate(LABELS, 300, 400, 6, 1000, 400, seed=3, corpus_only_share=0.25)
    corpus = corpus_of(g)
    kb = world.knowledge_from_corpus(corpus)
    hidden = world.corpus_only_names(kb, 0.25, seed=3)
    assert len(hidden) == round(0.25 * 8) * len(world.ITEMS) + round(0.25 * 6) * len(world.DISTRICTS)
    assert {world.fact("house", n, kb.house[n]) for n in hidden if n in kb.house} <= set(corpus)
    assert {world.fact("streets", n, kb.streets[n]) for n in hidden if n in kb.streets} <= set(corpus)

    def uses_hidden(r):
        return any(n in service_text(r) for n in hidden)

    assert not any(uses_hidden(r) for r in g.sft)
    assert not any(n in f for r in g.sft for f in world.cited_facts(r["reasoning"]) for n in hidden)
    assert sum(map(uses_hidden, g.eval)) >= len(g.eval) // 5 and sum(map(uses_hidden, g.labeled)) >= len(g.labeled) // 5
    needing = world.needing_unseen_facts(g.eval, g.sft)
    assert len(needing) >= len(g.eval) // 5
    cites_hidden = [i for i, r in enumerate(g.eval) if any(n in f for f in world.cited_facts(r["reasoning"]) for n in hidden)]
    assert cites_hidden and set(cites_hidden) <= set(needing)


def test_without_corpus_only_names_every_place_may_be_in_the_sft_pairs():
    g = world.generate(LABELS, 300, 400, 6, 300, 400, seed=0)
    assert g.sft == world.generate(LABELS, 300, 400, 6, 300, 400, seed=0, corpus_only_share=0.0).sft
    assert world.corpus_only_names(world.knowledge_from_corpus(corpus_of(g)), 0.0, seed=0) == set()
    hidden = world.generate(LABELS, 300, 400, 6, 300, 400, seed=0, corpus_only_share=0.25)
    places = {r["service_id"]: service_text(r) for r in g.eval + g.sft + g.labeled}
    again = {r["service_id"]: service_text(r) for r in hidden.eval + hidden.sft + hidden.labeled}
    assert all(places[k] == v for k, v in again.items() if k in places)  # the same world, split another way


def test_a_corpus_only_share_that_leaves_no_place_for_sft_is_refused():
    with pytest.raises(ValueError, match=r"spec\.data\.synthetic\.corpusOnlyShare: 0\.9 leaves no place"):
        world.generate(LABELS, 10, 40, 4, 30, 20, seed=0, corpus_only_share=0.9)


def test_needing_unseen_facts_on_a_hand_made_case():
    taught = [{"reasoning": "The query asks for sauna. The Kiru Ritual is a house name for hot-stone massage."}]
    rows = [
        {"reasoning": "The query asks for sauna. The Kiru Ritual is a house name for hot-stone massage."},
        {"reasoning": "The query asks for sauna. Tamo Lane is in Harbor. It is in Harbor, as asked."},
        {"reasoning": "The query asks for sauna. It offers sauna."},
    ]
    assert world.needing_unseen_facts(rows, taught) == [1]


def test_the_data_stage_counts_held_out_pairs_needing_a_corpus_only_fact(tmp_path):
    from kubedistill.core import spec
    from kubedistill.core.stage import StageContext
    from kubedistill.core.storage import Storage
    from kubedistill.stages import data

    syn = {"services": 300, "queries": 50, "pairsPerQuery": 6, "sftSize": 600, "evalSize": 200, "seed": 1,
           "world": "knowledge", "corpusOnlyShare": 0.25}
    section = spec.to_wire(spec.DataSpec.model_validate({"synthetic": syn}))
    ctx = StageContext({"run": "r", "stage": "data", "inputs": [], "spec": {"labels": LABELS, "data": section}},
                       Storage(str(tmp_path)), version="one")
    m = data.run_stage(ctx)["metrics"]
    read = Storage(str(tmp_path)).child("data/v-one")
    needing = world.needing_unseen_facts(data.read_dataset(read.child("eval")), data.read_dataset(read.child("sft")))
    assert m["corpus_only_share"] == 0.25 and m["eval_needing_unseen_facts"] == len(needing) >= 200 // 5
