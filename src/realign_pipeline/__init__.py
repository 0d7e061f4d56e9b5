"""realign-pipeline: RealignDiff (coarse-to-fine semantic re-alignment) as a diffusers plugin."""

__version__ = "0.1.0.dev0"
