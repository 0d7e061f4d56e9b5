"""`RuleBasedLLM`: Eq. 6 scores and local phrases from lexicon rules, with no model and no data download.

It is the default LLM when none is configured and the fallback of every model-backed LLM
(:mod:`realign_pipeline.captioner.llm`). The rules, in order:

* **Nouns** of the prompt are words (or runs of up to four words, longest first) found in the noun lexicon:
  the Recognize Anything (RAM) tag list, the 80 COCO object names and a few shape words, minus the colour,
  size and verb-like words of that list (``NOT_NOUNS``). Plurals are matched by :func:`singular_forms`
  (``-s``, ``-es``, ``-ies``, ``-ves`` and a table of irregular plurals).
* A noun directly followed by another noun is a modifier (``"kitchen sink"``, ``"fire hydrant"``): it joins the
  phrase of the last noun (the head) and is not an object of its own.
* **Phrase** of an object = the head noun with the run of attribute words (colour, material, size, and
  ``light``/``dark``/``bright``) directly before it; articles and other words end the run. ``"a metallic blue
  sphere"`` gives ``"metallic blue sphere"``; ``"one green and two grey parrot"`` binds only ``grey``.
* A word that is both an attribute and a noun (``orange``, ``glass``, ``stone``) is an attribute when an
  attribute or a noun follows it, a noun otherwise (``"an orange cat"`` vs ``"an apple and an orange"``).
* **Scores** (Eq. 6): ``2`` when the tag names an object of the prompt (same singular form, or an exact
  synonym from ``SYNONYMS``: ``sofa``/``couch``); ``0.5`` by two context rules: the tag is a category of a
  prompt object (``HYPERNYMS``: ``animal`` for ``dog``; phrase = that object's phrase), or the tag is a part or
  a usual surrounding of a prompt object (``CONTEXT``: ``wheel`` or ``road`` for ``car``; no phrase, since the
  prompt does not describe it); ``0`` otherwise (no phrase).

Beyond the paper, :meth:`RuleBasedLLM.relations` finds the spatial relations a prompt states
(:func:`prompt_relations`): the relation words of ``RELATION_WORDS`` ("to the left of", "on top of",
"under", ...), with the nearest object named before them as the subject and the nearest one after them as the
object, each mapped to a phrase of the layout.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..layout import SCORE_CERTAIN, SCORE_MAY, SCORE_UNLIKELY
from .base import LLMResult, ObjectJudgement, RelationResult
from .relations import RELATIONS, Relation


def _words(text: str) -> frozenset[str]:
    """A word list written as one string."""
    return frozenset(text.split())


# The 80 COCO object category names (as listed by GenEval, djghosh13/geneval prompts/object_names.txt, MIT).
COCO_OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

#: Shapes, people and everyday nouns that the RAM list lacks (it folds e.g. "sofa" into "couch"). The
#: everyday part was written after reading which nouns the rules missed on ABC-6K (docs/captioner_llm.md).
EXTRA_NOUNS = _words(
    """cube sphere cylinder cone pyramid box ball triangle square circle star man woman boy girl child people
    person men women children baby lady guy kid sofa purse collar cupboard skirt rug desk spot piece bike
    carriage kitten puppy countertop controller comforter cellphone jersey outfit background ocean
    bowtie blouse sneaker shoe sock glove mitten beanie bandana overalls tights leggings stripe spots trim
    accent drape duvet quilt bedspread recliner armchair loveseat ottoman nightstand wardrobe cabinet drawer
    tile faucet cushion placemat platter mug teapot kettle jug pitcher saucer tablecloth napkin tray
    backsplash doorway awning banner billboard sign signpost lamppost streetlight hydrant scooter
    tricycle minivan sedan jeep pickup limo trolley tram wagon cart kayak canoe sailboat yacht ship
    frosting icing sprinkles pepperoni noodle noodles onion tomato cucumber zucchini olive lemon lime
    grape strawberry cherry peach pear plum melon watermelon pumpkin squash mushroom bean pea corn
    kitty pup doggy calf foal lamb duckling chick parrot pigeon seagull gull goose swan owl hawk eagle
    mane hoof paw tail fur feather wing beak snout trunk tusk horn ear eye nose mouth head face hand
    arm leg foot shoulder neck belly stomach chest"""
)

#: Adjectives of pattern or look that may stand between a colour and its noun ("black and white striped
#: shirt", "brown colored bathroom").
PATTERNS = _words(
    "striped stripped checkered checked spotted dotted plaid patterned colored coloured painted stuffed "
    "shiny fluffy furry grassy cloudy snowy leafy rusty stainless"
)

COLORS = _words(
    "red green blue yellow brown black white gray grey pink purple orange gold golden silver beige tan maroon "
    "navy teal turquoise violet lavender magenta cyan aqua khaki cream ivory bronze copper crimson scarlet "
    "blond blonde indigo olive"
)
MATERIALS = _words(
    "wooden wood metal metallic plastic glass stone leather ceramic paper steel brick concrete marble fabric "
    "rubber velvet wool woolen cotton silk denim porcelain granite iron golden tiled felt cardboard"
)
SIZES = _words("big small large tiny huge little giant tall short long massive miniature enormous")
TONES = _words("light dark bright pale")
ATTRIBUTES = COLORS | MATERIALS | SIZES | TONES | PATTERNS
#: Words that join two attributes of one noun: "red and white", "blue, black, and white".
CONNECTORS = frozenset({"and", "or", "&"})

#: Words of the RAM list that are verbs, adjectives, colours or meta words in captions, never objects here.
NOT_NOUNS = (
    _words(
        "sit sitting stand standing up riding ride walking walk back side out open set beautiful clear lush "
        "grassy snowy clean cut wet half hot narrow outdoor wear place catch plain wide graze grazing modern "
        "well image picture photo view thing electronic smile tight run spray traditional fall reading rural "
        "calm forward lay jump throw play print flat cool turn job fill read enter pass feed feeding lead show "
        "training approach lie area scene color style space night cloudy line number pattern structure event "
        "game design brand group couple herd flock collection row pair bunch top front stuff selfie take pose "
        "fly flying hang hanging lean leaning park parked look looking eat eating hold holding cover covered "
        "rest display empty full old new young sunny stack pile lots lot many several few other some"
    )
    | (COLORS - {"orange"})
    | SIZES
    | (TONES - {"light"})
    | PATTERNS
)

IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "people": "person", "children": "child", "mice": "mouse", "geese": "goose",
    "teeth": "tooth", "feet": "foot", "oxen": "ox", "knives": "knife", "leaves": "leaf", "wolves": "wolf",
    "shelves": "shelf", "loaves": "loaf", "halves": "half", "calves": "calf", "scarves": "scarf",
    "dice": "die", "cacti": "cactus", "buses": "bus", "glasses": "glasses", "skis": "skis",
}

#: Exact synonyms: a tag naming the same object as a prompt noun scores 2.
SYNONYMS = [
    {"couch", "sofa"}, {"tv", "television"}, {"bicycle", "bike"}, {"motorcycle", "motorbike"},
    {"airplane", "plane", "aeroplane", "airliner", "jet"}, {"cell phone", "mobile phone", "phone", "cellphone"},
    {"refrigerator", "fridge"}, {"donut", "doughnut"}, {"handbag", "purse"}, {"person", "human"},
    {"sports ball", "ball"}, {"dining table", "table"}, {"potted plant", "houseplant"},
]

#: A tag that is a category of a prompt object scores 0.5 ("may"), with that object's phrase.
HYPERNYMS = {
    "animal": "bird cat dog horse sheep cow elephant bear zebra giraffe parrot duck rabbit goat pig lion tiger "
              "puppy kitten calf lamb",
    "pet": "cat dog puppy kitten",
    "vehicle": "bicycle car motorcycle airplane bus train truck boat van taxi",
    "fruit": "banana apple orange lemon strawberry grape pear",
    "vegetable": "broccoli carrot tomato potato",
    "food": "banana apple sandwich orange broccoli carrot hot dog pizza donut cake",
    "furniture": "chair couch bed dining table table bench desk shelf",
    "person": "man woman boy girl child baby lady guy kid player skier surfer",
    "bag": "backpack handbag suitcase purse",
    "utensil": "fork knife spoon",
    "electronic": "tv laptop cell phone computer mouse computer keyboard tv remote",
    "toy": "teddy bear kite frisbee doll",
}

#: A tag that is a part or a usual surrounding of a prompt object scores 0.5 with no phrase.
CONTEXT = {
    "wheel": "bicycle car motorcycle bus train truck skateboard", "tire": "bicycle car motorcycle bus truck",
    "road": "car bus truck motorcycle bicycle", "street": "car bus truck motorcycle bicycle",
    "water": "boat surfboard duck", "sea": "boat surfboard", "grass": "horse sheep cow zebra giraffe",
    "field": "horse sheep cow", "sky": "airplane kite bird", "snow": "skis snowboard",
    "table": "cup bowl fork knife spoon laptop vase plate", "kitchen": "sink oven microwave refrigerator toaster",
    "bathroom": "toilet sink toothbrush", "bedroom": "bed", "screen": "laptop tv cell phone",
    "keyboard": "laptop", "leaf": "potted plant tree", "plate": "cake pizza sandwich donut",
}


def singular_forms(word: str) -> list[str]:
    """Candidate singular forms of `word` (itself first): irregular table, then ``-ies``/``-ves``/``-es``/``-s``."""
    word = word.lower()
    forms = [word]
    if word in IRREGULAR_PLURALS:
        forms.append(IRREGULAR_PLURALS[word])
    if len(word) > 3 and word.endswith("ies"):
        forms.append(word[:-3] + "y")
    if len(word) > 3 and word.endswith("ves"):
        forms += [word[:-3] + "f", word[:-3] + "fe"]
    if len(word) > 3 and word.endswith("es"):
        forms.append(word[:-2])
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        forms.append(word[:-1])
    return list(dict.fromkeys(forms))


def _lemma(name: str, lexicon: frozenset[str] | None = None) -> str:
    """Canonical form of a (multi-word) name: lower case, its last word singular (the first form in `lexicon`)."""
    words = name.lower().split()
    if not words:
        return ""
    head = words[-1]
    forms = singular_forms(head)
    chosen = forms[-1] if len(forms) > 1 else head
    if lexicon is not None:
        prefix = " ".join(words[:-1])
        for form in forms:
            if (f"{prefix} {form}" if prefix else form) in lexicon:
                chosen = form
                break
    return " ".join(words[:-1] + [chosen])


def _ram_tag_path() -> Path | None:
    """The RAM tag list: the package asset if present, else the development checkout's ``../shared/data``."""
    try:
        asset = resources.files("realign_pipeline").joinpath("assets/tags/ram_tag_list.txt")
        if asset.is_file():
            return Path(str(asset))
    except (ModuleNotFoundError, FileNotFoundError):  # pragma: no cover
        pass
    shared = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "tags" / "ram_tag_list.txt"
    return shared if shared.is_file() else None


