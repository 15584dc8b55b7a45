"""Training UniFork: data preparation and collation, the multi-task Trainer, freezing stages, LoRA per branch."""

from ..data.colours import colour_dataset
from .collator import TaskStratifiedSampler, UniForkDataCollator
from .datasets import mix_tasks, prepare_generation, prepare_understanding, pretokenize_images
from .peft_utils import lora_config
from .trainer import FREEZING_POLICIES, UniForkTrainer, UniForkTrainingArguments, apply_freezing

__all__ = [
    "FREEZING_POLICIES",
    "TaskStratifiedSampler",
    "UniForkDataCollator",
    "UniForkTrainer",
    "UniForkTrainingArguments",
    "apply_freezing",
    "colour_dataset",
    "lora_config",
    "mix_tasks",
    "prepare_generation",
    "prepare_understanding",
    "pretokenize_images",
]
