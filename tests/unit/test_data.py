import json

import pytest

from kubedistill.core.storage import Storage
from kubedistill.stages import data, synthetic
from kubedistill.stages.synthetic import Intent, Service, judge
from tests.conftest import minimal_doc

LABELS = ["irrelevant", "partial", "relevant"]


def _svc(**kw):
    base = dict(id="s1", title="Sakura Sushi", category="japanese restaurant", district="Riverside", price_level=2,
                tags=("sushi", "ramen"), description="", theme=None)
    return Service(**{**base, **kw})


def test_oracle_relevant_when_item_and_constraints_match():
    j = judge(Intent("sushi", district="Riverside", max_price=2), _svc())
    assert j.grade == 1.0 and "offers sushi and meets every constraint" in j.reasoning


def test_oracle_sushi_themed_bar_is_irrelevant_despite_overlap():
    bar = _svc(title="Jade Sushi Bar", category="bar", tags=("cocktails", "sake"), theme="Sushi")
    j = judge(Intent("sushi"), bar)
    assert j.grade == 0.0 and "misleading" in j.reasoning and "Sushi" in j.reasoning


def test_oracle_right_dish_wrong_district_is_partial():
    j = judge(Intent("sushi", district="Harbor"), _svc())
    assert j.grade == 0.5 and "in Riverside, not Harbor" in j.reasoning


def test_oracle_over_budget_is_partial_and_both_misses_irrelevant():
    assert judge(Intent("sushi", max_price=1), _svc()).grade == 0.5
    j = judge(Intent("sushi", district="Harbor", max_price=1), _svc())
    assert j.grade == 0.0 and "over the budget" in j.reasoning


def test_oracle_same_kind_without_the_item_is_partial():
    j = judge(Intent("pizza"), _svc())  # a restaurant, but no pizza
    assert j.grade == 0.5 and "does not offer pizza" in j.reasoning
    assert judge(Intent("car wash"), _svc()).grade == 0.0


def test_refuted_names_the_claims_a_pair_refutes_and_the_oracle_makes_none():
    row = {"service_tags": ["sushi", "ramen"], "service_district": "Riverside", "service_price_level": 2}
    about = "Sakura Sushi is a japanese restaurant in Riverside ($$)."
    assert synthetic.refuted(f"Query asks for sushi. {about} It offers sushi and meets every constraint.", row) == []
    # the quickstart teacher's errors: a miss that is none, a tag it has said missing, a tag it lacks said offered
    assert synthetic.refuted(f"{about} It offers ramen, but it is in Riverside, not Riverside.", row) == [
        ("elsewhere", "says it is in Riverside, not Riverside; it is in Riverside")]
    assert synthetic.refuted(f"{about} It is the right kind of place but does not offer sushi.", row) == [
        ("lacks", "says it does not offer sushi; it does")]
    assert synthetic.refuted(f"{about} It offers udon, but it is in Harbor, not Downtown.", row) == [
        ("offers", "says it offers udon; its tags do not hold it"),
        ("elsewhere", "says it is in Harbor, not Downtown; it is in Riverside")]
    assert synthetic.refuted(f"{about} It offers sushi, but its price level $$ is over the budget $$.", row) == [
        ("over budget", "says its price level $$ is over the budget $$; its level is $$")]
    assert synthetic.refuted("Sakura Sushi is a japanese restaurant in Harbor ($).", row) == [
        ("about", "says it is in Harbor ($); it is in Riverside ($$)")]
    # true misses are not refuted
    assert synthetic.refuted(f"{about} It offers sushi, but it is in Riverside, not Harbor and its price level $$ is "
                             "over the budget $.", row) == []
    # every chain the oracle writes is consistent with its pair, and every kind of claim is checked on them
    g = synthetic.generate(LABELS, 300, 400, 6, 3000, 400, 0)
    assert all(synthetic.refuted(r["reasoning"], r) == [] for r in g.sft + g.labeled + g.eval)
    assert all(any(p.search(r["reasoning"]) for r in g.sft) for p in synthetic._CLAIMS.values())


@pytest.mark.parametrize("grade, labels, want", [
    (0.0, LABELS, "irrelevant"), (0.5, LABELS, "partial"), (1.0, LABELS, "relevant"),
    (0.0, ["no", "yes"], "no"), (0.5, ["no", "yes"], "yes"), (1.0, ["a", "b", "c", "d", "e"], "e"),
])
def test_grade_to_label(grade, labels, want):
    assert synthetic.grade_to_label(grade, labels) == want


