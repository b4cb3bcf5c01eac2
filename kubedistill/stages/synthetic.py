"""The classic synthetic world: a local-services search log whose oracle grades every pair.

The generator models a local-services platform (restaurants, bars, hotels, spas, fitness, car care, hair
salons). A hidden structured intent behind each query (target item, optional district and budget) lets an
oracle grade every pair and explain why. Hard cases are generated on purpose: word overlap that misleads (a
"sushi" query vs a sushi-themed bar serving no sushi), the right dish in the wrong district, the right place
over budget. Every decisive fact sits in a structured field of the row (category, district, price level,
tags); `world.py` is the world where it does not (`spec.data.synthetic.world`).

Also what both worlds share: the platform's catalog and districts, `grade_to_label`, `pair_id` and the
`SyntheticData` they return.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

DISTRICTS = ("Downtown", "Riverside", "Old Town", "Harbor", "Northgate", "West End", "University", "Airport")
PRICE_SIGNS = {1: "$", 2: "$$", 3: "$$$", 4: "$$$$"}

# category -> (kind of place, items it may offer)
CATALOG: dict[str, tuple[str, tuple[str, ...]]] = {
    "japanese restaurant": ("restaurant", ("sushi", "sashimi", "ramen", "tempura", "udon", "bento")),
    "hotpot restaurant": ("restaurant", ("hotpot", "spicy broth", "beef tripe", "lamb slices", "mushroom broth")),
    "pizzeria": ("restaurant", ("pizza", "margherita", "calzone", "pasta", "tiramisu")),
    "korean bbq": ("restaurant", ("korean bbq", "pork belly", "bibimbap", "kimchi stew")),
    "noodle house": ("restaurant", ("beef noodles", "dumplings", "ramen", "wonton soup")),
    "cafe": ("restaurant", ("coffee", "latte", "cheesecake", "croissant", "matcha")),
    "bar": ("bar", ("cocktails", "craft beer", "sake", "whisky", "live music")),
    "hotel": ("hotel", ("swimming pool", "gym", "free parking", "breakfast", "pet friendly", "airport shuttle")),
    "spa": ("spa", ("massage", "facial", "sauna", "foot massage", "hot stone")),
    "fitness": ("fitness", ("gym", "yoga", "pilates", "boxing", "swimming pool", "personal trainer")),
    "car care": ("car care", ("car wash", "oil change", "tire repair", "detailing", "brake service")),
    "hair salon": ("salon", ("haircut", "hair coloring", "perm", "beard trim", "blow dry")),
}

NAME_WORDS = (
    "Golden",
    "Blue",
    "Lucky",
    "Silver",
    "Red Lantern",
    "Sakura",
    "Harbor",
    "Maple",
    "Jade",
    "Urban",
    "Sunny",
    "Royal",
    "Green Leaf",
    "Iron",
    "Velvet",
    "Lotus",
    "North Star",
    "Bamboo",
    "Copper",
    "Pearl",
)
NAME_SUFFIX = {
    "japanese restaurant": ("Sushi", "Izakaya", "Kitchen"),
    "hotpot restaurant": ("Hotpot", "Pot House"),
    "pizzeria": ("Pizzeria", "Slice"),
    "korean bbq": ("BBQ", "Grill House"),
    "noodle house": ("Noodles", "Noodle Bar"),
    "cafe": ("Cafe", "Coffee"),
    "bar": ("Lounge", "Tavern", "Bar"),
    "hotel": ("Hotel", "Inn", "Suites"),
    "spa": ("Spa", "Wellness"),
    "fitness": ("Fitness", "Gym", "Studio"),
    "car care": ("Auto Care", "Car Wash"),
    "hair salon": ("Salon", "Hair Studio"),
}

# How searchers phrase an item; most share no word with the service's own text (the lexical trap).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "hotpot": ("hot pot", "huoguo", "steamboat"),
    "sashimi": ("raw fish", "sliced raw fish"),
    "ramen": ("japanese noodle soup",),
    "pizza": ("pie", "flatbread"),
    "beef noodles": ("niu rou mian", "beef noodle soup"),
    "dumplings": ("jiaozi", "potstickers"),
    "korean bbq": ("k-bbq", "korean barbecue", "gogi"),
    "coffee": ("espresso", "flat white", "americano"),
    "cocktails": ("mixed drinks", "martini"),
    "craft beer": ("ipa", "microbrew"),
    "live music": ("live band", "jazz night"),
    "swimming pool": ("pool", "place to swim"),
    "free parking": ("parking included", "park for free"),
    "pet friendly": ("dogs allowed", "bring my dog"),
    "airport shuttle": ("airport transfer", "airport pickup"),
    "breakfast": ("morning buffet", "brunch included"),
    "massage": ("body massage", "rubdown", "back rub"),
    "foot massage": ("reflexology",),
    "facial": ("skin care treatment",),
    "sauna": ("steam room",),
    "gym": ("fitness center", "workout place", "weights room"),
    "personal trainer": ("pt coach", "fitness coach"),
    "car wash": ("auto wash", "car cleaning"),
    "oil change": ("engine oil service", "lube job"),
    "tire repair": ("flat tire fix", "puncture repair"),
    "haircut": ("hair cut", "trim"),
    "hair coloring": ("hair dye", "highlights"),
    "perm": ("curls",),
}
CHEAP_WORDS = ("cheap", "budget", "affordable")


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


S = TypeVar("S", bound=_HasId)


@dataclass(frozen=True)
class Service:
    id: str
    title: str
    category: str
    district: str
    price_level: int
    tags: tuple[str, ...]
    description: str
    theme: str | None = None  # a word in the title that the menu does not back (hard negatives)

    def row(self) -> dict[str, Any]:
        return {
            "service_id": self.id,
            "service_title": self.title,
            "service_category": self.category,
            "service_district": self.district,
            "service_price_level": self.price_level,
            "service_tags": list(self.tags),
            "service_description": self.description,
        }


@dataclass(frozen=True)
class Intent:
    """What the user wanted; hidden from the log, known to the oracle."""

    item: str
    district: str | None = None
    max_price: int | None = None
    text: str = ""


@dataclass(frozen=True)
class Judgement:
    grade: float  # 0 irrelevant .. 1 relevant
    reasoning: str


def grade_to_label(grade: float, labels: list[str]) -> str:
    """Map an oracle grade in [0, 1] onto `labels` (least relevant first) by equal-width bins."""
    n = len(labels)
    return labels[min(n - 1, int(grade * n))] if grade < 1 else labels[-1]


def judge(intent: Intent, s: Service) -> Judgement:
    """The oracle: grade a pair from the hidden intent and cite the decisive evidence."""
    ask = f"Query asks for {intent.item}"
    if intent.district:
        ask += f" in {intent.district}"
    if intent.max_price:
        ask += f" at {PRICE_SIGNS[intent.max_price]} or less"
    about = f"{s.title} is a {s.category} in {s.district} ({PRICE_SIGNS[s.price_level]})"
    offers = intent.item in s.tags
    same_kind = any(intent.item in CATALOG[c][1] for c in CATALOG if CATALOG[c][0] == CATALOG[s.category][0])
    if not offers:
        if s.theme and s.theme.lower() in intent.item.lower():
            why = f"the name mentions '{s.theme}' but it offers {', '.join(s.tags[:3])}, not {intent.item}; the overlap is misleading"
            return Judgement(0.0, f"{ask}. {about}. Although {why}.")
        if same_kind and intent.item not in s.tags:
            hits = _constraint_misses(intent, s)
            grade = 0.5 if not hits else 0.0
            why = f"it is the right kind of place but does not offer {intent.item}"
            if hits:
                why += f", and {' and '.join(hits)}"
            return Judgement(grade, f"{ask}. {about}. {why[0].upper() + why[1:]}.")
        return Judgement(0.0, f"{ask}. {about}. It does not offer {intent.item}; unrelated to the query.")
    misses = _constraint_misses(intent, s)
    if not misses:
        return Judgement(1.0, f"{ask}. {about}. It offers {intent.item} and meets every constraint.")
    grade = 0.5 if len(misses) == 1 else 0.0
    return Judgement(grade, f"{ask}. {about}. It offers {intent.item}, but {' and '.join(misses)}.")


def _constraint_misses(intent: Intent, s: Service) -> list[str]:
    misses = []
    if intent.district and s.district != intent.district:
        misses.append(f"it is in {s.district}, not {intent.district}")
    if intent.max_price and s.price_level > intent.max_price:
        misses.append(
            f"its price level {PRICE_SIGNS[s.price_level]} is over the budget {PRICE_SIGNS[intent.max_price]}"
        )
    return misses


_CLAIMS = {
    "offers": re.compile(r"\bIt offers (.+?)(?:, but| and meets|\.)"),
    "lacks": re.compile(r"does not offer (.+?)(?:, and|;|\.)"),
    "elsewhere": re.compile(r"it is in (.+?), not (.+?)(?:,| and |\.|$)"),
    "over budget": re.compile(r"its price level (\$+) is over the budget (\$+)"),
    "about": re.compile(r"\bis an? (.+?) in (.+?) \((\$+)\)"),
}


def refuted(reasoning: str, row: dict[str, Any]) -> list[tuple[str, str]]:
    """The claims of a chain in the oracle's phrasing (`judge`) that the pair's own service fields refute: "It
    offers X" when its tags do not hold X, "does not offer X" when they do, "it is in D, not Q" when it is not in D
    or Q is where it is (a miss that is none), a price "over the budget" that is not over it, "a C in D ($)" with
    another district or price. The oracle's chains have none (a test); a teacher's do when it misreads its prompt.
    A claim in other words is not checked: a count of what is refuted, not a proof of the rest. Each is (kind,
    what): the kind a key of `_CLAIMS`."""
    tags = set(row.get("service_tags") or [])
    district, price = row.get("service_district"), PRICE_SIGNS.get(int(row.get("service_price_level") or 0))
    found: list[tuple[str, str]] = []
    for m in _CLAIMS["offers"].finditer(reasoning):
        if m.group(1) not in tags:
            found.append(("offers", f"says it offers {m.group(1)}; its tags do not hold it"))
    for m in _CLAIMS["lacks"].finditer(reasoning):
        if m.group(1) in tags:
            found.append(("lacks", f"says it does not offer {m.group(1)}; it does"))
    for m in _CLAIMS["elsewhere"].finditer(reasoning):
        where, asked = m.group(1), m.group(2)
        if where != district or asked == district:
            found.append(("elsewhere", f"says it is in {where}, not {asked}; it is in {district}"))
    for m in _CLAIMS["over budget"].finditer(reasoning):
        level, budget = m.group(1), m.group(2)
        if level != price or len(level) <= len(budget):
            found.append(
                ("over budget", f"says its price level {level} is over the budget {budget}; its level is {price}")
            )
    for m in _CLAIMS["about"].finditer(reasoning):
        if m.group(2) != district or m.group(3) != price:
            found.append(("about", f"says it is in {m.group(2)} ({m.group(3)}); it is in {district} ({price})"))
    return found


def refuted_summary(rows: list[dict[str, Any]], reference: dict[str, str]) -> dict[str, Any]:
    """How many of `rows`' chains (annotated pairs with `reasoning`) make a claim their pair refutes (`refuted`),
    how often those and the rest agree with the `reference` label of the same pair_id, each kind of claim's
    count, and one refuted claim as an example."""
    hit: list[bool] = []
    right: list[bool] = []
    kinds: dict[str, int] = {}
    example = ""
    for r in rows:
        claims = refuted(r.get("reasoning") or "", r)
        hit.append(bool(claims))
        right.append(reference.get(r["pair_id"]) == r["label"])
        for kind, what in claims:
            kinds[kind] = kinds.get(kind, 0) + 1
            example = example or f"{r['reasoning'].strip()} ({what})"
    n = sum(hit)
    return {
        "chains": len(rows),
        "refuted": n,
        "share": round(n / max(1, len(rows)), 4),
        "agreement_refuted": round(sum(ok for ok, h in zip(right, hit, strict=True) if h) / max(1, n), 4),
        "agreement_rest": round(sum(ok for ok, h in zip(right, hit, strict=True) if not h) / max(1, len(rows) - n), 4),
        "claims": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "example": example,
    }


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 5:
        return word
    i = rng.randrange(1, len(word) - 2)
    op = rng.choice(("swap", "drop", "double"))
    if op == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if op == "drop":
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]


def make_services(n: int, rng: random.Random) -> list[Service]:
    services = []
    for i in range(n):
        category = rng.choice(list(CATALOG))
        kind, items = CATALOG[category]
        tags = tuple(rng.sample(items, k=rng.randint(2, min(4, len(items)))))
        theme = None
        title = f"{rng.choice(NAME_WORDS)} {rng.choice(NAME_SUFFIX[category])}"
        if category == "bar" and rng.random() < 0.35:  # themed bars: the classic misleading overlap
            theme = rng.choice(("Sushi", "Ramen", "Pizza", "Hotpot"))
            title = f"{rng.choice(NAME_WORDS)} {theme} Bar"
        district = rng.choice(DISTRICTS)
        price = rng.choices((1, 2, 3, 4), weights=(3, 4, 3, 1))[0]
        desc = f"{title} is a {PRICE_SIGNS[price]} {category} in {district} offering {', '.join(tags)}."
        if theme:
            desc += f" A {theme.lower()}-themed {kind} with {tags[0]}."
        services.append(Service(f"svc-{i:06d}", title, category, district, price, tags, desc, theme))
    return services


def make_intent(rng: random.Random, services: list[Service]) -> Intent:
    anchor = rng.choice(services)  # queries follow what exists on the platform
    item = rng.choice(anchor.tags)
    district = rng.choice((anchor.district, rng.choice(DISTRICTS))) if rng.random() < 0.5 else None
    max_price = rng.choice((1, 2, 3)) if rng.random() < 0.35 else None
    alts = SYNONYMS.get(item, ())
    words = rng.choice(alts) if alts and rng.random() < 0.6 else item
    parts = [words]
    if max_price:
        parts.insert(0, rng.choice(CHEAP_WORDS) if max_price == 1 else f"under {PRICE_SIGNS[max_price]}")
    if district:
        parts.append(rng.choice(("in", "near")) + " " + district)
    text = " ".join(parts)
    if rng.random() < 0.12:
        toks = text.split()
        j = rng.randrange(len(toks))
        toks[j] = _typo(toks[j], rng)
        text = " ".join(toks)
    return Intent(item=item, district=district, max_price=max_price, text=text.lower())


def candidates(intent: Intent, services: list[Service], k: int, rng: random.Random) -> list[Service]:
    """Services shown for a query: a mix of matches, near misses, misleading overlaps and noise."""
    offers = [s for s in services if intent.item in s.tags]
    themed = [s for s in services if s.theme and s.theme.lower() in intent.item.lower()]
    kind = CATALOG[next(c for c in CATALOG if intent.item in CATALOG[c][1])][0]
    same_kind = [s for s in services if CATALOG[s.category][0] == kind and intent.item not in s.tags]
    return draw([offers, offers, themed, same_kind, services], k, rng)


def draw(pools: list[list[S]], k: int, rng: random.Random) -> list[S]:
    """Up to `k` distinct items (by `id`), each from a pool picked at random among the non-empty ones (a pool
    listed twice is picked twice as often)."""
    chosen: dict[str, S] = {}
    for _ in range(k * 4):
        if len(chosen) >= k:
            break
        pool = rng.choice([p for p in pools if p])
        item = rng.choice(pool)
        chosen.setdefault(item.id, item)
    return list(chosen.values())


def pair_id(query: str, service_id: str) -> str:
    return hashlib.sha1(f"{query}\x00{service_id}".encode()).hexdigest()[:16]


def query_split(query: str, seed: int, sizes: Sequence[int]) -> int:
    """The split a query belongs to: a hash of the seed and the query into [0, 1), cut in proportion to the
    splits' `sizes`. A query is in one split only, and every split samples the same query distribution: held-out
    queries are a random share of the traffic, as in a real log, not the first ones drawn (which took the
    common head and left the log the tail)."""
    digest = hashlib.sha256(f"{seed}\x00{query}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    total, at = sum(sizes), 0.0
    for i, n in enumerate(sizes):
        at += n / total
        if u < at:
            return i
    return len(sizes) - 1


def split_tries(n: int, sizes: Sequence[int], k: int) -> int:
    """Queries to draw while filling split `k` of `sizes` with `n` rows: enough that the share of draws hashed
    to it (`query_split`) fills it, when the world has the queries."""
    return int(4 * n * sum(sizes) / max(1, sizes[k])) + 100


@dataclass
class SyntheticData:
    log: list[dict[str, Any]] = field(default_factory=list)  # unlabeled
    labeled: list[dict[str, Any]] = field(default_factory=list)  # the same pairs, oracle-labeled
    sft: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    corpus: list[dict[str, Any]] = field(default_factory=list)


def unlabeled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as the log holds them: without the oracle's label and reasoning."""
    return [{k: v for k, v in r.items() if k not in ("label", "reasoning")} for r in rows]


