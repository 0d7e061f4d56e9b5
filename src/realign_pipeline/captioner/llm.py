"""The LLM step of the dense captioner (Sec. 3.2.2, Eq. 6 and Table 4 of the paper): scores and local phrases.

Backends, all with ``judge(prompt, tags) -> LLMResult``:

* :class:`~realign_pipeline.captioner.llm_rules.RuleBasedLLM` (``"rule"``): lexicon rules, no model. The
  default when no LLM is configured, and the fallback of the two below.
* :class:`OpenAIChat` (``"openai"``): any OpenAI-compatible chat completions server through the ``openai``
  client (OpenAI, vLLM, Ollama, a local server).
* :class:`TransformersChat` (``"local"``): a local chat model through transformers.

The paper names a wrong LLM answer as its main limitation, so every answer goes through
:func:`validate_answer`. An invalid answer is asked again (``max_reasks`` times, telling the model what was
wrong); network errors, timeouts, HTTP 429 and 5xx, and replies that are not a chat completion (an HTML page
from a proxy, no ``choices``, ``content: null``) are retried ``max_retries`` times with exponential backoff;
after that, or on any other error, the result is the rule-based one and ``source`` says why::

    {"backend": "openai", "model": "gpt-4o", "fallback": True, "reason": "...", "raw": <last answer or None>,
     "attempts": <number of requests made>}

Beyond the paper, the chat backends also answer ``relations(prompt, phrases) -> RelationResult``: the spatial
relations the prompt states between two of the layout's phrases (:data:`RELATIONS_INSTRUCTION`, checked by
:func:`validate_relations`, with the same retries, re-asks, cache, fallback and ``source``), for the captioner's
relation correction (after SLD; :mod:`realign_pipeline.captioner.relations`).

Valid answers are cached in memory and, with ``cache_dir``, on disk (one JSON file per request, named by a hash
of the model, the prompt, the tags and the instruction version), so re-running a prompt set costs nothing.
API keys are never logged, never put in ``source``, in cache files or in ``to_config()``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..layout import SCORE_CERTAIN, SCORE_UNLIKELY
from .base import LLMResult, ObjectJudgement, RelationResult
from .llm_rules import RuleBasedLLM, prompt_objects, relation_name
from .relations import RELATION_AXES, RELATIONS, Relation

logger = logging.getLogger(__name__)

__all__ = [
    "INSTRUCTION",
    "RELATIONS_INSTRUCTION",
    "LLMAnswerError",
    "OpenAIChat",
    "RuleBasedLLM",
    "TransformersChat",
    "build_messages",
    "build_relation_messages",
    "llm_from_config",
    "make_llm",
    "prompt_objects",
    "validate_answer",
    "validate_relations",
]

#: Bump when the instruction changes: it is part of the cache key, so old cached answers are not reused.
INSTRUCTION_VERSION = 1

SYSTEM_MESSAGE = (
    "You help a text-to-image system check its pictures against their text prompts. "
    "You answer with one JSON object and nothing else."
)

#: The two instructions of the paper's Table 4 (likelihood per tag, local phrase per object), reworded, with
#: a JSON answer format. ``{prompt}`` and ``{tags}`` are filled in by :func:`build_messages`.
INSTRUCTION = """\
Text prompt: {prompt}
Tags found in the picture: {tags}

Task 1 (likelihood). For each tag, judge how likely it is that the object the tag names is described by the
text prompt, that is, that a picture drawn from the prompt shows it. Score 2 if it is certain (the prompt names
that object, also in the plural or with a synonym), 0.5 if it may be there (it is a kind, a part or a usual
surrounding of something the prompt names), 0 if it is unlikely.

Task 2 (local phrase). For each tag with a score above 0, copy from the prompt the words that describe that
object, together with its attributes such as colour, material or size, but without "a", "an" or "the".
Copy contiguous words exactly as they are written in the prompt; do not add, change or reorder words.
Example: for the prompt "a red book and a yellow vase" the phrase of the tag "book" is "red book".
If the prompt has no words for the object, the phrase is null.

