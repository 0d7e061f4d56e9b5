"""Evaluation (issue 5). So far: the prompt sets and their loader (``evaluation.prompts``)."""

from .prompts import PromptRecord, available_prompt_sets, load_prompts

__all__ = ["PromptRecord", "available_prompt_sets", "load_prompts"]