def generate(
    labels: list[str],
    services: int,
    queries: int,
    pairs_per_query: int,
    sft_size: int,
    eval_size: int,
    seed: int,
) -> SyntheticData:
    """A synthetic search log. Eval, SFT and log use disjoint queries, each split a random share of the same query
    distribution (`query_split`)."""
    rng = random.Random(seed)
    catalog = make_services(services, rng)
    out = SyntheticData()

    splits = (("eval", eval_size), ("sft", sft_size), ("labeled", queries * pairs_per_query))
    sizes = [n for _, n in splits]

    def pairs(split: int, tries: int) -> Iterator[dict[str, Any]]:
        for _ in range(tries):
            intent = make_intent(rng, catalog)
            if query_split(intent.text, seed, sizes) != split:
                continue
            for s in candidates(intent, catalog, pairs_per_query, rng):
                j = judge(intent, s)
                yield {
                    "pair_id": pair_id(intent.text, s.id),
                    "query": intent.text,
                    **s.row(),
                    "label": grade_to_label(j.grade, labels),
                    "reasoning": j.reasoning,
                }

    seen: set[str] = set()
    for k, (name, n) in enumerate(splits):
        rows = []
        for row in pairs(k, split_tries(n, sizes, k)):
            if row["pair_id"] in seen:
                continue
            seen.add(row["pair_id"])
            rows.append(row)
            if len(rows) >= n:
                break
        setattr(out, name, rows)
    out.log = unlabeled(out.labeled)
    out.corpus = [{"text": s.description} for s in catalog]
    for category, (kind, items) in CATALOG.items():
        out.corpus.append({"text": f"A {category} is a kind of {kind}. It may offer {', '.join(items)}."})
    for item, alts in SYNONYMS.items():
        out.corpus.append({"text": f"Searchers say {', '.join(alts)} when they mean {item}."})
    out.corpus += [{"text": f"search: {r['query']}"} for r in out.labeled[:: max(1, pairs_per_query)]]
    return out
