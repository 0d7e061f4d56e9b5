"""Evaluation of the paper's tables: prompt sets (``prompts``), generation (``generate``), metrics (``metrics``,
``score``), reports (``report``, ``human``) and the one-command run (``run``)."""

from .prompts import PromptRecord, available_prompt_sets, load_prompts

__all__ = ["PromptRecord", "available_prompt_sets", "load_prompts"]