Answer with this JSON and nothing else, one entry per tag, in the order of the tags:
{{"objects": [{{"tag": "<a tag from the list>", "score": <2, 0.5 or 0>, "phrase": "<words of the prompt>" or null}}]}}
"""

REASK_MESSAGE = (
    "Your answer could not be used: {error}. Answer again with only the JSON object described above, "
    "one entry per tag, phrases copied exactly from the prompt."
)

MIN_SCORE, MAX_SCORE = SCORE_UNLIKELY, SCORE_CERTAIN


class LLMAnswerError(ValueError):
    """An LLM answer that cannot be used; the message says what was wrong."""


def build_messages(prompt: str, tags: list[str]) -> list[dict[str, str]]:
    """The chat messages that ask for the Table 4 judgement of `tags` against `prompt`."""
    user = INSTRUCTION.format(prompt=json.dumps(prompt, ensure_ascii=False), tags=json.dumps(tags, ensure_ascii=False))
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------------------------------- validation
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)


def _extract_json(raw: str) -> Any:
    """The first JSON object (or array) in `raw`: inside a code fence, the whole text, or embedded in prose."""
    candidates = [m.group(1) for m in _FENCE.finditer(raw)] + [raw]
    decoder = json.JSONDecoder()
    first_error: json.JSONDecodeError | None = None
    for text in candidates:
        text = text.strip()
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            first_error = first_error or error
        for match in re.finditer(r"[{\[]", text):
            try:
                value, _ = decoder.raw_decode(text, match.start())
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
                return value
    raise LLMAnswerError(f"not valid JSON ({first_error.msg} at line {first_error.lineno} column {first_error.colno})"
                         if first_error else "not valid JSON")


def _find_phrase(prompt: str, phrase: str) -> str | None:
    """The phrase as written in `prompt` (case-insensitive, whole words, any whitespace), or None."""
    words = phrase.split()
    if not words:
        return None
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    match = re.search(pattern, prompt, flags=re.IGNORECASE)
    return match.group() if match else None


def _score(value: Any, tag: str) -> float:
    if isinstance(value, bool):
        raise LLMAnswerError(f"score of tag {tag!r} is not a number: {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise LLMAnswerError(f"score of tag {tag!r} is not a number: {value!r}") from None
    if not isinstance(value, (int, float)):
        raise LLMAnswerError(f"score of tag {tag!r} is not a number: {value!r}")
    value = float(value)
    if not math.isfinite(value) or not MIN_SCORE <= value <= MAX_SCORE:
        raise LLMAnswerError(f"score out of range for tag {tag!r}: {value!r} (expected 2, 0.5 or 0)")
    return value


def validate_answer(raw: str | None, prompt: str, tags: list[str]) -> list[ObjectJudgement]:
    """Parse and check an LLM answer; one :class:`ObjectJudgement` per tag of `tags`, in that order.

    Accepted: the JSON object ``{"objects": [{"tag", "score", "phrase"}, ...]}`` alone, in a code fence or
    inside prose (a bare list of entries is accepted too). Checks, each failing with :class:`LLMAnswerError`:

    * the answer is not empty and contains JSON, with the key ``"objects"`` holding a list of objects;
    * every entry has ``"tag"`` and ``"score"`` (``"phrase"`` may be missing or null: no phrase);
    * every tag is one of `tags` (case-insensitive), none twice, and every tag of `tags` is answered;
    * the score is a number (or numeric string) in [0, 2]. Eq. 6 asks for 2, 0.5 or 0, but a value between
      (e.g. 1) is kept as is: the modulation of Eq. 8 is linear in the score, so it is meaningful;
    * a phrase occurs in `prompt` (case-insensitive, whole words, any whitespace); the returned phrase is the
      prompt's own spelling of it. An empty phrase counts as no phrase.
    """
    if raw is None or not str(raw).strip():
        raise LLMAnswerError("empty answer")
    data = _extract_json(str(raw))
    if isinstance(data, dict):
        if "objects" not in data:
            raise LLMAnswerError(f"missing key 'objects' (got keys {sorted(data)})")
        entries = data["objects"]
    else:
        entries = data
    if not isinstance(entries, list):
        raise LLMAnswerError(f"'objects' must be a list, got {type(entries).__name__}")
    asked = {tag.strip().lower(): tag for tag in tags}
    found: dict[str, ObjectJudgement] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise LLMAnswerError(f"entry {index} of 'objects' is not a JSON object: {entry!r}")
        for key in ("tag", "score"):
            if key not in entry:
                raise LLMAnswerError(f"missing key {key!r} in entry {index} of 'objects'")
        if not isinstance(entry["tag"], str):
            raise LLMAnswerError(f"tag of entry {index} is not a string: {entry['tag']!r}")
        key = entry["tag"].strip().lower()
        if key not in asked:
            raise LLMAnswerError(f"tag {entry['tag']!r} was not asked for (tags: {list(tags)})")
        if key in found:
            raise LLMAnswerError(f"tag {entry['tag']!r} is answered twice")
        tag = asked[key]
        score = _score(entry["score"], tag)
        phrase = entry.get("phrase")
        if phrase is not None and not isinstance(phrase, str):
            raise LLMAnswerError(f"phrase of tag {tag!r} is not a string: {phrase!r}")
        if phrase is not None and phrase.strip():
            in_prompt = _find_phrase(prompt, phrase)
            if in_prompt is None:
                raise LLMAnswerError(f"phrase {phrase!r} of tag {tag!r} is not in the prompt")
            phrase = in_prompt
        else:
            phrase = None
        found[key] = ObjectJudgement(tag, score, phrase)
    missing = [tag for key, tag in asked.items() if key not in found]
    if missing:
        raise LLMAnswerError(f"no answer for tag(s) {missing}")
    return [found[key] for key in asked]


# ------------------------------------------------------------------------------------------ relations
#: Bump when the relations instruction changes (part of its cache key).
RELATIONS_INSTRUCTION_VERSION = 1

#: Which spatial relations the prompt states between the layout's objects (beyond the paper, after SLD).
#: Only the phrases are given, not the boxes: the question is what the prompt says, and the geometry (does the
#: layout violate it, how to move the regions) is computed, not asked. ``{prompt}`` and ``{phrases}`` are
#: filled in by :func:`build_relation_messages`.
RELATIONS_INSTRUCTION = """\
Text prompt: {prompt}
Objects found in the picture, each named by the words of the prompt that describe it: {phrases}

