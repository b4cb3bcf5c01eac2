"""Search-log data: the row schema, the synthetic worlds' data stage, and ingestion.

Row schema (one query-service pair a row; what a search log holds):

    pair_id, query, service_id, service_title, service_category, service_district,
    service_price_level (1-4), service_tags (list of str), service_description

Labeled sets add `label` (one of `spec.labels`, least relevant first) and `reasoning` (a short chain
citing the decisive evidence). The annotation stage writes the same columns, so the student trains
on either.

With no logs, the data stage generates a synthetic world (`spec.data.synthetic.world`): `synthetic.py`
(classic: every decisive fact in a structured field) or `world.py` (knowledge: free text in the platform's
vocabulary, the mappings stated by the corpus).
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kubedistill.core.progress import Target
from kubedistill.core.spec import StudentSpec
from kubedistill.core.stage import StageContext
from kubedistill.core.storage import S3Options, Storage
from kubedistill.stages import world
from kubedistill.stages.synthetic import PRICE_SIGNS, generate, pair_id

LOG_COLUMNS = (
    "pair_id",
    "query",
    "service_id",
    "service_title",
    "service_category",
    "service_district",
    "service_price_level",
    "service_tags",
    "service_description",
)
LABELED_COLUMNS = (*LOG_COLUMNS, "label", "reasoning")


def service_text(row: dict[str, Any]) -> str:
    """The service side of the standard input, from the log's service fields."""
    parts = [row.get("service_title") or ""]
    for key in ("service_category", "service_district"):
        if row.get(key):
            parts.append(row[key])
    if row.get("service_price_level"):
        parts.append(PRICE_SIGNS.get(int(row["service_price_level"]), ""))
    if row.get("service_tags"):
        parts.append("offers " + ", ".join(row["service_tags"]))
    if row.get("service_description"):
        parts.append(row["service_description"])
    return " | ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Validation of user rows (bring-your-own logs).


class RowError(ValueError):
    pass


def validate_row(row: dict[str, Any], labels: list[str] | None, need_reasoning: bool) -> dict[str, Any]:
    """Return the row normalised to the schema, or raise RowError naming the field."""

    def required(name: str) -> str:
        v = text(name, True)
        assert v is not None  # text() raised otherwise
        return v

    def text(name: str, required: bool) -> str | None:
        v = row.get(name)
        if v is None or (isinstance(v, str) and not v.strip()):
            if required:
                raise RowError(f"field '{name}': required, expected a non-empty string")
            return None
        if not isinstance(v, str):
            raise RowError(f"field '{name}': expected a string, got {type(v).__name__}")
        return v

    query = required("query")
    service_id = required("service_id")
    out: dict[str, Any] = {
        "pair_id": text("pair_id", False) or pair_id(query, service_id),
        "query": query,
        "service_id": service_id,
        "service_title": text("service_title", True),
        "service_category": text("service_category", False),
        "service_district": text("service_district", False),
        "service_description": text("service_description", False),
    }
    price = row.get("service_price_level")
    if price is not None and (isinstance(price, bool) or not isinstance(price, int) or not 1 <= price <= 4):
        raise RowError(f"field 'service_price_level': expected an integer 1-4 or null, got {price!r}")
    out["service_price_level"] = price
    tags = row.get("service_tags")
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise RowError(f"field 'service_tags': expected a list of strings, got {tags!r}")
    out["service_tags"] = tags
    if labels is not None:
        label = row.get("label")
        if label not in labels:
            raise RowError(f"field 'label': expected one of {labels}, got {label!r}")
        out["label"] = label
        reasoning = text("reasoning", need_reasoning)
        out["reasoning"] = reasoning or ""
    return out


def jsonl_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) for each non-blank line of a JSONL file, split at b"\n" only: JSON
    strings may hold U+2028, U+2029 and other characters that `str.splitlines()` breaks lines at."""
    for n, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            yield n, line.rstrip(b"\r")


def _read_rows(storage: Storage, rel: str) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(row number, row or None, error) for each row of a jsonl or parquet file; 1-based numbers."""
    if (rel or storage.root_uri).endswith(".parquet"):
        with storage.fs.open_input_file(storage.path(rel)) as f:
            pf = pq.ParquetFile(f)
            n = 0
            for batch in pf.iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    n += 1
                    yield n, row, None
        return
    for n, line in jsonl_lines(storage.read_bytes(rel)):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, None, f"not valid JSON ({e.msg})"
            continue
        if not isinstance(row, dict):
            yield n, None, f"expected a JSON object, got {type(row).__name__}"
            continue
        yield n, row, None


