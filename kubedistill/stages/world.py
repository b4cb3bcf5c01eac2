"""The `knowledge` synthetic world: grading a pair needs domain knowledge that the corpus states.

`spec.data.synthetic.world: knowledge`. Where the `classic` world (`synthetic.generate`) puts every
decisive fact in a structured field (category, district, price level, tags), this one writes each
service as free text (a title and a description) in the platform's own vocabulary:

- **house names**: a place sells its items under its own names ("the Kiru Ritual" for a hot-stone
  massage); each item has a long tail of them, most seen only a few times in any log;
- **streets**: a description says where a place is by street ("on Tamo Lane"), and each district has
  its streets; queries may use a district's nickname ("the old quarter");
- **price cues**: a description never prints a price level, only what a visitor would read
  ("white-glove service", "bargain rates");
- searchers' synonyms ("reflexology" for foot massage), as in the classic world.

Every mapping is one sentence of the corpus (`Knowledge.sentences`), so a teacher pre-trained on it can
know them; a student learning from labels alone must see each rare name often enough. Nothing is hidden:
`grade_text` grades any pair from the standard input (query + service text) and the corpus alone, by the
oracle's rules, and the tests hold it to the oracle's label on every pair. The oracle's reasoning cites
the facts the grade rests on, each one a corpus sentence verbatim (`judge`): for a place of the asked
kind, every house name it lists (whether it sells the item rests on all of them), then the street and
price cue behind each asked constraint; everything else restates the input or judges, evidence first.
The easy head (common item names, district names, the cues a general model already reads) is open to a
lexical baseline; the tail is not.

`spec.data.synthetic.corpusOnlyShare` keeps a share of the house names and streets out of the teacher's SFT
pairs (`corpus_only_names`): those pairs come only from places that use none of them, so no SFT chain states
those facts and only the corpus does, while the log and the eval set draw from every place. A teacher then
explains a held-out pair that needs one (`needing_unseen_facts`) only from what pre-training taught it.

Rules (those of the classic world): a place that offers the item is relevant when it meets every asked
constraint (district, budget), partial when it misses one, irrelevant when it misses both; a place of the
same kind that does not offer the item is partial when it meets every constraint, else irrelevant;
anything else is irrelevant.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubedistill.stages.synthetic import (
    CATALOG,
    DISTRICTS,
    PRICE_SIGNS,
    SYNONYMS,
    SyntheticData,
    draw,
    grade_to_label,
    pair_id,
    query_split,
    split_tries,
    unlabeled,
)

#: district -> nicknames searchers use for it
NICKNAMES: dict[str, tuple[str, ...]] = {
    "Downtown": ("the city centre", "the business district"),
    "Riverside": ("the embankment",),
    "Old Town": ("the old quarter", "the historic centre"),
    "Harbor": ("the docks", "the waterfront"),
    "Northgate": ("the north side",),
    "West End": ("theatreland",),
    "University": ("the campus area", "studentville"),
    "Airport": ("the terminal area",),
}
#: price level -> what a description says instead of a price
PRICE_CUES: dict[int, tuple[str, ...]] = {
    1: ("bargain rates", "cash-only counters", "student discounts", "no-frills value"),
    2: ("fair prices", "mid-range rates", "everyday pricing"),
    3: ("upscale surroundings", "premium rates", "reservations recommended"),
    4: ("white-glove service", "a members' lounge", "concierge booking", "luxury throughout"),
}
#: kind of place -> the nouns its house names end with (shared by every item of the kind, so the noun
#: alone never tells which item a name stands for)
HOUSE_NOUNS: dict[str, tuple[str, ...]] = {
    "restaurant": ("Special", "Plate", "Bowl", "Classic"),
    "bar": ("Hour", "Session", "Pour"),
    "hotel": ("Perk", "Promise", "Corner"),
    "spa": ("Ritual", "Therapy", "Journey"),
    "fitness": ("Program", "Method", "Series"),
    "car care": ("Package", "Service", "Care"),
    "salon": ("Look", "Signature", "Finish"),
}
STREET_NOUNS = ("Lane", "Street", "Road", "Square", "Walk", "Row")
ADJECTIVES = ("quiet", "busy", "friendly", "modern", "cosy", "family-run", "bright", "small")
BUDGET_WORDS = ("cheap", "budget", "affordable")
#: every item the catalog's places may offer, sorted
ITEMS = sorted({i for _, items in CATALOG.values() for i in items})
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word (2-3 syllables): a name no pre-trained model has a meaning for."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3)))).capitalize()


def item_kinds(item: str) -> set[str]:
    """The kinds of place that offer `item` (ramen: restaurant; gym: hotel and fitness)."""
    return {kind for kind, items in CATALOG.values() if item in items}


@dataclass(frozen=True)
class Knowledge:
    """The world's domain knowledge: every mapping a grader needs beyond the words of the pair."""

    house: dict[str, str]  # house name -> item
    streets: dict[str, str]  # street -> district
    nicknames: dict[str, str]  # nickname -> district
    cues: dict[str, int]  # price cue -> price level
    synonyms: dict[str, str]  # searcher's phrase -> item
    kinds: dict[str, str]  # category -> kind of place

    def sentences(self) -> list[str]:
        """Every fact, one sentence each (the corpus's knowledge documents)."""
        return [fact(kind, a, b) for kind in FACTS for a, b in getattr(self, kind).items()]


