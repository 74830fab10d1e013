"""dynvit: dynamic inference for vision transformers, composed from pluggable stages."""

from dynvit.pipeline import DynamicPipeline, InferenceResult, PipelineOutput, build_pipeline
from dynvit.recipe import RecipeError, load_recipe
from dynvit.registry import PluginError, register, registry

__version__ = "0.1.0"

__all__ = [
    "DynamicPipeline",
    "InferenceResult",
    "PipelineOutput",
    "PluginError",
    "RecipeError",
    "build_pipeline",
    "load_recipe",
    "register",
    "registry",
]