def ingest_file(
    src: Storage, rel: str, labels: list[str] | None, need_reasoning: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Validate one file: (good rows, quarantined rows with reasons, rows read)."""
    good, bad, total = [], [], 0
    for n, row, err in _read_rows(src, rel):
        total += 1
        if row is not None:
            try:
                good.append(validate_row(row, labels, need_reasoning))
                continue
            except RowError as e:
                err = str(e)
        bad.append({"source": src.uri(rel), "row": n, "reason": err, "raw": json.dumps(row, default=str)[:2000]})
    return good, bad, total


def data_files(storage: Storage) -> list[str]:
    """The jsonl/parquet files at a URI that is a file or a prefix ('' means the URI itself)."""
    if storage.is_file():
        return [""]  # the URI is a single file
    files = [
        f
        for f in storage.list()
        if f.endswith((".jsonl", ".json", ".parquet")) and not f.rsplit("/", 1)[-1].startswith((".", "_"))
    ]
    return files


# ---------------------------------------------------------------------------------------------
# Writing.


def _schema(labeled: bool, label_probs: bool = False) -> pa.Schema:
    """A dataset's parquet schema: the log's fields, the label and reasoning when `labeled`, and the teacher's
    label distribution when `label_probs` (the annotate stage's votes)."""
    fields = [
        ("pair_id", pa.string()),
        ("query", pa.string()),
        ("service_id", pa.string()),
        ("service_title", pa.string()),
        ("service_category", pa.string()),
        ("service_district", pa.string()),
        ("service_price_level", pa.int64()),
        ("service_tags", pa.list_(pa.string())),
        ("service_description", pa.string()),
    ]
    if labeled:
        fields += [("label", pa.string()), ("reasoning", pa.string())]
    if label_probs:
        fields.append(("label_probs", pa.list_(pa.float64())))
    return pa.schema(fields)


def write_rows(out: Storage, rel: str, rows: list[dict[str, Any]], fmt: str, schema: pa.Schema | None = None) -> str:
    """Write rows as one parquet or jsonl file (atomically); returns its URI."""
    if fmt == "jsonl":
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return out.write_bytes(f"{rel}.jsonl", body.encode())
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return out.write_bytes(f"{rel}.parquet", buf.getvalue())


def write_dataset(out: Storage, name: str, rows: list[dict[str, Any]], fmt: str, shards: int = 1) -> list[str]:
    """Write a dataset as `name/part-NNNNN.<fmt>` shards."""
    labeled = bool(rows) and "label" in rows[0]
    schema = _schema(labeled) if rows and "pair_id" in rows[0] else None
    shards = max(1, min(shards, len(rows)))
    per = -(-len(rows) // shards) if rows else 0
    return [write_rows(out, f"{name}/part-{i:05d}", rows[i * per : (i + 1) * per], fmt, schema) for i in range(shards)]


def read_dataset(storage: Storage) -> list[dict[str, Any]]:
    """Read every shard of a dataset written by `write_dataset` (small sets: eval, sft)."""
    rows: list[dict[str, Any]] = []
    for rel in data_files(storage):
        for _, row, err in _read_rows(storage, rel):
            if row is None:
                raise ValueError(f"{storage.uri(rel)}: {err}")
            rows.append(row)
    return rows


def labels_dataset(data: Storage) -> str | None:
    """Which of the data stage's datasets holds the run's labeled pairs: `labeled` (the synthetic oracle's
    labels of the log) or `sft` (spec.data.sftSeed); None when it wrote neither."""
    return next((n for n in ("labeled", "sft") if data.list(n)), None)


def with_rationales(rows: list[dict[str, Any]], explained: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Labeled rows with the rationalize stage's reasoning where they have none of their own (by pair_id, for
    the same label): a chain written by a person stays; a row the model could not explain stays without."""
    chains = {r["pair_id"]: r for r in explained}
    out = []
    for r in rows:
        e = chains.get(r["pair_id"])
        if not (r.get("reasoning") or "").strip() and e is not None and e["label"] == r["label"]:
            r = {**r, "reasoning": e["reasoning"], "rationalized": True}
        out.append(r)
    return out


def training_rows(ctx: StageContext) -> tuple[list[dict[str, Any]], str]:
    """The labeled (query, service) pairs the student (and the baseline) learn from, each tagged with its
    `source` ("annotations" or "labels"), and where they came from. `spec.student.trainOn`: the annotate
    stage's rows, the data stage's labeled pairs (the synthetic oracle's, or `spec.data.sftSeed`), or both,
    a human label winning where a pair has both; auto: annotations when the run has them, else labels. When the
    run rationalizes its labels, the labeled pairs carry the rationalize stage's reasoning (`with_rationales`)."""
    annotations = "annotate" in ctx.inputs  # the registry adds it exactly when trainOn reads annotations
    mode = ctx.spec.student.train_on
    mode = ("annotations" if annotations else "labels") if mode == "auto" else mode
    rows: list[dict[str, Any]] = []
    sources = []
    if mode in ("labels", "both"):
        data = ctx.input("data")
        name = labels_dataset(data)
        if name is None:
            raise ValueError(
                f"spec.student.trainOn: {mode} needs labeled pairs and the data stage has none: set spec.data.sftSeed"
                + (", or train on annotations" if annotations else "")
            )
        rows += [{**r, "source": "labels"} for r in read_dataset(data.child(name))]
        sources.append(data.uri(name))
        if "rationalize" in ctx.inputs:
            explained = ctx.input("rationalize").child("labeled")
            rows = with_rationales(rows, read_dataset(explained))
            sources.append(f"reasoning from {explained.uri()}")
    if mode in ("annotations", "both"):
        src = ctx.input("annotate").child("labeled")
        labeled = {r["pair_id"] for r in rows}
        rows += [{**r, "source": "annotations"} for r in read_dataset(src) if r["pair_id"] not in labeled]
        sources.append(src.uri())
    return rows, " + ".join(sources)


def row_sources(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many training rows came from each source (`training_rows`)."""
    return dict(sorted(Counter(r.get("source", "unknown") for r in rows).items()))


def split_by_query(
    rows: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, held out): whole queries held out (not pairs), so what is scored on them was never seen."""
    queries = sorted({r["query"] for r in rows})
    random.Random(seed).shuffle(queries)
    held = set(queries[: max(1, int(len(queries) * fraction))])
    return [r for r in rows if r["query"] not in held], [r for r in rows if r["query"] in held]


def validation_split(
    rows: list[dict[str, Any]], sft: list[dict[str, Any]] | None, student: StudentSpec
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation) of the student's `rows` by `spec.student.validateOn`: held-out queries of `rows`
    (trainingRows), or of the SFT set `sft` (sftSeed), every row of a validation query left out of training."""
    fraction, seed = student.validation_fraction, student.seed
    if student.validate_on == "trainingRows":
        return split_by_query(rows, fraction, seed)
    if not sft:
        raise ValueError(
            "spec.student.validateOn: sftSeed needs the data stage's SFT set and it has none: set "
            "spec.data.sftSeed (human-labeled pairs), or validate on trainingRows"
        )
    val = split_by_query(sft, fraction, seed)[1]
    held = {r["query"] for r in val}
    train = [r for r in rows if r["query"] not in held]
    if rows and not train:
        raise ValueError(
            f"spec.student.validateOn: sftSeed holds out the SFT set's validation queries, and every one of the "
            f"{len(rows)} training rows has one of them: lower spec.student.validationFraction, or validate on "
            "trainingRows"
        )
    return train, val


def read_sft(ctx: StageContext) -> list[dict[str, Any]] | None:
    """The data stage's SFT set when `spec.student.validateOn` reads it, else None (nothing is read)."""
    if ctx.spec.student.validate_on != "sftSeed":
        return None
    data = ctx.input("data")
    return read_dataset(data.child("sft")) if data.list("sft") else []


def label_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(r["label"] for r in rows).items()))


# ---------------------------------------------------------------------------------------------
# The `data` stage.

#: (dataset name, spec.data field, its name on the wire, labeled?, reasoning required?). Reasoning is never
#: required here: labeled rows without it are valid data; what reads it (teacher SFT, the student's CRSD
#: view) checks for it before it starts and says what to do.
_DATASETS = (
    ("logs", "logs", "logs", False, False),
    ("eval", "eval_set", "evalSet", True, False),
    ("sft", "sft_seed", "sftSeed", True, False),
)


def _ingest(ctx: StageContext, options: S3Options) -> dict[str, Any]:
    """Validate and copy the user's datasets; bad rows are quarantined with their reasons."""
    import ray

    d, labels = ctx.spec.data, ctx.spec.labels
    remote = ray.remote(num_cpus=1)(_ingest_one)
    metrics: dict[str, Any] = {"source": "user"}
    outputs: dict[str, Any] = {}
    for name, attr, key, labeled, need_reasoning in _DATASETS:
        uri = getattr(d, attr)
        if not uri:
            continue
        src = Storage(uri, options)
        files = data_files(src)
        if not files:
            raise ValueError(f"spec.data.{key}: no .jsonl or .parquet files at {uri}")
        refs = [
            remote.remote(
                uri, options, rel, labels if labeled else None, need_reasoning, ctx.out.uri(), name, i, d.format
            )
            for i, rel in enumerate(files)
        ]
        progress = Target.of(ctx.storage, ctx.name).start(len(refs), "files", label=name)
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=1)
            progress.update(len(refs) - len(pending))
        progress.close()
        results = ray.get(refs)
        rows_in = sum(r["rows_in"] for r in results)
        written = sum(r["rows_written"] for r in results)
        bad = [b for r in results for b in r["quarantined"]]
        if bad:
            write_rows(ctx.out, f"quarantine/{name}", bad, "jsonl")
            ctx.log(
                f"{name}: {len(bad)} row(s) quarantined, e.g. {bad[0]['source']} row {bad[0]['row']}: {bad[0]['reason']}"
            )
        if written == 0:
            raise ValueError(f"spec.data.{key}: no valid rows in {uri} ({len(bad)} quarantined)")
        metrics[name] = {"rows_in": rows_in, "rows_written": written, "rows_quarantined": len(bad)}
        outputs[name] = ctx.out.uri(name)
        ctx.log(f"{name}: {rows_in} rows in, {written} written, {len(bad)} quarantined")
    if d.corpus:
        src = Storage(d.corpus, options)
        texts = []
        for rel in data_files(src):
            for _, row, err in _read_rows(src, rel):
                if err is None and isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
                    texts.append({"text": row["text"]})
        write_dataset(ctx.out, "corpus", texts, d.format)
        metrics["corpus"] = {"documents": len(texts)}
        outputs["corpus"] = ctx.out.uri("corpus")
    return {"metrics": metrics, "outputs": outputs}


def _ingest_one(
    src_uri: str,
    options: Any,
    rel: str,
    labels: list[str] | None,
    need_reasoning: bool,
    out_uri: str,
    name: str,
    index: int,
    fmt: str,
) -> dict[str, Any]:
    src, out = Storage(src_uri, options), Storage(out_uri, options)
    good, bad, total = ingest_file(src, rel, labels, need_reasoning)
    if good:
        write_rows(out, f"{name}/part-{index:05d}", good, fmt, _schema(labels is not None))
    return {"rows_in": total, "rows_written": len(good), "quarantined": bad}


#: what the data stage writes under its prefix
OUTPUT_DIRS = ("logs", "labeled", "sft", "eval", "corpus", "quarantine")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    """Generate the synthetic log, or validate and ingest the user's (`spec.data.logs`)."""
    d, labels = ctx.spec.data, ctx.spec.labels
    # a rerun starts clean: parts an earlier config wrote (another format, more input files) would
    # otherwise be read beside the new ones
    for name in OUTPUT_DIRS:
        ctx.out.delete(name)
    if d.logs:
        return _ingest(ctx, ctx.storage.options)
    syn = d.synthetic
    ctx.log(
        f"generating a synthetic log ({syn.world} world): {syn.services} services, "
        f"{syn.queries} queries x {syn.pairs_per_query}"
    )
    sizes = (syn.services, syn.queries, syn.pairs_per_query, syn.sft_size, syn.eval_size, syn.seed)
    if syn.world == "knowledge":
        gen = world.generate(labels, *sizes, corpus_only_share=syn.corpus_only_share)
    else:
        gen = generate(labels, *sizes)
    shards = max(1, len(gen.log) // 1000)
    outputs = {}
    for name, rows, n in (
        ("logs", gen.log, shards),
        ("labeled", gen.labeled, shards),
        ("sft", gen.sft, 1),
        ("eval", gen.eval, 1),
        ("corpus", gen.corpus, 1),
    ):
        write_dataset(ctx.out, name, rows, d.format, n)
        outputs[name] = ctx.out.uri(name)
    rows_in = len(gen.labeled) + len(gen.sft) + len(gen.eval)
    metrics: dict[str, Any] = {
        "source": "synthetic",
        "world": syn.world,
        **(
            {
                "corpus_only_share": syn.corpus_only_share,
                # held-out pairs whose explanation needs a fact no SFT chain states (only the corpus does)
                "eval_needing_unseen_facts": len(world.needing_unseen_facts(gen.eval, gen.sft)),
            }
            if syn.world == "knowledge"
            else {}
        ),
        "logs": {"rows_in": len(gen.log), "rows_written": len(gen.log), "rows_quarantined": 0, "shards": shards},
        "labeled": {"rows": len(gen.labeled), "labels": label_counts(gen.labeled)},
        "sft": {
            "rows_in": len(gen.sft),
            "rows_written": len(gen.sft),
            "rows_quarantined": 0,
            "labels": label_counts(gen.sft),
        },
        "eval": {
            "rows_in": len(gen.eval),
            "rows_written": len(gen.eval),
            "rows_quarantined": 0,
            "labels": label_counts(gen.eval),
        },
        "corpus": {"documents": len(gen.corpus)},
        "rows_in": rows_in,
        "rows_written": rows_in,
        "rows_quarantined": 0,
    }
    ctx.log(
        f"wrote {len(gen.log)} log pairs, {len(gen.sft)} SFT, {len(gen.eval)} eval; labels {metrics['eval']['labels']}"
    )
    return {"metrics": metrics, "outputs": outputs}