Task (spatial relations). List every spatial relation that the text prompt states between two of these
objects: one object is to the left of, to the right of, above or below the other. "On top of" counts as
above; "under", "beneath" and "underneath" count as below. List only relations the prompt states in words;
do not describe the picture and do not guess. Relations such as "next to", "near", "in front of" or "behind"
are not listed. Name each object exactly as it is written in the list of objects.
Example: for the prompt "a red book to the left of a yellow vase" and the objects ["red book", "yellow vase"]
the answer is {{"relations": [{{"subject": "red book", "relation": "left of", "object": "yellow vase"}}]}}.
If the prompt states no such relation between the listed objects, answer {{"relations": []}}.

Answer with this JSON and nothing else:
{{"relations": [{{"subject": "<an object from the list>", "relation": "left of" or "right of" or "above" or "below", "object": "<another object from the list>"}}]}}
"""

RELATIONS_REASK_MESSAGE = (
    "Your answer could not be used: {error}. Answer again with only the JSON object described above, "
    "naming objects exactly as in the list."
)


def build_relation_messages(prompt: str, phrases: list[str]) -> list[dict[str, str]]:
    """The chat messages that ask which spatial relations `prompt` states between two of `phrases`."""
    user = RELATIONS_INSTRUCTION.format(prompt=json.dumps(prompt, ensure_ascii=False),
                                        phrases=json.dumps(phrases, ensure_ascii=False))
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user}]


def validate_relations(raw: str | None, phrases: list[str]) -> list[Relation]:
    """Parse and check a relations answer: the :class:`Relation` s it states, in order, duplicates once.

    Accepted: ``{"relations": [{"subject", "relation", "object"}, ...]}`` alone, in a code fence or inside prose
    (a bare list of entries too; an empty list means no relation). Checks, each failing with
    :class:`LLMAnswerError`: JSON with a ``"relations"`` list of objects; each entry has the three keys as
    strings; ``subject`` and ``object`` are phrases of `phrases` (case-insensitive, any spacing; the returned
    phrase is the list's spelling) and differ; ``relation`` is "left of", "right of", "above" or "below" (or a
    wording of them the rules know: "to the left of", "on top of", "under", "left_of"); no two relations put the
    same pair in opposite orders on one axis.
    """
    if raw is None or not str(raw).strip():
        raise LLMAnswerError("empty answer")
    data = _extract_json(str(raw))
    if isinstance(data, dict):
        if "relations" not in data:
            raise LLMAnswerError(f"missing key 'relations' (got keys {sorted(data)})")
        entries = data["relations"]
    else:
        entries = data
    if not isinstance(entries, list):
        raise LLMAnswerError(f"'relations' must be a list, got {type(entries).__name__}")
    known = {" ".join(p.lower().split()): p for p in phrases}
    found: list[Relation] = []
    order: dict[tuple[int, str, str], int] = {}  # (axis, first, second) -> entry index
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise LLMAnswerError(f"entry {index} of 'relations' is not a JSON object: {entry!r}")
        for key in ("subject", "relation", "object"):
            if key not in entry:
                raise LLMAnswerError(f"missing key {key!r} in entry {index} of 'relations'")
            if not isinstance(entry[key], str):
                raise LLMAnswerError(f"{key} of entry {index} is not a string: {entry[key]!r}")
        sides = []
        for key in ("subject", "object"):
            phrase = known.get(" ".join(entry[key].lower().split()))
            if phrase is None:
                raise LLMAnswerError(f"{key} {entry[key]!r} of entry {index} is not one of the objects {phrases}")
            sides.append(phrase)
        name = relation_name(entry["relation"])
        if name is None:
            raise LLMAnswerError(f"relation {entry['relation']!r} of entry {index} is not one of {list(RELATIONS)}")
        if sides[0] == sides[1]:
            raise LLMAnswerError(f"entry {index} relates {sides[0]!r} to itself")
        axis, subject_first = RELATION_AXES[name]
        first, second = sides if subject_first else sides[::-1]
        if (axis, second, first) in order:
            raise LLMAnswerError(f"entries {order[(axis, second, first)]} and {index} contradict each other")
        order.setdefault((axis, first, second), index)
        relation = Relation(sides[0], name, sides[1], entry["relation"].strip())
        if all((r.subject, r.relation, r.object) != (relation.subject, relation.relation, relation.object)
               for r in found):
            found.append(relation)
    return found


# ------------------------------------------------------------------------------------------ shared machinery
class _TransientError(Exception):
    """A failure worth retrying after a pause (network, timeout, 429, 5xx)."""


class _BadReply(_TransientError):
    """A reply that is not a chat completion (an HTML page from a proxy, no ``choices``, ``content: null``).

    Retried like a network error: a proxy or a busy server may answer properly next time.
    """


class _PermanentError(Exception):
    """A failure that retrying will not fix (authentication, bad request, model missing)."""


def _snippet(text: str, limit: int = 80) -> str:
    """The start of a reply body on one line, for a readable reason."""
    text = " ".join(text.split())
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _completion_text(body: str, content_type: str = "") -> str:
    """The answer text of a chat completion response body; :class:`_BadReply` says what is wrong with it."""
    kind = content_type.split(";")[0].strip() or "no content type"
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        if not body.strip():
            raise _BadReply(f"the server answered with an empty body ({kind})") from None
        raise _BadReply(f"the server's reply is not JSON ({kind}): {_snippet(body)}") from None
    if not isinstance(data, dict):
        raise _BadReply(f"the server's reply is a JSON {type(data).__name__}, not a chat completion object")
    if "choices" not in data:
        detail = f"; error: {_snippet(str(data['error']))}" if data.get("error") else ""
        raise _BadReply(f"the reply has no 'choices' (keys {sorted(data)[:8]}){detail}")
    choices = data["choices"]
    if not isinstance(choices, list):
        raise _BadReply(f"the reply's 'choices' is {type(choices).__name__}, not a list")
    if not choices:
        raise _BadReply("the reply's 'choices' is empty")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise _BadReply(f"the reply's first choice has no 'message' object (got {_snippet(str(choices[0]))})")
    content = message.get("content")
    if content is None:
        refusal = f"; refusal: {_snippet(str(message['refusal']))}" if message.get("refusal") else ""
        raise _BadReply(f"the reply's message content is null{refusal}")
    if not isinstance(content, str):
        raise _BadReply(f"the reply's message content is {type(content).__name__}, not text")
    return content


def _dedupe(tags: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for tag in tags:
        if isinstance(tag, str) and tag.strip():
            seen.setdefault(tag.strip().lower(), tag.strip())
    return list(seen.values())


class _ChatLLM:
    """Validation, re-asking, retries, caching and the rule-based fallback around one ``_complete(messages)``."""

    backend = "chat"

    def __init__(
        self,
        model: str,
        *,
        max_retries: int = 3,
        max_reasks: int = 2,
        backoff: float = 1.0,
        cache_dir: str | os.PathLike | None = None,
        fallback: RuleBasedLLM | None = None,
    ):
        if max_retries < 0 or max_reasks < 0 or backoff < 0:
            raise ValueError("max_retries, max_reasks and backoff must be >= 0.")
        self.model = model
        self.max_retries = int(max_retries)
        self.max_reasks = int(max_reasks)
        self.backoff = float(backoff)
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.fallback = fallback or RuleBasedLLM()
        self._memory: dict[str, tuple[Any, dict[str, Any]]] = {}  # cache key -> (validated answer, source)
        self.requests_made = 0  # requests sent to the model, for tests and cost accounting

    # Subclasses: send `messages`, return the answer text; raise _TransientError / _PermanentError.
    def _complete(self, messages: list[dict[str, str]]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _unavailable(self) -> str | None:
        """A reason why no request can be made at all (e.g. no API key), or None."""
        return None

    # ---------------------------------------------------------------------------------------------- cache
    def cache_key(self, prompt: str, tags: list[str]) -> str:
        payload = json.dumps(
            {"backend": self.backend, "model": self.model, "prompt": prompt, "tags": tags,
             "instruction_version": INSTRUCTION_VERSION},
            sort_keys=True, ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def relations_cache_key(self, prompt: str, phrases: list[str]) -> str:
        """The cache key of a ``relations`` request (its own task and instruction version)."""
        payload = json.dumps(
            {"task": "relations", "backend": self.backend, "model": self.model, "prompt": prompt,
             "phrases": phrases, "instruction_version": RELATIONS_INSTRUCTION_VERSION},
            sort_keys=True, ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return Path(self.cache_dir) / f"{key}.json" if self.cache_dir else None

    def _cache_read(self, key: str, validate: Callable[[str], Any]) -> tuple[Any, dict[str, Any]] | None:
        """A cached answer as (validated value, source), from memory or disk; None when there is none."""
        if key in self._memory:
            return copy.deepcopy(self._memory[key])
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            value = validate(data["raw"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring the unreadable LLM cache file %s (%s)", path, error)
            return None
        source = self._source(fallback=False, reason=None, raw=data["raw"],
                              attempts=int(data.get("attempts", 1))) | {"cached": True}
        self._memory[key] = (value, source)
        return copy.deepcopy((value, source))

    def _cache_write(self, key: str, value: Any, source: dict[str, Any], record: dict[str, Any]) -> None:
        self._memory[key] = copy.deepcopy((value, source))
        path = self._cache_path(key)
        if path is None:
            return
        record = {"backend": self.backend, "model": self.model} | record | {
            "raw": source["raw"], "attempts": source["attempts"]}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as error:
            logger.warning("could not write the LLM cache file %s (%s)", path, error)

    # -------------------------------------------------------------------------------------------- requests
    def _source(self, *, fallback: bool, reason: str | None, raw: str | None, attempts: int) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "fallback": fallback, "reason": reason, "raw": raw,
                "attempts": attempts}

    def _ask(
        self,
        messages: list[dict[str, str]],
        validate: Callable[[str | None], Any],
        reask: Callable[[str | None, LLMAnswerError], list[dict[str, str]]],
    ) -> tuple[Any, str | None, str | None, int]:
        """Ask until an answer validates: ``(value, None, raw, attempts)``, or ``(None, reason, raw, attempts)``.

        Transient failures are retried ``max_retries`` times with exponential backoff; an invalid answer is
        asked again (``reask(raw, error)`` gives the messages) ``max_reasks`` times; any other error ends it.
        """
        attempts = failures = reasks = 0
        raw: str | None = None
        while True:
            attempts += 1
            self.requests_made += 1
            try:
                raw = self._complete(messages)
            except _TransientError as error:
                failures += 1
                reason = f"unusable reply: {error}" if isinstance(error, _BadReply) else f"request failed: {error}"
                if failures > self.max_retries:
                    return None, f"{reason} (after {failures} tries)", raw, attempts
                delay = self.backoff * 2 ** (failures - 1)
                logger.info("%s LLM: %s; retry %d/%d in %.2f s", self.backend, reason, failures, self.max_retries,
                            delay)
                time.sleep(delay)
                continue
            except _PermanentError as error:
                return None, f"request failed: {error}", raw, attempts
            except Exception as error:  # noqa: BLE001 - a backend bug or client surprise must not end the pipeline call
                return None, f"request failed: {type(error).__name__}: {error}", raw, attempts
            try:
                return validate(raw), None, raw, attempts
            except LLMAnswerError as error:
                reasks += 1
                if reasks > self.max_reasks:
                    return None, f"invalid answer: {error}", raw, attempts
                logger.info("%s LLM: invalid answer (%s); asking again (%d/%d)", self.backend, error, reasks,
                            self.max_reasks)
                messages = reask(raw, error)

    def _fall_back(self, prompt: str, tags: list[str], reason: str, raw: str | None, attempts: int) -> LLMResult:
        logger.warning("%s LLM (%s): %s; using the rule-based result.", self.backend, self.model, reason)
        objects = self.fallback.judge_objects(prompt, tags)
        return LLMResult(objects, self._source(fallback=True, reason=reason, raw=raw, attempts=attempts))

    def judge(self, prompt: str, tags: list[str]) -> LLMResult:
        """Eq. 6 score and Table 4 local phrase for each tag (duplicates removed, case-insensitively)."""
        tags = _dedupe(list(tags))
        if not tags:
            return LLMResult([], self._source(fallback=False, reason=None, raw=None, attempts=0))
        return self._answer(
            self.cache_key(prompt, tags),
            build_messages(prompt, tags),
            lambda raw: validate_answer(raw, prompt, tags),
            REASK_MESSAGE,
            LLMResult,
            lambda reason, raw, attempts: self._fall_back(prompt, tags, reason, raw, attempts),
            {"prompt": prompt, "tags": tags, "instruction_version": INSTRUCTION_VERSION},
        )

    def _answer(self, key: str, messages: list[dict[str, str]], validate: Callable[[str | None], Any],
                reask_message: str, wrap: Callable[..., Any], fall_back: Callable[[str, str | None, int], Any],
                cache_meta: dict[str, Any]) -> Any:
        """The request flow :meth:`judge` and :meth:`relations` share: a cached answer, else the bounded requests
        and re-asks of :meth:`_ask`, then ``wrap(answer, source)`` (cached) or ``fall_back(reason, raw, attempts)``."""
        cached = self._cache_read(key, validate)
        if cached is not None:
            return wrap(*cached)
        unavailable = self._unavailable()
        if unavailable:
            return fall_back(unavailable, None, 0)
        answer, reason, raw, attempts = self._ask(
            messages,
            validate,
            lambda raw, error: [*messages, {"role": "assistant", "content": raw or ""},
                                {"role": "user", "content": reask_message.format(error=error)}],
        )
        if reason is not None:
            return fall_back(reason, raw, attempts)
        source = self._source(fallback=False, reason=None, raw=raw, attempts=attempts)
        self._cache_write(key, answer, source, cache_meta)
        return wrap(answer, source)

    def relations(self, prompt: str, phrases: list[str]) -> RelationResult:
        """The spatial relations `prompt` states between two of `phrases` (beyond the paper; after SLD).

        Asked with :data:`RELATIONS_INSTRUCTION` and checked by :func:`validate_relations`, with the same
        retries, re-asks, cache and provenance as :meth:`judge`; on failure the rule-based answer
        (``fallback.relations``) with the reason in ``source``. Fewer than two phrases make no request.
        """
        phrases = _dedupe(list(phrases))
        if len(phrases) < 2:
            return RelationResult([], self._source(fallback=False, reason=None, raw=None, attempts=0))
        return self._answer(
            self.relations_cache_key(prompt, phrases),
            build_relation_messages(prompt, phrases),
            lambda raw: validate_relations(raw, phrases),
            RELATIONS_REASK_MESSAGE,
            RelationResult,
            lambda reason, raw, attempts: self._relations_fall_back(prompt, phrases, reason, raw, attempts),
            {"task": "relations", "prompt": prompt, "phrases": phrases,
             "instruction_version": RELATIONS_INSTRUCTION_VERSION},
        )

    def _relations_fall_back(self, prompt: str, phrases: list[str], reason: str, raw: str | None,
                             attempts: int) -> RelationResult:
        logger.warning("%s LLM (%s): %s; using the rule-based relations.", self.backend, self.model, reason)
        rules = self.fallback.relations(prompt, phrases)
        return RelationResult(rules.relations, self._source(fallback=True, reason=reason, raw=raw, attempts=attempts),
                              rules.unresolved)

    def _base_config(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "max_retries": self.max_retries,
                "max_reasks": self.max_reasks, "backoff": self.backoff, "cache_dir": self.cache_dir,
                "fallback": self.fallback.to_config()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"


# ------------------------------------------------------------------------------------------------- OpenAI
class OpenAIChat(_ChatLLM):
    """An OpenAI-compatible chat completions server through the ``openai`` client (imported when first used).

    Args:
        model: the model name the server knows (default ``"gpt-4o"``, a GPT-4-class model as in the paper).
        base_url: the server, e.g. ``"http://localhost:8000/v1"`` for vLLM or ``"http://localhost:11434/v1"``
            for Ollama; default ``OPENAI_BASE_URL`` from the environment, else OpenAI's own.
        api_key: default ``OPENAI_API_KEY``. With neither a key nor a base URL, every call falls back to the
            rule-based result (one warning). A local server without keys gets a placeholder key.
        timeout: seconds per request. max_retries: retries after network errors, timeouts, HTTP 429 and 5xx,
            and replies that are not a chat completion (the client's own retries are off). max_reasks: how often an invalid answer is asked again.
        backoff: the first pause between retries in seconds, doubled each retry. cache_dir: optional disk cache.

    Requests use temperature 0. The key is kept in memory only: it is not in ``to_config()``, ``source``,
    cache files, log messages or ``repr``.
    """

    backend = "openai"

    def __init__(
        self,
        model: str = "gpt-4o",
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30,
        max_retries: int = 3,
        cache_dir: str | os.PathLike | None = None,
        *,
        max_reasks: int = 2,
        backoff: float = 1.0,
        fallback: RuleBasedLLM | None = None,
    ):
        super().__init__(model, max_retries=max_retries, max_reasks=max_reasks, backoff=backoff,
                         cache_dir=cache_dir, fallback=fallback)
        self.base_url = base_url
        self.timeout = float(timeout)
        self.__api_key = api_key
        self._client = None
        self._warned = False

    def _resolved(self) -> tuple[str | None, str | None]:
        return (self.base_url or os.environ.get("OPENAI_BASE_URL") or None,
                self.__api_key or os.environ.get("OPENAI_API_KEY") or None)

    def _unavailable(self) -> str | None:
        base_url, api_key = self._resolved()
        if api_key or base_url:
            return None
        reason = "no API key (pass api_key= or set OPENAI_API_KEY) and no base_url"
        if not self._warned:
            warnings.warn(f"OpenAIChat: {reason}; falling back to rule-based results.", stacklevel=3)
            self._warned = True
        return reason

    def _get_client(self):
        if self._client is None:
            import openai  # lazily: only this backend needs it

            base_url, api_key = self._resolved()
            self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "not-needed",
                                         timeout=self.timeout, max_retries=0)
        return self._client

    def _complete(self, messages: list[dict[str, str]]) -> str:
        import openai

        try:
            # The raw response: the client's own parsing raises JSONDecodeError on a non-JSON body labelled
            # JSON and returns the bare text for other content types; we check the body ourselves.
            response = self._get_client().chat.completions.with_raw_response.create(
                model=self.model, messages=messages, temperature=0
            )
            body, content_type = response.text, response.headers.get("content-type", "")
        except (openai.APITimeoutError, openai.APIConnectionError) as error:
            raise _TransientError(f"{type(error).__name__}: {error}") from None
        except (openai.RateLimitError, openai.InternalServerError) as error:
            raise _TransientError(f"HTTP {error.status_code} ({type(error).__name__})") from None
        except openai.APIStatusError as error:
            if error.status_code >= 500 or error.status_code in (408, 409, 429):
                raise _TransientError(f"HTTP {error.status_code} ({type(error).__name__})") from None
            raise _PermanentError(f"HTTP {error.status_code} ({type(error).__name__})") from None
        except openai.OpenAIError as error:
            raise _PermanentError(f"{type(error).__name__}: {error}") from None
        return _completion_text(self._redact(body), content_type)

    def _redact(self, text: str) -> str:
        """`text` without the API key, in case a proxy echoes the request into its reply."""
        _, api_key = self._resolved()
        return text.replace(api_key, "***") if api_key else text

    def to_config(self) -> dict[str, Any]:
        """Backend, model, explicit base_url, timeout, retries, cache folder; never the API key."""
        return self._base_config() | {"base_url": self.base_url, "timeout": self.timeout}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OpenAIChat:
        return cls(
            model=config.get("model", "gpt-4o"), base_url=config.get("base_url"),
            timeout=config.get("timeout", 30), max_retries=config.get("max_retries", 3),
            cache_dir=config.get("cache_dir"), max_reasks=config.get("max_reasks", 2),
            backoff=config.get("backoff", 1.0),
            fallback=RuleBasedLLM.from_config(config.get("fallback", {})),
        )


# ------------------------------------------------------------------------------------------- transformers
class TransformersChat(_ChatLLM):
    """A local chat model through transformers (``AutoModelForCausalLM`` and the tokenizer's chat template).

    The model is loaded on the first ``judge`` call; a model that cannot be loaded, a tokenizer without a chat
    template, or an answer that stays invalid all end in the rule-based result with the reason in ``source``.
    Decoding is greedy (the temperature-0 equivalent).
    """

    backend = "local"

    def __init__(
        self,
        model_id_or_path: str,
        device: str | None = None,
        max_new_tokens: int = 256,
        *,
        max_reasks: int = 2,
        cache_dir: str | os.PathLike | None = None,
        fallback: RuleBasedLLM | None = None,
        dtype: str | None = None,
    ):
        super().__init__(model_id_or_path, max_retries=0, max_reasks=max_reasks, backoff=0.0,
                         cache_dir=cache_dir, fallback=fallback)
        self.device = device
        self.max_new_tokens = int(max_new_tokens)
        self.dtype = dtype
        self._model = None
        self._tokenizer = None
        self._load_error: str | None = None

    def _load(self) -> None:
        if self._model is not None or self._load_error is not None:
            return
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model)
            kwargs = {"dtype": getattr(torch, self.dtype)} if self.dtype else {}
            model = AutoModelForCausalLM.from_pretrained(self.model, **kwargs)
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._model = model.to(device).eval()
            self._tokenizer = tokenizer
        except Exception as error:  # noqa: BLE001 - any loading failure becomes a recorded fallback
            self._load_error = f"could not load the local model {self.model!r}: {type(error).__name__}: {error}"

    def _unavailable(self) -> str | None:
        self._load()
        return self._load_error

    def _complete(self, messages: list[dict[str, str]]) -> str:
        import torch

        tokenizer, model = self._tokenizer, self._model
        if not getattr(tokenizer, "chat_template", None):
            raise _PermanentError(f"the tokenizer of {self.model!r} has no chat template")
        try:
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                        pad_token_id=pad)
            # A generation config saved with return_dict_in_generate=True gives an output object, not a tensor.
            sequences = getattr(output, "sequences", output)
            new_tokens = sequences[0, inputs["input_ids"].shape[1] :]
            return tokenizer.decode(new_tokens, skip_special_tokens=True)
        except Exception as error:  # noqa: BLE001
            raise _PermanentError(f"generation failed: {type(error).__name__}: {error}") from None

    def to_config(self) -> dict[str, Any]:
        return self._base_config() | {"device": self.device, "max_new_tokens": self.max_new_tokens,
                                      "dtype": self.dtype}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TransformersChat:
        return cls(
            config["model"], device=config.get("device"), max_new_tokens=config.get("max_new_tokens", 256),
            max_reasks=config.get("max_reasks", 2), cache_dir=config.get("cache_dir"),
            fallback=RuleBasedLLM.from_config(config.get("fallback", {})), dtype=config.get("dtype"),
        )


# ------------------------------------------------------------------------------------------------ factory
_BACKENDS = {"rule": RuleBasedLLM, "openai": OpenAIChat, "local": TransformersChat}
_ALIASES = {"rules": "rule", "rule-based": "rule", "rule_based": "rule", "transformers": "local"}


def make_llm(name: str = "rule", **kwargs: Any):
    """An LLM backend by name: ``"rule"``, ``"openai"`` or ``"local"`` (alias ``"transformers"``)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _BACKENDS:
        raise ValueError(f"unknown LLM backend {name!r}; choose one of {sorted(_BACKENDS)}.")
    return _BACKENDS[key](**kwargs)


def llm_from_config(config: dict[str, Any]):
    """Restore a backend from its ``to_config()``."""
    key = _ALIASES.get(str(config.get("backend", "rule")).lower(), str(config.get("backend", "rule")).lower())
    if key not in _BACKENDS:
        raise ValueError(f"unknown LLM backend in config: {config.get('backend')!r}")
    return _BACKENDS[key].from_config(config)