#: each kind of fact (a `Knowledge` field) -> its sentence, the same words in the corpus and in any reasoning that
#: cites it: {a} the name, {b} what it means
FACTS = {
    "house": "The {a} is a house name for {b}.",
    "streets": "{a} is in {b}.",
    "nicknames": 'Locals call {b} "{a}".',
    "cues": "A place with {a} is priced {b}.",
    "synonyms": "Searchers say {a} when they mean {b}.",
    "kinds": "A {a} is a kind of {b}.",
}
#: a street has a street's form, so a verdict ("... but it is in Harbor, not Old Town.") never reads as a street fact
_NAME_FORM = {"streets": rf"[A-Z][a-z]+ (?:{'|'.join(STREET_NOUNS)})"}


def _pattern(kind: str, text: str) -> re.Pattern[str]:
    """The regex that reads a fact of `kind` back: {a} and {b} become the groups a and b."""
    a = f"(?P<a>{_NAME_FORM.get(kind, '.+?')})"
    return re.compile("^" + re.escape(text).replace(re.escape("{a}"), a).replace(re.escape("{b}"), "(?P<b>.+?)") + "$")


_FACT_PATTERNS = tuple((kind, _pattern(kind, text)) for kind, text in FACTS.items())
_HOUSE_FACT = dict(_FACT_PATTERNS)["house"]


def fact(kind: str, a: str, b: str | int) -> str:
    """The sentence stating one fact (`FACTS`); a price cue's meaning is its level."""
    return FACTS[kind].format(a=a, b=PRICE_SIGNS[b] if isinstance(b, int) else b)


def fact_kind(sentence: str) -> str | None:
    """Which kind of fact a sentence states (`Knowledge` field name), or None for no fact."""
    for name, pattern in _FACT_PATTERNS:
        if pattern.match(sentence):
            return name
    return None


#: the first sentence of every chain (`judge`): the item asked for, then the asked constraints
_ASKS = re.compile(r"^The query asks for (?P<item>.+?)(?: in .+?)?(?: at \$+ or less)?\.(?: |$)")


def deciding_house_fact(reasoning: str) -> str | None:
    """The house-name fact a chain's grade rests on (the place sells the asked item under that name), or None
    where the grade needs no house name. A chain decodes every house name of a place of the asked kind; only
    the one naming the asked item decides."""
    asked = _ASKS.match(reasoning)
    if asked is None:
        return None
    return next((s for s in _sentences(reasoning) if (m := _HOUSE_FACT.match(s)) and m["b"] == asked["item"]), None)


def cited_facts(reasoning: str) -> list[str]:
    """The fact-shaped sentences a chain states (`FACTS`' forms), in order."""
    return [x for x in _sentences(reasoning) if fact_kind(x)]


def needing_unseen_facts(rows: list[dict[str, Any]], taught: list[dict[str, Any]]) -> list[int]:
    """Indices of `rows` whose oracle chain cites a fact that no chain of `taught` (a teacher's SFT pairs)
    states: pairs a teacher can explain right only from what it knows beyond its SFT pairs (the corpus)."""
    seen = {f for r in taught for f in cited_facts(r["reasoning"])}
    return [i for i, r in enumerate(rows) if any(f not in seen for f in cited_facts(r["reasoning"]))]


