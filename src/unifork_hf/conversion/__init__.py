"""Converters from checkpoints of the official UniFork code (github tliby/UniFork) to this package's modules."""

from .convert_official_unifork import convert_depth_head_state_dict, convert_rq_tokenizer_state_dict

__all__ = ["convert_depth_head_state_dict", "convert_rq_tokenizer_state_dict"]
