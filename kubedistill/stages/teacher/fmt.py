"""The teacher's prompt and response format, shared by SFT, the reward model, DPO and annotation.

Prompt (what the teacher sees; built from the log's columns):

    Query: <query>
    Service: <title> | <category> | <district> | <$..$$$$> | offers <tag>, <tag> | <description>
    Judge relevance.

(To explain a known label, `rationale_prompt` adds a line `Label to explain: <label>` before the
instruction.)

Response (what it writes; one line each, in this order, then end of text):

    Reasoning: <one or more sentences, no newline>
    Label: <one of spec.labels>

`parse_response` accepts exactly that (surrounding whitespace and trailing text after the label
line ignored) and says why anything else is rejected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kubedistill.stages.data import service_text

INSTRUCTION = "Judge relevance."
_RESPONSE = re.compile(
    r"^\s*Reasoning:[ \t]*(?P<reasoning>[^\n]*?)[ \t]*\n[ \t]*Label:[ \t]*(?P<label>[^\n]*?)[ \t]*(\n|$)"
)


def prompt(row: dict[str, Any]) -> str:
    return f"Query: {row['query']}\nService: {service_text(row)}\n{INSTRUCTION}\n"


def rationale_prompt(row: dict[str, Any], label: str) -> str:
    """The prompt that asks for the reasoning behind a known label (`spec.annotation.mode: rationalize`): the
    pair, the label to explain, then the usual instruction, so the answer keeps the response format and its
    own label can be checked against the given one."""
    return f"Query: {row['query']}\nService: {service_text(row)}\nLabel to explain: {label}\n{INSTRUCTION}\n"


def response(reasoning: str, label: str) -> str:
    return f"Reasoning: {' '.join(reasoning.split())}\nLabel: {label}"


class ParseError(ValueError):
    pass


@dataclass(frozen=True)
class Parsed:
    reasoning: str
    label: str


def parse_response(text: str, labels: list[str]) -> Parsed:
    """The reasoning and label of a response; ParseError saying what is wrong otherwise."""
    m = _RESPONSE.match(text)
    if not m:
        if "Label:" not in text:
            raise ParseError("no 'Label:' line")
        raise ParseError("expected 'Reasoning: ...' then 'Label: ...' on the next line")
    reasoning, label = m.group("reasoning").strip(), m.group("label").strip()
    if not reasoning:
        raise ParseError("empty reasoning")
    if label not in labels:
        raise ParseError(f"label {label!r} is not one of {labels}")
    return Parsed(reasoning, label)


def try_parse(text: str, labels: list[str]) -> Parsed | None:
    try:
        return parse_response(text, labels)
    except ParseError:
        return None


def gives(text: str, label: str, labels: list[str]) -> bool:
    """Whether the response parses and gives `label` (an unparsable one gives none)."""
    parsed = try_parse(text, labels)
    return parsed is not None and parsed.label == label


def label_shares(answers: list[str], labels: list[str]) -> list[float] | None:
    """How a teacher's sampled answers to one prompt split over `labels` (shares of the answers that parse):
    a label distribution that keeps the teacher's uncertainty, as self-consistency votes (Wang et al., 2022,
    "Self-Consistency Improves Chain of Thought Reasoning in Language Models"); None when no answer parses."""
    parsed = [p.label for p in (try_parse(a, labels) for a in answers) if p is not None]
    return [parsed.count(label) / len(parsed) for label in labels] if parsed else None
