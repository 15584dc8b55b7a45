"""diffusers pipelines over UniFork models."""

from .pipeline_unifork import UniForkPipeline

__all__ = ["UniForkPipeline"]
