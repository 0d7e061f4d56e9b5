"""Tiny random BLIP-2 checkpoints (model + processor) saved to a folder, for tests. Nothing is downloaded.

- :func:`tiny_blip2_captioner` writes a :class:`transformers.Blip2ForConditionalGeneration` with a tiny OPT
  language model, like ``Salesforce/blip2-opt-2.7b``. Its tokenizer is a word-level tokenizer over the
  whole words of the BERT uncased vocabulary shipped in ``realign_pipeline/assets`` (lower-cased, split on
  whitespace and punctuation), with OPT's conventions: ``</s>`` is both BOS (prepended to every text) and
  EOS, ``<pad>`` pads. ``Blip2Processor`` adds its ``<image>`` token; ``config.image_token_index`` is that
  token's id and the processor's ``num_query_tokens`` equals the config's, as ``generate`` needs.
- :func:`tiny_blip2_itm` writes a :class:`transformers.Blip2ForImageTextRetrieval` (ITM head, ITC
  projections) whose weights also load as :class:`transformers.Blip2TextModelWithProjection`
  (``use_qformer_text_input=True``), like ``Salesforce/blip2-itm-vit-g``; the tokenizer is the real BERT
  uncased WordPiece tokenizer; ``image_token_index`` is ``None`` (text-only inputs, as that checkpoint).

Both use the Pillow ``BlipImageProcessorPil`` with OpenAI CLIP's mean/std and bicubic resizing to a small
square. The weights are random: captions are gibberish, embeddings meaningless; shapes and code paths are real.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "TINY_BLIP2_IMAGE_SIZE",
    "TINY_BLIP2_NUM_QUERY_TOKENS",
    "blip2_itm_tokenizer",
    "blip_image_processor",
    "tiny_blip2_captioner",
    "tiny_blip2_itm",
    "tiny_opt_tokenizer",
]

#: The tiny models' input resolution (square).
TINY_BLIP2_IMAGE_SIZE = 32
#: Q-Former query tokens of the tiny models.
TINY_BLIP2_NUM_QUERY_TOKENS = 4

_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@lru_cache(maxsize=1)
def _bert_vocab_lines() -> tuple[str, ...]:
    text = resources.files("realign_pipeline").joinpath("assets", "bert_base_uncased_vocab.txt").read_text("utf-8")
    return tuple(line.rstrip("\n") for line in text.splitlines())


def tiny_opt_tokenizer(words=None):
    """An OPT-style word-level tokenizer (``PreTrainedTokenizerFast``) built offline from the BERT words
    (or from ``words``, a small vocabulary, unknown words become ``<unk>``)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT: pad 1, bos/eos 2
    if words is None:
        words = [w for w in _bert_vocab_lines() if w and not w.startswith("##") and not w.startswith("[")]
    vocab: dict[str, int] = {}
    for tok in specials + words:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", vocab["</s>"])]
    )
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",  # generation with a batch of prompts pads on the left, as OPT's tokenizer
        model_max_length=64,
    )


def blip2_itm_tokenizer():
    """The tokenizer of :func:`tiny_blip2_itm`: the real BERT uncased WordPiece tokenizer (30,522 tokens), built
    offline, 64 tokens at most."""
    from .grounding import bert_tokenizer

    tokenizer = bert_tokenizer()
    tokenizer.model_max_length = 64
    return tokenizer


def blip_image_processor(image_size: int = TINY_BLIP2_IMAGE_SIZE):
    """The image processor of the tiny BLIP-2 checkpoints (also right for a tiny BLIP): the Pillow
    ``BlipImageProcessorPil`` resizing to ``image_size`` square, bicubic, with OpenAI CLIP's mean and std."""
    # the Pillow class by name: the default one needs torchvision, which the base install leaves out
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=3,  # bicubic, as the real BLIP-2 checkpoints
        image_mean=_OPENAI_CLIP_MEAN,
        image_std=_OPENAI_CLIP_STD,
    )


def _vision_qformer(image_size: int, num_query_tokens: int, vocab_size: int | None = None, text_input=False):
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 8,
    }
    qformer = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "encoder_hidden_size": 32,
        "cross_attention_frequency": 1,
        "max_position_embeddings": 64,
        "use_qformer_text_input": text_input,
        # Wider than BERT's 0.02: with 0.02 every text gets nearly the same tiny embedding (cosines ~0.9999),
        # which would make caption-reward tests meaningless.
        "initializer_range": 0.5,
    }
    if vocab_size is not None:
        qformer["vocab_size"] = vocab_size
    return vision, qformer


def tiny_blip2_captioner(
    save_dir: str | Path,
    seed: int = 0,
    image_size: int = TINY_BLIP2_IMAGE_SIZE,
    num_query_tokens: int = TINY_BLIP2_NUM_QUERY_TOKENS,
    words=None,
) -> Path:
    """A tiny random ``Blip2ForConditionalGeneration`` (OPT) and its ``Blip2Processor``, saved to ``save_dir``.

    ``words``: a small vocabulary for the language model instead of the ~23k BERT words (tests that need
    the caption distribution to be computable exactly use a few dozen words).

    Returns the folder (loads with ``Blip2ForConditionalGeneration.from_pretrained`` and
    ``Blip2Processor.from_pretrained``, offline). The caller's global torch RNG state is left untouched.
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    processor = Blip2Processor(
        image_processor=blip_image_processor(image_size),
        tokenizer=tiny_opt_tokenizer(words),
        num_query_tokens=num_query_tokens,
    )
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text_config = OPTConfig(
        vocab_size=len(tok),
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        init_std=0.3,  # a peaked, image-dependent caption distribution rather than a near-uniform one
    )
    vision, qformer = _vision_qformer(image_size, num_query_tokens)
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text_config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
        initializer_range=0.3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    return save_dir


def tiny_blip2_itm(
    save_dir: str | Path,
    seed: int = 0,
    image_size: int = TINY_BLIP2_IMAGE_SIZE,
    num_query_tokens: int = TINY_BLIP2_NUM_QUERY_TOKENS,
) -> Path:
    """A tiny random ``Blip2ForImageTextRetrieval`` (also loadable as ``Blip2TextModelWithProjection``) and
    its ``Blip2Processor`` (BERT tokenizer, no image tokens), saved to ``save_dir``. Returns the folder."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    processor = Blip2Processor(image_processor=blip_image_processor(image_size), tokenizer=blip2_itm_tokenizer())
    vision, qformer = _vision_qformer(image_size, num_query_tokens, vocab_size=len(processor.tokenizer), text_input=True)
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=16,
        image_token_index=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForImageTextRetrieval(config).eval()
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    return save_dir
