"""Scoring code shared by the captioner, the rewards and the metrics (one CLIP scorer for all)."""

from .clip import DEFAULT_CLIP_MODEL, ClipScorer, clip_preprocess_tensor, cosine_similarity

__all__ = ["DEFAULT_CLIP_MODEL", "ClipScorer", "clip_preprocess_tensor", "cosine_similarity"]
