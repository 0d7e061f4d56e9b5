"""Evaluation of the paper's tables, one module per step:

- ``prompts``: the bundled prompt sets and their loader (re-exported here);
- ``configs``: the table's configurations (presets or JSON files) and the pipelines they build;
- ``generate``: images of a prompt set with one configuration, resumable and shardable across processes;
- ``manifest``: reading a result folder's per-image manifests;
- ``metrics``: the ``Metric`` base and the alignment metrics (CLIP, NegCLIP, BLIP-2 ITM, the caption reward);
- ``vqa``: the BLIP-VQA score, T2I-CompBench style; ``fid``, ``inception``: the Frechet distance (FID);
- ``statistics``: means with bootstrap confidence intervals;
- ``score``: a folder's images scored with the metrics;
- ``report``, ``human``: the tables, and the human study's page and analysis;
- ``run``: generation, scoring and the report in one call (``realigndiff evaluate run``).

``python -m realign_pipeline.evaluation`` runs these steps from the command line, as ``realigndiff evaluate``.
"""

from .prompts import PromptRecord, available_prompt_sets, load_prompts

__all__ = ["PromptRecord", "available_prompt_sets", "load_prompts"]