def test_generator_is_deterministic_disjoint_and_has_hard_cases():
    a = data.generate(LABELS, 200, 150, 5, 100, 150, seed=3)
    b = data.generate(LABELS, 200, 150, 5, 100, 150, seed=3)
    assert a.eval == b.eval and a.log == b.log
    assert (len(a.log), len(a.sft), len(a.eval)) == (750, 100, 150)
    ids = [set(r["pair_id"] for r in rows) for rows in (a.labeled, a.sft, a.eval)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set(data.LOG_COLUMNS) == set(a.log[0]) and "label" not in a.log[0]
    assert set(data.LABELED_COLUMNS) == set(a.eval[0])
    assert set(data.label_counts(a.labeled)) == set(LABELS)
    reasons = " ".join(r["reasoning"] for r in a.labeled)
    assert "misleading" in reasons and ", not " in reasons and "over the budget" in reasons
    assert any(q in {r["query"] for r in a.labeled} for q in ("raw fish", "hot pot", "pool")) or any(
        any(alt in r["query"] for alts in synthetic.SYNONYMS.values() for alt in alts) for r in a.labeled)
    assert len(a.corpus) > 200 and all(isinstance(c["text"], str) for c in a.corpus)


def test_a_query_has_one_split_by_hash_in_proportion_to_the_splits_sizes():
    sizes = [1000, 8000, 3000]
    queries = [f"query {i}" for i in range(20_000)]
    split = [synthetic.query_split(q, 0, sizes) for q in queries]
    assert split == [synthetic.query_split(q, 0, sizes) for q in queries]  # a function of the query alone
    shares = [split.count(k) / len(split) for k in range(3)]
    assert all(abs(share - n / sum(sizes)) < 0.01 for share, n in zip(shares, sizes, strict=True)), shares
    assert split != [synthetic.query_split(q, 1, sizes) for q in queries]  # another world seed, another cut


@pytest.mark.parametrize("world_name", ["classic", "knowledge"])
def test_held_out_queries_are_a_random_share_of_the_traffic_not_its_head(world_name):
    """Splits used to be filled in turn (eval, then SFT, then the log), each query going to the first split that
    drew it: eval took the common short queries ("sushi") and left the log the long tail, so held-out pairs were
    easier than the log's (in the ablation's knowledge world 34% of eval rows were a bare item, 1% of the log's; in
    the classic world eval also shared queries with the log, since it was split by pair). Each query's
    split is now `query_split`'s hash: eval holds its share of the short queries, as of all queries."""
    from kubedistill.stages import world

    generate = world.generate if world_name == "knowledge" else synthetic.generate
    g = generate(LABELS, 300, 400, 6, 2000, 600, 0)
    queries = {name: {r["query"] for r in getattr(g, name)} for name in ("eval", "sft", "labeled")}
    assert not (queries["eval"] & queries["sft"]) and not (queries["eval"] & queries["labeled"])
    assert not (queries["sft"] & queries["labeled"])
    sizes = [600, 2000, 400 * 6]
    for k, name in enumerate(("eval", "sft", "labeled")):
        assert {synthetic.query_split(q, 0, sizes) for q in queries[name]} == {k}, name
    every = set().union(*queries.values())
    short = {q for q in every if len(q.split()) <= 2 and "$" not in q}
    # filled in turn, eval held 18-28% of the short queries and 12-13% of all (3 seeds, both worlds); now within 1-4
    # points of its share
    assert abs(len(queries["eval"] & short) / len(short) - len(queries["eval"]) / len(every)) < 0.06


def test_validate_row_names_the_field():
    good = {"query": "sushi", "service_id": "s1", "service_title": "Sakura"}
    out = data.validate_row(good, None, False)
    assert out["pair_id"] == data.pair_id("sushi", "s1") and out["service_tags"] == []
    cases = [
        ({**good, "query": ""}, "field 'query': required"),
        ({**good, "service_price_level": 7}, "field 'service_price_level'"),
        ({**good, "service_tags": "sushi"}, "field 'service_tags': expected a list"),
        ({**good, "service_title": 3}, "field 'service_title': expected a string"),
    ]
    for row, msg in cases:
        with pytest.raises(data.RowError, match=msg):
            data.validate_row(row, None, False)
    with pytest.raises(data.RowError, match=r"field 'label': expected one of"):
        data.validate_row({**good, "label": "great"}, LABELS, False)
    with pytest.raises(data.RowError, match=r"field 'reasoning': required"):
        data.validate_row({**good, "label": "partial"}, LABELS, True)


def test_ingest_file_quarantines_bad_rows_and_counts_add_up(tmp_path):
    rows = [
        {"query": "sushi", "service_id": "s1", "service_title": "A", "label": "relevant", "reasoning": "r"},
        "not json at all",
        {"query": "ramen", "service_id": "s2", "service_title": "B", "label": "wonderful", "reasoning": "r"},
        [1, 2],
        {"query": "pizza", "service_id": "s3", "service_title": "C", "label": "partial", "reasoning": "r"},
    ]
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n"
    (tmp_path / "eval.jsonl").write_text(text)
    good, bad, total = data.ingest_file(Storage(str(tmp_path)), "eval.jsonl", LABELS, True)
    assert total == 5 and len(good) == 2 and len(bad) == 3
    assert [(b["row"], b["reason"].split(":")[0]) for b in bad] == [(2, "not valid JSON (Expecting value)"),
                                                                   (3, "field 'label'"), (4, "expected a JSON object, got list")]


def test_labeled_rows_without_reasoning_are_ingested_not_quarantined(tmp_path):
    """Human-graded pairs rarely carry written reasoning: the data stage keeps them (every dataset it ingests);
    teacher SFT and the CRSD student check for reasoning themselves before they start (test_teacher, test_student)."""
    required = {name: need for name, _, _, _, need in data._DATASETS}
    rows = [{"query": "sushi", "service_id": "s1", "service_title": "A", "label": "relevant"},
            {"query": "ramen", "service_id": "s2", "service_title": "B", "label": "partial", "reasoning": ""},
            {"query": "pizza", "service_id": "s3", "service_title": "C", "label": "irrelevant", "reasoning": "r"}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, bad, total = data.ingest_file(Storage(str(tmp_path)), "sft.jsonl", LABELS, required["sft"])
    assert (total, len(good), bad) == (3, 3, [])
    assert [r["reasoning"] for r in good] == ["", "", "r"] and not any(required.values())


def test_write_and_read_dataset_roundtrip_both_formats(tmp_path):
    gen = data.generate(LABELS, 50, 30, 4, 10, 20, seed=1)
    for fmt in ("parquet", "jsonl"):
        st = Storage(str(tmp_path / fmt))
        files = data.write_dataset(st, "logs", gen.log, fmt, shards=3)
        assert len(files) == 3 and all(f.endswith(fmt) for f in files)
        back = data.read_dataset(st.child("logs"))
        assert back == gen.log
        per = -(-len(gen.log) // 3)
        assert data.read_dataset(st.child(f"logs/part-00000.{fmt}")) == gen.log[:per]  # a single file works too


def test_a_rerun_with_another_format_leaves_only_the_new_parts(tmp_path):
    from kubedistill.core import spec
    from kubedistill.core.stage import StageContext

    syn = {"services": 40, "queries": 30, "pairsPerQuery": 4, "sftSize": 10, "evalSize": 12, "seed": 0}
    root = Storage(str(tmp_path))
    for fmt in ("jsonl", "parquet"):
        section = spec.to_wire(spec.DataSpec.model_validate({"format": fmt, "synthetic": syn}))
        ctx = StageContext({"run": "r", "stage": "data", "inputs": [], "spec": {"labels": LABELS, "data": section}}, root,
                           version="same")  # one version: a retry of an attempt that failed after writing
        out = data.run_stage(ctx)
    assert {f.rsplit(".", 1)[-1] for f in root.list("data")} == {"parquet"}
    assert len(data.read_dataset(root.child("data/v-same/eval"))) == out["metrics"]["eval"]["rows_written"] == 12


def _row(q: str, sid: str, label: str, reasoning: str = "") -> dict:
    return {"pair_id": data.pair_id(q, sid), "query": q, "service_id": sid, "service_title": sid, "label": label,
            "reasoning": reasoning}


@pytest.mark.parametrize("train_on, annotate, expect", [
    ("auto", True, {"annotations": 2}),
    ("auto", False, {"labels": 2}),
    ("labels", True, {"labels": 2}),
    ("annotations", True, {"annotations": 2}),
    ("both", True, {"labels": 2, "annotations": 1}),  # the pair both cover keeps its human label
])
def test_the_student_learns_from_labels_annotations_or_both(tmp_path, train_on, annotate, expect):
    """spec.student.trainOn: which rows the student and the baseline learn from, each tagged with its source;
    the stage graph gives the student the annotate stage only when it reads it."""
    from kubedistill.core import pipeline, spec
    from kubedistill.core.stage import StageContext

    run = spec.parse_run(minimal_doc(storage={"uri": str(tmp_path)}, teacher={"enabled": False},
                                     annotation={"enabled": annotate, "model": "m"}, pruning={"enabled": False},
                                     student={"trainOn": train_on}))
    student = next(s for s in pipeline.build(run) if s.name == "student-crsd")
    assert ("annotate" in student.config["inputs"]) is (train_on != "labels" and annotate)
    root = Storage(str(tmp_path / "test-run"))
    data.write_rows(root.child("data"), "sft/part-00000", [_row("q1", "s1", "relevant"), _row("q2", "s2", "partial")],
                    "jsonl")
    root.write_json("data/_SUCCESS.json", {"digest": "d", "artifact": root.uri("data")})
    data.write_rows(root.child("annotate"), "labeled/part-00000",
                    [_row("q1", "s1", "irrelevant", "teacher says no"), _row("q3", "s3", "relevant", "yes")], "jsonl")
    root.write_json("annotate/_SUCCESS.json", {"digest": "a", "artifact": root.uri("annotate")})
    rows, source = data.training_rows(StageContext(student.config, root))
    assert data.row_sources(rows) == expect
    if train_on == "both":
        assert {r["pair_id"]: r["label"] for r in rows}[data.pair_id("q1", "s1")] == "relevant"
        assert " + " in source


def test_the_student_validates_on_held_out_training_queries_or_on_held_out_sft_queries():
    """spec.student.validateOn: trainingRows holds out queries of the rows the student learns from; sftSeed
    holds out queries of the SFT set (true labels) and leaves only those queries' rows out of training."""
    from kubedistill.core.spec import StudentSpec

    rows = [_row(f"q{i}", f"s{j}", "relevant", "why") for i in range(20) for j in range(3)]
    sft = [_row(f"q{i}", f"t{j}", "partial") for i in range(10, 40) for j in range(2)]  # q10..q19 also in rows
    own = StudentSpec.model_validate({"validationFraction": 0.2, "seed": 3})
    assert data.validation_split(rows, None, own) == data.split_by_query(rows, 0.2, 3)
    gold = StudentSpec.model_validate({"validationFraction": 0.2, "seed": 3, "validateOn": "sftSeed"})
    train, val = data.validation_split(rows, sft, gold)
    assert val == data.split_by_query(sft, 0.2, 3)[1] and {r["label"] for r in val} == {"partial"}
    held = {r["query"] for r in val}
    assert len(held) == 6 and {r["query"] for r in train}.isdisjoint(held)
    assert train == [r for r in rows if r["query"] not in held]  # every row of another query trains
    assert len(train) < len(rows)  # this seed holds out a query both sets share: its rows leave training
    with pytest.raises(ValueError, match="spec.student.validateOn: sftSeed needs the data stage's SFT set and "
                                         "it has none: set spec.data.sftSeed"):
        data.validation_split(rows, [], gold)
    only = [r for r in rows if r["query"] in held]  # training rows all of validation queries: nothing would train
    with pytest.raises(ValueError, match=f"every one of the {len(only)} training rows has one of them: lower "
                                         "spec.student.validationFraction"):
        data.validation_split(only, sft, gold)


def test_validating_on_an_sft_set_the_spec_does_not_have_is_refused_naming_the_field():
    from kubedistill.core import spec

    user = {"logs": "s3://b/logs", "evalSet": "s3://b/eval"}
    with pytest.raises(spec.SpecError, match="spec.student.validateOn: sftSeed validates on held-out queries of "
                                             "spec.data.sftSeed, which is not set"):
        spec.parse_run(minimal_doc(data=user, teacher={"enabled": False}, annotation={"model": "m"},
                                   pruning={"enabled": False}, student={"validateOn": "sftSeed"}))
    with pytest.raises(spec.SpecError, match="spec.student.validateOn"):
        spec.parse_run(minimal_doc(student={"validateOn": "sft"}))
    ok = spec.parse_run(minimal_doc(data={**user, "sftSeed": "s3://b/sft"}, teacher={"enabled": False},
                                    annotation={"model": "m"}, pruning={"enabled": False},
                                    student={"validateOn": "sftSeed"}))
    assert ok.spec.student.validate_on == "sftSeed"


def test_training_on_annotations_without_the_annotate_stage_is_refused_naming_the_field():
    from kubedistill.core import spec

    with pytest.raises(spec.SpecError, match="spec.student.trainOn: both needs the annotate stage"):
        spec.parse_run(minimal_doc(annotation={"enabled": False}, student={"trainOn": "both"}))


def test_rationales_fill_only_rows_without_reasoning_for_the_same_label():
    rows = [{"pair_id": "a", "label": "relevant", "reasoning": ""},
            {"pair_id": "b", "label": "partial", "reasoning": "A person wrote this."},
            {"pair_id": "c", "label": "irrelevant", "reasoning": ""},
            {"pair_id": "d", "label": "partial", "reasoning": ""}]
    explained = [{"pair_id": "a", "label": "relevant", "reasoning": "Model: sushi matches."},
                 {"pair_id": "b", "label": "partial", "reasoning": "Model: something else."},
                 {"pair_id": "d", "label": "relevant", "reasoning": "Model: another label."}]
    out = data.with_rationales(rows, explained)
    assert [r["reasoning"] for r in out] == ["Model: sushi matches.", "A person wrote this.", "", ""]
    assert [bool(r.get("rationalized")) for r in out] == [True, False, False, False]
    assert rows[0]["reasoning"] == ""  # the input is not changed
