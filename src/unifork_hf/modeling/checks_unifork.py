"""Checks of what the model is given, so that bad input fails with an error that names the argument, what was
expected and what came, instead of a shape error deep inside torch or silently wrong output."""

import torch
from transformers.cache_utils import StaticCache


def check_one_of_each(input_ids, inputs_embeds, pixel_values, image_ids) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if pixel_values is not None and image_ids is not None:
        raise ValueError("Pass either pixel_values or image_ids, not both.")


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if (
        input_ids.dtype.is_floating_point
        or input_ids.dtype == torch.bool
        or input_ids.ndim != 2
        or not input_ids.numel()
    ):
        raise ValueError(
            f"input_ids must be a non-empty (batch, length) tensor of integer token ids, got "
            f"dtype {input_ids.dtype} and shape {tuple(input_ids.shape)}."
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must be in 0..{vocab_size - 1}, got values from {low} to {high}.")


def check_pixel_values(pixel_values: torch.Tensor) -> None:
    if not pixel_values.dtype.is_floating_point or not pixel_values.numel():
        raise ValueError(
            f"pixel_values must be a non-empty float tensor, got dtype {pixel_values.dtype} and "
            f"shape {tuple(pixel_values.shape)}."
        )
    if not bool(pixel_values.isfinite().all()) or float(pixel_values.abs().max()) > 1 + 1e-3:
        raise ValueError(
            "pixel_values must be finite numbers in [-1, 1] (what the processor makes of images), "
            f"got values from {pixel_values.min().item()} to {pixel_values.max().item()}."
        )


def check_image_placeholders(input_ids, image_ids: torch.Tensor, config) -> torch.Tensor:
    """That `input_ids` hold one image placeholder per image token given; returns where they are."""
    if input_ids is None:
        raise ValueError("Images (`pixel_values` or `image_ids`) need `input_ids` to locate the image tokens.")
    if config.image_token_id is None:
        raise ValueError(
            "Images were given but config.image_token_id is None, so no position of input_ids "
            "can hold them: build the model with from_pretrained_llm (which adds the image "
            "tokens to the tokenizer) or set image_token_id, boi_token_id and eoi_token_id."
        )
    expected = (config.num_image_tokens,) if config.rq_config is None else (config.num_image_tokens, config.image_depth)
    if tuple(image_ids.shape[1:]) != expected or image_ids.is_floating_point():
        raise ValueError(
            f"image_ids must be integer codes of shape (num_images, {', '.join(map(str, expected))}), got "
            f"{image_ids.dtype} of shape {tuple(image_ids.shape)}."
        )
    is_image = input_ids == config.image_token_id
    if int(is_image.sum()) != image_ids.shape[0] * config.num_image_tokens:
        raise ValueError(
            f"input_ids hold {int(is_image.sum())} image tokens (id {config.image_token_id}) but "
            f"{image_ids.shape[0]} image(s) x {config.num_image_tokens} tokens were given: the number of "
            "image placeholders must match the number of images."
        )
    return is_image


def check_sequence(input_ids, image_ids, attention_mask, cache, batch_size: int, total_length: int, config) -> None:
    """The sequence against the model: image tokens without images, its length, the attention mask's shape."""
    if input_ids is not None and image_ids is None and total_length == input_ids.shape[1]:
        if config.image_token_id is not None and bool((input_ids == config.image_token_id).any()):
            raise ValueError("input_ids contain image tokens but no pixel_values or image_ids were given.")
    max_positions = getattr(config.text_config, "max_position_embeddings", None)
    if max_positions is not None and total_length > max_positions:
        raise ValueError(
            f"Sequence of {total_length} tokens is longer than the model's max_position_embeddings ({max_positions})."
        )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        rows, length = attention_mask.shape  # a static cache's mask may cover the whole cache
        if (
            rows != batch_size
            or length < total_length
            or (length > total_length and not isinstance(cache, StaticCache))
        ):
            raise ValueError(
                f"attention_mask must have shape (batch, cached + new tokens) = ({batch_size}, "
                f"{total_length}), got {tuple(attention_mask.shape)}."
            )


def check_labels(labels: torch.Tensor, hidden_states: torch.Tensor, logits) -> None:
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"labels must have the shape of the input (batch, seq) = {tuple(hidden_states.shape[:2])}, "
            f"got {tuple(labels.shape)}."
        )
    if logits is not None and logits.shape[1] != labels.shape[1]:
        raise ValueError("labels need logits at every position: leave logits_to_keep at 0 when training.")


def check_text_labels(labels: torch.Tensor, vocab_size: int) -> None:
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        raise ValueError(f"labels of understanding samples must be text ids in 0..{vocab_size - 1} or -100.")