def fact_name(sentence: str) -> str | None:
    """The name a fact-shaped sentence explains (`FACTS`' {a}: a house name, street, nickname, price cue, search
    phrase or kind), or None for no fact."""
    return next((m["a"] for _, pattern in _FACT_PATTERNS if (m := pattern.match(sentence))), None)


def grounded(sentence: str, prompt: str) -> bool:
    """Whether a fact is about the pair at hand: the name it explains occurs in the pair's prompt (query and
    service text; case aside, as queries are lower-cased). Every fact the oracle cites is."""
    name = fact_name(sentence)
    return name is not None and name.lower() in prompt.lower()


def faithfulness(
    chains: list[str], oracle: list[str], corpus: set[str], prompts: list[str] | None = None
) -> dict[str, float]:
    """How reasoning chains hold up against the world's knowledge, judged by the corpus alone (never by a
    reward model): `fact_precision`, the share of the fact-shaped sentences they state that the corpus states
    (the rest is invented knowledge; 0 when no chain states a fact); `faithful_chains`, the share of chains
    stating no fact the corpus lacks; `fact_recall`, the share of the facts each pair's oracle chain
    (`oracle`, same order) cites that its chain states.

    With each pair's prompt (`prompts`, same order) a true fact must also be about that pair: a chain that
    misreads a name (Panaru for the prompt's Pariru) and recalls the corpus's fact for the name it wrote states
    a true fact, not a faithful one. `grounded_precision`, the share of stated facts the corpus states whose
    name occurs in the prompt (`grounded`); `grounded_chains`, the share of chains all of whose facts are."""
    stated = [cited_facts(c) for c in chains]
    cited = [cited_facts(o) for o in oracle]
    out = {
        "fact_precision": sum(x in corpus for f in stated for x in f) / max(1, sum(map(len, stated))),
        "faithful_chains": sum(all(x in corpus for x in f) for f in stated) / max(1, len(chains)),
        "fact_recall": sum(x in s for s, c in zip(stated, cited, strict=True) for x in c)
        / max(1, sum(map(len, cited))),
    }
    if prompts is not None:
        ok = [[x in corpus and grounded(x, p) for x in f] for f, p in zip(stated, prompts, strict=True)]
        out["grounded_precision"] = sum(map(sum, ok)) / max(1, sum(map(len, stated)))
        out["grounded_chains"] = sum(map(all, ok)) / max(1, len(chains))
    return out


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.) ", text) if s]


def knowledge_from_corpus(texts: list[str]) -> Knowledge:
    """Read the knowledge back from corpus documents alone: what a grader can know without the generator."""
    found: dict[str, dict[str, Any]] = {name: {} for name, _ in _FACT_PATTERNS}
    signs = {v: k for k, v in PRICE_SIGNS.items()}
    for text in texts:
        for name, pattern in _FACT_PATTERNS:
            m = pattern.match(text)
            if m:
                found[name][m["a"]] = signs[m["b"]] if name == "cues" else m["b"]
                break
    return Knowledge(**found)


def make_knowledge(rng: random.Random, house_per_item: int, streets_per_district: int) -> Knowledge:
    used: set[str] = set()

    def fresh(nouns: Sequence[str]) -> str:
        while True:
            name = f"{pseudo_word(rng)} {rng.choice(nouns)}"
            if name not in used:
                used.add(name)
                return name

    house = {}
    for item in ITEMS:
        nouns = [n for k in sorted(item_kinds(item)) for n in HOUSE_NOUNS[k]]
        for _ in range(house_per_item):
            house[fresh(nouns)] = item
    streets = {fresh(STREET_NOUNS): d for d in DISTRICTS for _ in range(streets_per_district)}
    return Knowledge(
        house=house,
        streets=streets,
        nicknames={n: d for d, ns in NICKNAMES.items() for n in ns},
        cues={c: p for p, cs in PRICE_CUES.items() for c in cs},
        synonyms={s: i for i, ss in SYNONYMS.items() for s in ss},
        kinds={c: k for c, (k, _) in CATALOG.items()},
    )


@dataclass(frozen=True)
class Place:
    """A service as the generator knows it; only `title` and `description` reach the log."""

    id: str
    title: str
    description: str
    category: str
    district: str
    street: str | None  # where the description names a street instead of the district
    price: int
    cue: str
    offers: dict[str, str]  # item -> the words the description uses for it (the item or a house name)
    theme: str | None = None  # an item the title names that the place does not offer (the lexical trap)

    def row(self) -> dict[str, Any]:
        return {
            "service_id": self.id,
            "service_title": self.title,
            "service_category": None,
            "service_district": None,
            "service_price_level": None,
            "service_tags": [],
            "service_description": self.description,
        }


