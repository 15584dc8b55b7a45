"""Training UniFork: the image and text tokenizers for your data, data preparation and collation, the multi-task
Trainer, freezing stages, LoRA per branch."""

from ..data.colours import colour_dataset
from .collator import TaskStratifiedSampler, UniForkDataCollator
from .datasets import mix_tasks, prepare_generation, prepare_understanding, pretokenize_images
from .image_tokenizer import reconstruction_metrics, small_rq_config, small_vq, train_rq_tokenizer, train_vq_tokenizer
from .peft_utils import lora_config
from .text_tokenizer import build_text_tokenizer, prepare_text_tokenizer
from .trainer import FREEZING_POLICIES, UniForkTrainer, UniForkTrainingArguments, apply_freezing

__all__ = [
    "FREEZING_POLICIES",
    "TaskStratifiedSampler",
    "UniForkDataCollator",
    "UniForkTrainer",
    "UniForkTrainingArguments",
    "apply_freezing",
    "build_text_tokenizer",
    "colour_dataset",
    "lora_config",
    "mix_tasks",
    "prepare_generation",
    "prepare_understanding",
    "prepare_text_tokenizer",
    "pretokenize_images",
    "reconstruction_metrics",
    "small_rq_config",
    "small_vq",
    "train_rq_tokenizer",
    "train_vq_tokenizer",
]
