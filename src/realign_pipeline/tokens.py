"""Where the words of a prompt land in the text encoder's token sequence.

Everything here works on token ids, so it is correct for any tokenizer whose words tokenize the same alone as
in context (CLIP's BPE splits on words and punctuation first, so this holds for Stable Diffusion 1.x and 2.x).
Position 0 of an encoded prompt is the start token, so the first word starts at index 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of `prompt` with the special tokens, *without* truncation (so truncation can be detected)."""
    return list(tokenizer(prompt, add_special_tokens=True, truncation=False)["input_ids"])


def find_subsequence(sequence: list[int], pattern: list[int]) -> list[int]:
    """Start positions of every occurrence of `pattern` in `sequence`."""
    if not pattern:
        return []
    n = len(pattern)
    return [i for i in range(len(sequence) - n + 1) if sequence[i : i + n] == pattern]


def phrase_occurrences(tokenizer: PreTrainedTokenizerBase, prompt: str, phrase: str) -> list[list[int]]:
    """Token indices of each occurrence of `phrase` in `prompt` (indices into the encoded prompt)."""
    pattern = _ids(tokenizer, phrase)
    sequence = prompt_token_ids(tokenizer, prompt)
    return [list(range(start, start + len(pattern))) for start in find_subsequence(sequence, pattern)]


@dataclass(frozen=True)
class WordSpan:
    """A whitespace-separated word of the prompt and the token indices it occupies."""

    word: str
    token_indices: tuple[int, ...]


def word_token_spans(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int | None = None) -> list[WordSpan]:
    """Split `prompt` on whitespace and map each word to its token indices in the encoded prompt.

    Words whose tokens fall beyond `max_length - 1` (truncated away by the text encoder) are dropped; a word
    cut in the middle keeps the tokens that survive.
    """
    max_length = max_length or tokenizer.model_max_length
    spans: list[WordSpan] = []
    position = 1  # after the start token
    for word in prompt.split():
        n = len(_ids(tokenizer, word))
        indices = tuple(i for i in range(position, position + n) if i < max_length - 1)
        position += n
        if indices:
            spans.append(WordSpan(word=word, token_indices=indices))
    return spans


def unique_word_keys(spans: list[WordSpan]) -> list[str]:
    """Dictionary keys for words: the word itself, then `word#2`, `word#3`, ... for repeats."""
    seen: dict[str, int] = {}
    keys = []
    for span in spans:
        seen[span.word] = seen.get(span.word, 0) + 1
        keys.append(span.word if seen[span.word] == 1 else f"{span.word}#{seen[span.word]}")
    return keys
