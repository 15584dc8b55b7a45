"""Converters from checkpoints of the official UniFork code (github tliby/UniFork) to this package's modules."""

from .convert_official_unifork import (
    OFFICIAL_CHAT_TEMPLATE,
    OFFICIAL_IMAGE_GENERATION,
    OFFICIAL_NEGATIVE_PROMPT,
    convert_depth_head_state_dict,
    convert_llm_state_dict,
    convert_official_checkpoint,
    convert_rq_tokenizer_state_dict,
    official_model_state_dict,
    rq_configs_from_official,
)

__all__ = [
    "OFFICIAL_CHAT_TEMPLATE",
    "OFFICIAL_IMAGE_GENERATION",
    "OFFICIAL_NEGATIVE_PROMPT",
    "convert_depth_head_state_dict",
    "convert_llm_state_dict",
    "convert_official_checkpoint",
    "convert_rq_tokenizer_state_dict",
    "official_model_state_dict",
    "rq_configs_from_official",
]
