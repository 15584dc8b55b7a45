"""unifork-hf: UniFork, the Y-shaped unified model for image understanding and generation, in the HF stack.

Importing the package registers `"unifork"` with transformers' Auto classes.
"""

import os

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .modeling.configuration_unifork import UniForkConfig
from .modeling.image_processing_unifork import UniForkImageProcessorPil
from .modeling.modeling_unifork import (
    DEFAULT_IMAGE_GENERATION,
    UniForkForConditionalGeneration,
    UniForkModel,
    UniForkPreTrainedModel,
)
from .modeling.processing_unifork import UniForkProcessor
from .modeling.routing_unifork import GENERATION, UNDERSTANDING
from .modeling.vq_unifork import UniForkVQImageTokenizer
from .pipelines.pipeline_unifork import UniForkPipeline

__version__ = "0.1.0"

# The bundled checkpoint trained on the Shapes benchmark (examples/shapes/, recipe in its README.md):
# `AutoModel.from_pretrained(unifork_hf.DEMO_CHECKPOINT)`.
DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "shapes-demo")

AutoConfig.register("unifork", UniForkConfig, exist_ok=True)
AutoModel.register(UniForkConfig, UniForkForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(UniForkConfig, UniForkForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(UniForkConfig, UniForkForConditionalGeneration, exist_ok=True)  # any-to-any
AutoImageProcessor.register(UniForkConfig, image_processor_classes={"pil": UniForkImageProcessorPil}, exist_ok=True)
AutoProcessor.register(UniForkConfig, UniForkProcessor, exist_ok=True)

# Remote code: save_pretrained copies the defining modules and writes `auto_map`, so a checkpoint
# also loads with `trust_remote_code=True` where this package is not installed.
UniForkConfig.register_for_auto_class()
UniForkForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
UniForkImageProcessorPil.register_for_auto_class("AutoImageProcessor")
UniForkProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "DEFAULT_IMAGE_GENERATION",
    "DEMO_CHECKPOINT",
    "GENERATION",
    "UNDERSTANDING",
    "UniForkConfig",
    "UniForkForConditionalGeneration",
    "UniForkImageProcessorPil",
    "UniForkModel",
    "UniForkPipeline",
    "UniForkPreTrainedModel",
    "UniForkProcessor",
    "UniForkVQImageTokenizer",
]