def _listing(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def make_places(n: int, kb: Knowledge, rng: random.Random, head_share: float, street_share: float) -> list[Place]:
    """Places whose descriptions use the world's vocabulary. House names are drawn Zipf-like (a few common,
    most rare); `head_share` of offered items are called by their common name, `street_share` of places
    are located by street."""
    names_of: dict[str, list[str]] = {}
    for name, item in kb.house.items():
        names_of.setdefault(item, []).append(name)
    streets_of: dict[str, list[str]] = {}
    for name, d in kb.streets.items():
        streets_of.setdefault(d, []).append(name)
    places = []
    for i in range(n):
        category = rng.choice(list(CATALOG))
        kind, items = CATALOG[category]
        offered = rng.sample(items, k=rng.randint(2, min(4, len(items))))
        offers = {}
        for item in offered:
            names = names_of[item]
            if rng.random() < head_share:
                offers[item] = item
            else:
                offers[item] = rng.choices(names, weights=[1 / (r + 1) for r in range(len(names))])[0]
        district = rng.choice(DISTRICTS)
        street = rng.choice(streets_of[district]) if rng.random() < street_share else None
        price = rng.choices((1, 2, 3, 4), weights=(3, 4, 3, 1))[0]
        cue = rng.choice(PRICE_CUES[price])
        theme: str | None = None
        word = pseudo_word(rng)
        if rng.random() < 0.2:  # a name that promises what the place does not offer
            theme = rng.choice([x for x in ITEMS if kind not in item_kinds(x)])
            title = f"{word} {theme.title()} {rng.choice(('House', 'Club', 'Place', 'Corner'))}"
        else:
            title = f"{word} {category.title()}"
        where = f"on {street}" if street else f"in {district}"
        shown = [n if n == it else f"the {n}" for it, n in offers.items()]
        description = (
            f"A {rng.choice(ADJECTIVES)} {category} {where}. "
            f"{rng.choice(('Known for', 'We offer', 'Come for'))} {_listing(shown)}. Expect {cue}."
        )
        places.append(Place(f"svc-{i:06d}", title, description, category, district, street, price, cue, offers, theme))
    return places


@dataclass(frozen=True)
class Ask:
    """What the searcher wants and the words they used (the oracle's side of a query)."""

    item: str
    phrase: str  # the item's words in the query: the item or a synonym
    district: str | None = None
    district_phrase: str | None = None  # the district or a nickname
    max_price: int | None = None
    text: str = ""


def make_ask(rng: random.Random, places: list[Place], kb: Knowledge) -> Ask:
    anchor = rng.choice(places)
    item = rng.choice(sorted(anchor.offers))
    synonyms = [s for s, i in kb.synonyms.items() if i == item]
    phrase = rng.choice(synonyms) if synonyms and rng.random() < 0.4 else item
    district = rng.choice((anchor.district, rng.choice(DISTRICTS))) if rng.random() < 0.5 else None
    district_phrase = None
    if district:
        nicks = [n for n, d in kb.nicknames.items() if d == district]
        district_phrase = rng.choice(nicks) if rng.random() < 0.35 else district
    max_price = rng.choice((1, 2, 3)) if rng.random() < 0.35 else None
    parts = [phrase]
    if max_price:
        parts.insert(0, rng.choice(BUDGET_WORDS) if max_price == 1 else f"under {PRICE_SIGNS[max_price]}")
    if district_phrase:
        parts.append(f"{rng.choice(('in', 'near'))} {district_phrase}")
    return Ask(item, phrase, district, district_phrase, max_price, " ".join(parts).lower())


@dataclass(frozen=True)
class Verdict:
    grade: float  # 0 irrelevant .. 1 relevant
    reasoning: str
    facts: tuple[str, ...]  # the corpus sentences the reasoning cites


def judge(ask: Ask, p: Place, kb: Knowledge) -> Verdict:
    """The oracle: grade a pair and explain it, citing every fact the decision used (as corpus sentences).

    The chain puts evidence before each judgement, one step per sentence: what the query asks (and the
    facts behind its words), what the place is, what it offers (decoding its house names where they decide
    it), then each asked constraint as the place's value followed by whether it meets it."""
    facts: list[str] = []
    steps = [
        f"The query asks for {ask.item}"
        + (f" in {ask.district}" if ask.district else "")
        + (f" at {PRICE_SIGNS[ask.max_price]} or less" if ask.max_price else "")
        + "."
    ]

    def cite(f: str) -> None:
        facts.append(f)
        steps.append(f)

    if ask.phrase != ask.item:
        cite(fact("synonyms", ask.phrase, ask.item))
    if ask.district_phrase and ask.district_phrase != ask.district:
        cite(fact("nicknames", ask.district_phrase, ask.district or ""))
    offers = ask.item in p.offers
    same_kind = kb.kinds[p.category] in item_kinds(ask.item)
    if not same_kind:  # another kind of place: its kind decides, whatever its name promises
        steps.append(
            f"{p.title} is a {p.category}"
            + (f"; its name mentions {p.theme}, but" if p.theme else ", and")
            + f" a {p.category} does not offer {ask.item}."
        )
        return Verdict(0.0, " ".join(steps), tuple(facts))
    steps.append(f"{p.title} is a {p.category}.")
    if p.offers.get(ask.item) != ask.item:  # whether it offers the item rests on its house names
        for item, name in p.offers.items():
            if name != item:
                cite(fact("house", name, item))
    steps.append(f"It offers {ask.item}." if offers else f"It does not offer {ask.item}.")
    misses = 0
    if ask.district:
        if p.street:
            cite(fact("streets", p.street, p.district))
        met = p.district == ask.district
        misses += not met
        steps.append(f"It is in {p.district}, " + ("as asked." if met else f"not {ask.district}."))
    if ask.max_price:
        cite(fact("cues", p.cue, p.price))
        met = p.price <= ask.max_price
        misses += not met
        steps.append(f"It is priced {PRICE_SIGNS[p.price]}, " + ("within the budget." if met else "over the budget."))
    grade = (1.0, 0.5, 0.0)[misses] if offers else (0.0 if misses else 0.5)
    return Verdict(grade, " ".join(steps), tuple(facts))


def candidates(ask: Ask, places: list[Place], k: int, rng: random.Random) -> list[Place]:
    """Places shown for a query: matches (by common and house names), same-kind places, places whose
    title shares the query's words, places in the asked district, and noise."""
    words = set(ask.phrase.split())
    offers = [p for p in places if ask.item in p.offers]
    kinds = item_kinds(ask.item)
    same_kind = [p for p in places if CATALOG[p.category][0] in kinds and ask.item not in p.offers]
    overlap = [p for p in places if ask.item not in p.offers and words & set(p.title.lower().split())]
    nearby = [p for p in places if ask.district and p.district == ask.district]
    return draw([offers, offers, same_kind, overlap, nearby, places], k, rng)


def corpus_only_names(kb: Knowledge, share: float, seed: int) -> set[str]:
    """`share` of each item's house names and of each district's streets (rounded, drawn with a generator of
    their own, so a share of 0 changes no other draw): names only the corpus will state."""
    rng = random.Random(f"corpus-only-{seed}")
    groups: dict[tuple[str, str], list[str]] = {}
    for name, item in kb.house.items():
        groups.setdefault(("house", item), []).append(name)
    for name, district in kb.streets.items():
        groups.setdefault(("streets", district), []).append(name)
    return {n for _, names in sorted(groups.items()) for n in rng.sample(names, round(share * len(names)))}


def uses_any(p: Place, names: set[str]) -> bool:
    """Whether a place's description uses one of `names` (a house name it sells under, or its street)."""
    return p.street in names or any(n in names for n in p.offers.values())


def generate(
    labels: list[str],
    services: int,
    queries: int,
    pairs_per_query: int,
    sft_size: int,
    eval_size: int,
    seed: int,
    house_per_item: int = 8,
    streets_per_district: int = 6,
    head_share: float = 0.3,
    street_share: float = 0.65,
    corpus_only_share: float = 0.0,
) -> SyntheticData:
    """A knowledge-world search log (the same datasets and columns as `synthetic.generate`). Eval, SFT and log
    use disjoint queries, each split a random share of the same query distribution (`query_split`); the corpus
    holds every fact (`Knowledge.sentences`), each place's description, and a sample of queries. With
    `corpus_only_share`, that share of the names (`corpus_only_names`) is kept out of the SFT pairs: their queries
    and candidates come only from places that use none of them, so no SFT chain states those facts; the log and
    the eval set draw from every place."""
    rng = random.Random(seed)
    kb = make_knowledge(rng, house_per_item, streets_per_district)
    places = make_places(services, kb, rng, head_share, street_share)
    corpus_only = corpus_only_names(kb, corpus_only_share, seed) if corpus_only_share else set()
    familiar = [p for p in places if not uses_any(p, corpus_only)]
    if not familiar:
        raise ValueError(
            f"spec.data.synthetic.corpusOnlyShare: {corpus_only_share} leaves no place for the SFT pairs "
            f"(every one of the {services} places uses a corpus-only name); lower it or add services"
        )
    out = SyntheticData()
    seen_pairs: set[str] = set()
    splits = (("eval", eval_size), ("sft", sft_size), ("labeled", queries * pairs_per_query))
    sizes = [n for _, n in splits]
    for k, (name, n) in enumerate(splits):
        rows: list[dict[str, Any]] = []
        shown = familiar if name == "sft" else places
        for _ in range(split_tries(n, sizes, k)):
            if len(rows) >= n:
                break
            ask = make_ask(rng, shown, kb)
            if query_split(ask.text, seed, sizes) != k:
                continue  # a query belongs to one split, a random share of the traffic (`query_split`)
            for p in candidates(ask, shown, pairs_per_query, rng):
                pid = pair_id(ask.text, p.id)
                if pid in seen_pairs or len(rows) >= n:
                    continue
                seen_pairs.add(pid)
                v = judge(ask, p, kb)
                rows.append(
                    {
                        "pair_id": pid,
                        "query": ask.text,
                        **p.row(),
                        "label": grade_to_label(v.grade, labels),
                        "reasoning": v.reasoning,
                    }
                )
        setattr(out, name, rows)
    out.log = unlabeled(out.labeled)
    out.corpus = [{"text": t} for t in kb.sentences()]
    out.corpus += [{"text": f"{p.title}. {p.description}"} for p in places]
    out.corpus += [{"text": f"search: {r['query']}"} for r in out.labeled[:: max(1, pairs_per_query)]]
    return out


# ---------------------------------------------------------------------------------------------
# Grading from the standard input and the corpus alone (the world's no-hidden-variable guarantee).

_QUERY = re.compile(
    rf"^(?:(?P<budget>{'|'.join(BUDGET_WORDS)}|under \$+) )?(?P<item>.+?)(?: (?:in|near) (?P<where>.+))?$"
)
_DISTRICT_WORDS = {d.lower(): d for d in DISTRICTS}
_DESCRIPTION = re.compile(
    r"^A (?:\S+) (?P<category>.+?) (?:on (?P<street>.+?)|in (?P<district>.+?))\. "
    r"(?:Known for|We offer|Come for) (?P<offers>.+)\. Expect (?P<cue>.+)\.$"
)


def grade_text(query: str, service: str, kb: Knowledge, labels: list[str]) -> str:
    """The label of a pair from its standard input (the query and `data.service_text`: `title | description`)
    and the knowledge alone, by the oracle's rules. Raises ValueError on text the world does not write."""
    q = _QUERY.match(query)
    if not q:
        raise ValueError(f"query not in the world's form: {query!r}")
    item = q["item"] if q["item"] in ITEMS else kb.synonyms.get(q["item"])
    where = q["where"]
    district = (_DISTRICT_WORDS.get(where) or kb.nicknames.get(where)) if where else None
    if item is None or (where is not None and district is None):
        raise ValueError(f"query item or place not known: {query!r}")
    budget = q["budget"]
    max_price = None if budget is None else (1 if not budget.startswith("under") else budget.count("$"))
    _title, _, description = service.partition(" | ")
    d = _DESCRIPTION.match(description)
    if not d:
        raise ValueError(f"service text not in the world's form: {service!r}")
    place_district = d["district"] or kb.streets[d["street"]]
    names = re.split(r", | and ", d["offers"])
    offered = {kb.house.get(n.removeprefix("the "), n) for n in names}
    same_kind = kb.kinds[d["category"]] in item_kinds(item)
    misses = int(district is not None and place_district != district)
    misses += int(max_price is not None and kb.cues[d["cue"]] > max_price)
    if item in offered:
        grade = (1.0, 0.5, 0.0)[misses]
    elif same_kind:
        grade = 0.0 if misses else 0.5
    else:
        grade = 0.0
    return grade_to_label(grade, labels)
