"""realign-pipeline: RealignDiff (coarse-to-fine semantic re-alignment) as a diffusers plugin."""

__version__ = "0.1.0.dev0"

# First: the modules below import diffusers, which asks transformers for image processors by name.
from . import _pil_backend  # noqa: F401  (importing it binds those names to the Pillow classes)
from .attention import RealignAttentionState, RealignAttnProcessor, reweighted_attention_scores
from .layout import (
    SCORE_CERTAIN,
    SCORE_MAY,
    SCORE_UNLIKELY,
    Layout,
    LayoutError,
    Region,
    ResolvedLayout,
    resolve_layout,
)
from .pipeline import RealignDiffPipeline, RealignDiffPipelineOutput
from .pipeline_xl import RealignDiffXLPipeline

__all__ = [
    "SCORE_CERTAIN",
    "SCORE_MAY",
    "SCORE_UNLIKELY",
    "Layout",
    "LayoutError",
    "RealignAttentionState",
    "RealignAttnProcessor",
    "RealignDiffPipeline",
    "RealignDiffPipelineOutput",
    "RealignDiffXLPipeline",
    "Region",
    "ResolvedLayout",
    "resolve_layout",
    "reweighted_attention_scores",
]
