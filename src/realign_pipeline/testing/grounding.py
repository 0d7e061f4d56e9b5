"""Tiny random Grounding DINO and SAM checkpoints for tests (no download; a few hundred kB each).

Each builder writes a model and its processor with ``save_pretrained`` into ``save_dir`` and returns the path,
so tests load them back through the same ``from_pretrained`` calls that users make with hub ids; the caller's
global torch RNG state is left untouched. Random weights produce random boxes and masks: tests steer the
outcome with thresholds (0 forces boxes, values above 1 force "no box"), not with the content of the image.

Measured constraints (transformers 5.24): Grounding DINO needs ``decoder_layers >= 2``, and at 64 px inputs
``num_feature_levels=3``; SAM needs ``vision_config.num_pos_feats * 2 == prompt_encoder_config.hidden_size``.
"""

from __future__ import annotations

import os
from importlib import resources

import torch

__all__ = ["bert_tokenizer", "tiny_grounding_dino", "tiny_sam"]


def bert_tokenizer():
    """The real ``bert-base-uncased`` WordPiece tokenizer, built offline from the vocabulary shipped in assets."""
    from transformers import BertTokenizer

    vocab = resources.files("realign_pipeline") / "assets" / "bert_base_uncased_vocab.txt"
    # transformers 5's BertTokenizer takes ``vocab=`` (a dict or a path); a ``vocab_file=`` keyword is silently
    # ignored and leaves a 5-token vocabulary that maps every word to [UNK].
    tokens = vocab.read_text(encoding="utf-8").split("\n")
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens) if t}, do_lower_case=True)


def tiny_grounding_dino(save_dir: str | os.PathLike, seed: int = 0, image_size: int = 64) -> str:
    """Save a random ~1M-parameter ``GroundingDinoForObjectDetection`` and its processor; return the path.

    The processor resizes images so their shortest edge is ``image_size`` (the real one uses 800).
    """
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    tokenizer = bert_tokenizer()
    backbone = SwinConfig(
        image_size=image_size,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=2,
        out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,  # GroupNorm(32, d_model): a multiple of 32
        num_queries=12,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_feature_levels=3,
        max_text_len=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessorPil(
        size={"shortest_edge": image_size, "longest_edge": 2 * image_size}
    )
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    return str(save_dir)


def tiny_sam(save_dir: str | os.PathLike, seed: int = 0, image_size: int = 64) -> str:
    """Save a random tiny ``SamModel`` (``image_size`` px input, patch 8) and its ``SamProcessor``; return the path."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    patch = 8
    mask_side = 4 * (image_size // patch)  # SAM's low-resolution masks are 4x the embedding grid
    config = SamConfig(
        vision_config={
            "hidden_size": 16,
            "output_channels": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
            "window_size": 4,
            "global_attn_indexes": [1],
            "num_pos_feats": 8,  # * 2 == the prompt encoder's hidden_size
            "mlp_dim": 32,
        },
        prompt_encoder_config={
            "hidden_size": 16,
            "image_size": image_size,
            "patch_size": patch,
            "mask_input_channels": 4,
        },
        mask_decoder_config={
            "hidden_size": 16,
            "mlp_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(config).eval()
    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": mask_side},
        mask_pad_size={"height": mask_side, "width": mask_side},
    )
    processor = SamProcessor(image_processor=image_processor)
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    return str(save_dir)