@functools.lru_cache(maxsize=1)
def ram_tags() -> tuple[str, ...]:
    """The Recognize Anything tag vocabulary (lower case); empty, with a warning, when it is not found."""
    path = _ram_tag_path()
    if path is None:
        warnings.warn(
            "the RAM tag list (assets/tags/ram_tag_list.txt) was not found; the rule-based LLM uses only the COCO "
            "object names and its own small noun list.",
            stacklevel=2,
        )
        return ()
    return tuple(line.strip().lower() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@functools.lru_cache(maxsize=1)
def noun_lexicon() -> frozenset[str]:
    """Object nouns (singular, lower case, up to four words): RAM tags + COCO names + shapes, minus NOT_NOUNS."""
    names = set(ram_tags()) | {name.lower() for name in COCO_OBJECT_NAMES} | set(EXTRA_NOUNS)
    names = {name for name in names if re.fullmatch(r"[a-z][a-z0-9' -]*", name) and len(name.split()) <= 4}
    return frozenset(name for name in names if name not in NOT_NOUNS)


_WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")


@dataclass(frozen=True)
class PromptObject:
    """One object of a prompt: its phrase (words of the prompt), its head noun and their character spans."""

    phrase: str
    noun: str  # the noun words as written in the prompt
    lemma: str  # canonical singular form of the noun, as in the lexicon
    start: int
    end: int
    attributes: tuple[str, ...]  # attribute words of the phrase, lower case


def _match_noun(words: list[str], i: int, lexicon: frozenset[str]) -> tuple[int, str] | None:
    """Longest lexicon noun starting at word `i`: (number of words, lemma), or None."""
    for n in range(min(4, len(words) - i), 0, -1):
        prefix = " ".join(w.lower() for w in words[i : i + n - 1])
        for form in singular_forms(words[i + n - 1]):
            candidate = f"{prefix} {form}" if prefix else form
            if candidate in lexicon:
                return n, candidate
    return None


def prompt_objects_detailed(prompt: str) -> list[PromptObject]:
    """The objects of `prompt` in order, with phrases bound by the rules of this module's docstring."""
    lexicon = noun_lexicon()
    matches = list(_WORD.finditer(prompt))
    words = [m.group() for m in matches]
    lower = [w.lower() for w in words]
    nouns: dict[int, tuple[int, str]] = {}  # start word -> (length, lemma)
    i = 0
    while i < len(words):
        found = _match_noun(words, i, lexicon)
        if found is None:
            i += 1
            continue
        n, lemma = found
        nouns[i] = (n, lemma)
        i += n

    def is_attribute_here(k: int) -> bool:
        # An attribute word that is also a noun is an attribute only when an attribute or noun follows it.
        if lower[k] not in ATTRIBUTES:
            return False
        if k not in nouns:
            return True
        nxt = k + nouns[k][0]
        if nxt < len(words) and lower[nxt] in CONNECTORS:  # "orange and white cat"
            return nxt + 1 < len(words) and lower[nxt + 1] in ATTRIBUTES
        return nxt < len(words) and (lower[nxt] in ATTRIBUTES or nxt in nouns)

    # Resolve dual words: those acting as attributes are not nouns.
    for k in list(nouns):
        if nouns[k][0] == 1 and is_attribute_here(k):
            del nouns[k]

    objects: list[PromptObject] = []
    starts = sorted(nouns)
    skip: set[int] = set()
    for index, k in enumerate(starts):
        if k in skip:
            continue
        # Compound: consecutive nouns; the last one is the head, the earlier ones modify it.
        first, last = k, k
        j = index
        while j + 1 < len(starts) and starts[j + 1] == last + nouns[last][0] and _adjacent(prompt, matches, last +
                                                                                             nouns[last][0] - 1,
                                                                                             starts[j + 1]):
            j += 1
            last = starts[j]
            skip.add(last)
        end_word = last + nouns[last][0] - 1
        begin = first
        while True:
            b = begin - 1
            if b >= 0 and is_attribute_here(b) and _joined(prompt, matches, b, begin):
                begin = b
            elif (begin < first and b >= 1 and lower[b] in CONNECTORS and is_attribute_here(b - 1)
                  and _joined(prompt, matches, b - 1, b) and _joined(prompt, matches, b, begin)):
                begin = b - 1  # "red and white kitten": both colours belong to the kitten
            else:
                break
        start_char, end_char = matches[begin].start(), matches[end_word].end()
        objects.append(
            PromptObject(
                phrase=prompt[start_char:end_char],
                noun=prompt[matches[last].start() : end_char],
                lemma=nouns[last][1],
                start=start_char,
                end=end_char,
                attributes=tuple(lower[w] for w in range(begin, first)),
            )
        )
    return objects


def _adjacent(prompt: str, matches: list[re.Match[str]], a: int, b: int) -> bool:
    """Words `a` and `b` are separated by whitespace only (no comma, no 'and')."""
    return b == a + 1 and prompt[matches[a].end() : matches[b].start()].isspace()


def _joined(prompt: str, matches: list[re.Match[str]], a: int, b: int) -> bool:
    """Words `a` and `b` are neighbours separated by whitespace or one comma (a list of attributes)."""
    return b == a + 1 and prompt[matches[a].end() : matches[b].start()].strip() in ("", ",")


def prompt_objects(prompt: str) -> list[tuple[str, str]]:
    """``(phrase, noun)`` for each object of `prompt`, e.g. ``[("red book", "book"), ("yellow vase", "vase")]``.

    The captioner adds these nouns to the tagger's tags, so an object the tagger missed can still be grounded.
    """
    return [(obj.phrase, obj.noun) for obj in prompt_objects_detailed(prompt)]


def _groups(table: Iterable[set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for group in table:
        for name in group:
            out.setdefault(name, set()).update(group)
    return out


_SYNONYM_OF = _groups(SYNONYMS)


def _expand(spec: dict[str, str]) -> dict[str, set[str]]:
    """``{"animal": "dog cat"}`` -> ``{"animal": {"dog", "cat"}}``, keeping known two-word names together."""
    out: dict[str, set[str]] = {}
    multi = {n for n in COCO_OBJECT_NAMES if " " in n} | {"dining table", "potted plant"}
    for key, value in spec.items():
        names: set[str] = set()
        words = value.split()
        i = 0
        while i < len(words):
            pair = " ".join(words[i : i + 2])
            if pair in multi:
                names.add(pair)
                i += 2
            else:
                names.add(words[i])
                i += 1
        out[key] = names
    return out


_HYPERNYMS = _expand(HYPERNYMS)
_CONTEXT = _expand(CONTEXT)


# ------------------------------------------------------------------------------------------ relations
#: How prompts state the relations the correction knows (:data:`~realign_pipeline.captioner.relations.RELATIONS`).
#: Relations without an image axis ("next to", "in front of", "behind") are not listed: no box order tests them.
RELATION_WORDS: dict[str, str] = {
    "to the left of": "left of", "on the left of": "left of", "on the left side of": "left of",
    "to the left side of": "left of", "left of": "left of",
    "to the right of": "right of", "on the right of": "right of", "on the right side of": "right of",
    "to the right side of": "right of", "right of": "right of",
    "above": "above", "on top of": "above", "atop": "above",
    "below": "below", "under": "below", "underneath": "below", "beneath": "below",
}


def relation_name(words: str) -> str | None:
    """The relation that `words` state ("to the left of" -> "left of", "under" -> "below"), or None.

    Accepts the relation names themselves, any case and spacing, and ``_`` for spaces ("left_of").
    """
    key = " ".join(words.replace("_", " ").lower().split())
    if key in RELATIONS:
        return key
    return RELATION_WORDS.get(key)


_RELATION_PATTERN = re.compile(
    r"(?<![\w-])(?:"
    + "|".join(r"\s+".join(map(re.escape, w.split())) for w in sorted(RELATION_WORDS, key=len, reverse=True))
    + r")(?![\w-])",
    re.IGNORECASE,
)


def _occurrences(prompt: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans of `phrase` in `prompt`: case-insensitive, whole words, any whitespace between words."""
    words = phrase.split()
    if not words:
        return []
    pattern = r"(?<![\w-])" + r"\s+".join(re.escape(w) for w in words) + r"(?![\w-])"
    return [(m.start(), m.end()) for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


@dataclass(frozen=True)
class _Mention:
    start: int
    end: int
    phrase: str
    in_layout: bool


def prompt_relations(prompt: str, phrases: list[str]) -> tuple[list[Relation], list[dict[str, Any]]]:
    """The relations `prompt` states between two of `phrases`, and those it states about other objects.

    Each relation word of ``RELATION_WORDS`` takes as its subject the nearest object named before it and as its
    object the nearest one named after it. Objects are the `phrases` where they occur in the prompt, and the
    prompt's other objects (:func:`prompt_objects_detailed`) where no phrase covers them, so that "a cat under a
    table" with only "cat" in the layout is reported as unresolved (``{"words", "subject", "object",
    "reason"}``) instead of binding "under" to an unrelated phrase. Repeated relations are kept once.
    """
    relation_spans = [(m.start(), m.end(), m.group()) for m in _RELATION_PATTERN.finditer(prompt)]

    def free(start: int, end: int) -> bool:
        return not any(start < r_end and r_start < end for r_start, r_end, _ in relation_spans)

    mentions = [
        _Mention(start, end, phrase, True)
        for phrase in dict.fromkeys(p for p in phrases if p and p.strip())
        for start, end in _occurrences(prompt, phrase)
        if free(start, end)
    ]
    for obj in prompt_objects_detailed(prompt):
        covered = any(obj.start < m.end and m.start < obj.end for m in mentions)
        if not covered and free(obj.start, obj.end):
            mentions.append(_Mention(obj.start, obj.end, obj.phrase, False))

    relations: list[Relation] = []
    unresolved: list[dict[str, Any]] = []
    for r_start, r_end, written in relation_spans:
        words = " ".join(written.split())
        before = [m for m in mentions if m.end <= r_start]
        after = [m for m in mentions if m.start >= r_end]
        # Nearest first; on a tie a phrase of the layout, then the longer mention.
        subject = max(before, key=lambda m: (m.end, m.in_layout, -m.start), default=None)
        obj = min(after, key=lambda m: (m.start, not m.in_layout, -m.end), default=None)
        entry = {"words": words, "subject": subject.phrase if subject else None,
                 "object": obj.phrase if obj else None}
        if subject is None or obj is None:
            side = "before" if subject is None else "after"
            unresolved.append(entry | {"reason": f"no object is named {side} {words!r}"})
        elif not (subject.in_layout and obj.in_layout):
            missing = [m.phrase for m in (subject, obj) if not m.in_layout]
            unresolved.append(entry | {"reason": f"{' and '.join(map(repr, missing))} "
                                                 f"{'is' if len(missing) == 1 else 'are'} not a phrase of the layout"})
        elif subject.phrase.lower() == obj.phrase.lower():
            unresolved.append(entry | {"reason": "both sides are the same phrase"})
        else:
            relation = Relation(subject.phrase, relation_name(words), obj.phrase, words)
            if all((r.subject, r.relation, r.object) != (relation.subject, relation.relation, relation.object)
                   for r in relations):
                relations.append(relation)
    return relations, unresolved


class RuleBasedLLM:
    """Eq. 6 scores and local phrases from lexicon rules (see the module docstring); no model, no download.

    ``judge(prompt, tags)`` returns one :class:`ObjectJudgement` per tag, in the order given, with
    ``source = {"backend": "rule", "model": None, "fallback": False, "reason": None, "raw": None,
    "attempts": 0}``.
    """

    backend = "rule"

    def __init__(self, context_score: float = SCORE_MAY):
        self.context_score = float(context_score)

    def judge(self, prompt: str, tags: list[str]) -> LLMResult:
        return LLMResult(
            objects=self.judge_objects(prompt, tags),
            source={"backend": self.backend, "model": None, "fallback": False, "reason": None, "raw": None,
                    "attempts": 0},
        )

    def relations(self, prompt: str, phrases: list[str]) -> RelationResult:
        """The relations `prompt` states between two of `phrases` (:func:`prompt_relations`)."""
        found, unresolved = prompt_relations(prompt, phrases)
        return RelationResult(
            relations=found,
            source={"backend": self.backend, "model": None, "fallback": False, "reason": None, "raw": None,
                    "attempts": 0},
            unresolved=unresolved,
        )

    def judge_objects(self, prompt: str, tags: list[str]) -> list[ObjectJudgement]:
        lexicon = noun_lexicon()
        objects = prompt_objects_detailed(prompt)
        by_lemma: dict[str, list[PromptObject]] = {}
        for obj in objects:
            # An object answers to its whole lemma ("kitchen sink") and to its last word ("sink").
            for key in dict.fromkeys([obj.lemma, obj.lemma.split()[-1]]):
                by_lemma.setdefault(key, []).append(obj)
        used: dict[str, int] = {}
        judgements = []
        for tag in tags:
            lemma = _lemma(tag, lexicon | frozenset(by_lemma))
            names = {lemma} | _SYNONYM_OF.get(lemma, set())
            certain = [obj for name in names for obj in by_lemma.get(name, [])]
            if certain:
                # Repeated tags (or two objects with one noun) take the occurrences in prompt order.
                k = used.get(lemma, 0)
                obj = certain[min(k, len(certain) - 1)]
                used[lemma] = k + 1
                judgements.append(ObjectJudgement(tag, SCORE_CERTAIN, obj.phrase))
                continue
            hyponyms = _HYPERNYMS.get(lemma, set())
            category = [obj for obj in objects if obj.lemma in hyponyms or obj.lemma.split()[-1] in hyponyms]
            if category:
                judgements.append(ObjectJudgement(tag, self.context_score, category[0].phrase))
                continue
            around = _CONTEXT.get(lemma, set())
            if any(obj.lemma in around or obj.lemma.split()[-1] in around for obj in objects):
                judgements.append(ObjectJudgement(tag, self.context_score, None))
                continue
            judgements.append(ObjectJudgement(tag, SCORE_UNLIKELY, None))
        return judgements

    def to_config(self) -> dict[str, Any]:
        return {"backend": self.backend, "context_score": self.context_score}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RuleBasedLLM:
        return cls(context_score=float(config.get("context_score", SCORE_MAY)))


# ------------------------------------------------------------------------------------- colour coverage
def color_binding(prompt: str) -> list[tuple[str, str | None]]:
    """For each colour word of `prompt` (in order), the noun its phrase binds it to, or None if unbound."""
    bound: dict[int, str] = {}
    for obj in prompt_objects_detailed(prompt):
        for match in _WORD.finditer(prompt, obj.start, obj.end):
            bound[match.start()] = obj.noun
    out = []
    for match in _WORD.finditer(prompt):
        word = match.group().lower()
        if word in COLORS:
            out.append((match.group(), bound.get(match.start())))
    return out


def color_coverage(prompts: Iterable[str]) -> dict[str, float | int]:
    """Share of colour words (``COLORS``) that the rules bind to a noun: they lie in an object's phrase.

    Every occurrence of a colour word counts once in the denominator, including colours used as nouns
    ("dressed in white") or separated from their noun ("one green and two grey parrot"); whether the noun
    is the right one is checked by reading (docs/captioner_llm.md).
    """
    total = bound = prompts_n = all_bound = 0
    for prompt in prompts:
        pairs = color_binding(prompt)
        prompts_n += 1
        total += len(pairs)
        hit = sum(noun is not None for _, noun in pairs)
        bound += hit
        all_bound += int(hit == len(pairs))
    return {"prompts": prompts_n, "color_words": total, "bound": bound,
            "coverage": bound / total if total else float("nan"),
            "prompts_all_bound": all_bound / prompts_n if prompts_n else float("nan")}


def bundled_prompts(name: str) -> list[str]:
    """Non-empty lines of a bundled prompt file (``"CC-500.txt"``, ``"ABC-6K.txt"``) from assets/prompts."""
    text = resources.files("realign_pipeline").joinpath(f"assets/prompts/{name}").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


if __name__ == "__main__":  # python -m realign_pipeline.captioner.llm_rules
    import json as _json

    print("ABC-6K", _json.dumps(color_coverage(bundled_prompts("ABC-6K.txt"))))
    print("CC-500 1-446", _json.dumps(color_coverage(bundled_prompts("CC-500.txt")[:446])))
