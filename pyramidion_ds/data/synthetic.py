"""A synthetic long-document summarization corpus with a known right answer.

Each document is a few thousand words of *filler* sentences (plausible, repetitive office prose) with
a handful of *salient* sentences planted at random places. Salient sentences draw their content words
from vocabularies the filler never uses (agents, cargo, cities, weekdays, numbers), so a model can
tell them apart by content alone. The reference summary is exactly the salient sentences, in document
order. This is the task on which trainable pooling must learn to keep the right tokens: the character
spans of the planted sentences are stored with each example (``salient_spans``) so selection can be
scored against them.

Everything is a pure function of ``(seed, index)``: example ``i`` is the same whatever the corpus size.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

# --- filler vocabulary ------------------------------------------------------------------------------
_SUBJECTS = [
    "the committee",
    "the board",
    "our team",
    "the department",
    "the auditor",
    "the panel",
    "the manager",
    "the council",
    "the office",
    "each group",
    "the staff",
    "the assistant",
    "the reviewer",
    "the secretary",
    "every member",
    "the working group",
    "the director",
    "the planning unit",
    "the support desk",
    "the finance team",
]
_VERBS = [
    "reviewed",
    "discussed",
    "postponed",
    "approved",
    "summarised",
    "questioned",
    "circulated",
    "revised",
    "archived",
    "noted",
    "examined",
    "rescheduled",
    "presented",
    "drafted",
    "updated",
    "compared",
    "confirmed",
    "outlined",
    "collected",
    "shared",
]
_OBJECTS = [
    "the quarterly report",
    "the draft agenda",
    "the budget figures",
    "the meeting notes",
    "the annual plan",
    "the staffing memo",
    "the travel policy",
    "the supply list",
    "the safety checklist",
    "the training schedule",
    "the room bookings",
    "the survey results",
    "the maintenance log",
    "the printing costs",
    "the visitor guidelines",
    "the filing system",
    "the holiday calendar",
    "the minutes",
    "the progress summary",
    "the contract terms",
]
_TAILS = [
    "before the weekly meeting",
    "after a short break",
    "in the main hall",
    "without any changes",
    "with minor corrections",
    "for the second time",
    "at the request of the chair",
    "during the morning session",
    "as agreed last month",
    "in some detail",
    "once again",
    "with little debate",
    "ahead of the deadline",
    "by general agreement",
    "in the usual way",
    "for the record",
    "at the end of the day",
    "following the earlier discussion",
]

# --- salient vocabulary (disjoint from the filler) --------------------------------------------------
_AGENTS = [
    "agent lorenzo",
    "agent marisol",
    "agent okafor",
    "agent petrova",
    "agent nakamura",
    "agent haddad",
    "agent kowalski",
    "agent fitzgerald",
    "agent oyelaran",
    "agent lindqvist",
    "agent castellanos",
    "agent vasquez",
    "agent brennan",
    "agent takahashi",
    "agent moreau",
    "agent abernathy",
]
_CARGO = [
    "sapphire crates",
    "copper turbines",
    "saffron barrels",
    "titanium valves",
    "cobalt drums",
    "amber lanterns",
    "marble statues",
    "quartz lenses",
    "velvet bales",
    "ivory chess sets",
    "bronze bells",
    "jade figurines",
    "tungsten rods",
    "opal brooches",
    "silk carpets",
    "platinum coils",
]
_CITIES = [
    "lisbon",
    "nairobi",
    "osaka",
    "reykjavik",
    "montevideo",
    "tbilisi",
    "marrakesh",
    "helsinki",
    "valparaiso",
    "hanoi",
    "edinburgh",
    "cartagena",
    "zanzibar",
    "krakow",
    "adelaide",
    "quebec",
]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


@dataclass(frozen=True)
class SyntheticExample:
    id: str
    document: str
    summary: str
    #: character [start, end) of each planted sentence inside ``document``, in document order
    salient_spans: tuple[tuple[int, int], ...]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "document": self.document,
            "summary": self.summary,
            "salient_spans": [list(span) for span in self.salient_spans],
        }


def _filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)} ."


def _salient_sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(_AGENTS)} moved {rng.randint(2, 99)} {rng.choice(_CARGO)} to "
        f"{rng.choice(_CITIES)} on {rng.choice(_DAYS)} ."
    )


def make_example(
    index: int,
    *,
    seed: int = 0,
    min_words: int = 1500,
    max_words: int = 2500,
    num_salient: tuple[int, int] = (3, 5),
    split: str = "train",
) -> SyntheticExample:
    """Example ``index`` of the corpus for ``seed``: a document of about ``min_words``..``max_words``
    words with ``num_salient`` (inclusive range) planted sentences; its summary is those sentences."""
    if not 0 < min_words <= max_words:
        raise ValueError(f"min_words/max_words: got {min_words}/{max_words}, expected 0 < min <= max")
    lo, hi = num_salient
    if not 1 <= lo <= hi:
        raise ValueError(f"num_salient: got {num_salient}, expected 1 <= low <= high")
    rng = random.Random(f"pyramidion-synthetic/{seed}/{split}/{index}")
    target_words = rng.randint(min_words, max_words)
    sentences: list[str] = []
    words = 0
    while words < target_words:
        sentence = _filler_sentence(rng)
        sentences.append(sentence)
        words += sentence.count(" ") + 1
    planted = [_salient_sentence(rng) for _ in range(rng.randint(lo, hi))]
    slots = sorted(rng.sample(range(len(sentences) + 1), len(planted)))
    for offset, (slot, sentence) in enumerate(zip(slots, planted, strict=True)):
        sentences.insert(slot + offset, sentence)
    salient_positions = {slot + offset for offset, slot in enumerate(slots)}

    parts, spans, cursor = [], [], 0
    for i, sentence in enumerate(sentences):
        if i in salient_positions:
            spans.append((cursor, cursor + len(sentence)))
        parts.append(sentence)
        cursor += len(sentence) + 1  # joined by single spaces
    document = " ".join(parts)
    summary = " ".join(document[s:e] for s, e in spans)
    return SyntheticExample(
        id=f"synthetic-{split}-{index:06d}", document=document, summary=summary, salient_spans=tuple(spans)
    )


def make_corpus(num_docs: int, **kwargs) -> list[SyntheticExample]:
    return [make_example(i, **kwargs) for i in range(num_docs)]


DEFAULT_SPLITS = {"train": 1000, "valid": 50, "test": 50}


def write_corpus(
    out_dir: str | os.PathLike,
    splits: dict[str, int] | None = None,
    *,
    seed: int = 0,
    min_words: int = 1500,
    max_words: int = 2500,
    num_salient: tuple[int, int] = (3, 5),
    progress: bool = False,
) -> dict[str, Path]:
    """Write ``<out_dir>/<split>.jsonl`` for each split; each file appears complete or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in (splits or DEFAULT_SPLITS).items():
        path = out / f"{split}.jsonl"
        tmp = out / f".{split}.jsonl.tmp"
        indexes = range(count)
        if progress:
            from tqdm import tqdm

            indexes = tqdm(indexes, desc=f"synthetic {split}", unit="doc")
        with open(tmp, "w", encoding="utf-8") as fh:
            for i in indexes:
                example = make_example(
                    i, seed=seed, min_words=min_words, max_words=max_words, num_salient=num_salient, split=split
                )
                fh.write(json.dumps(example.to_json()) + "\n")
        tmp.replace(path)
        written[split] = path
    return written
