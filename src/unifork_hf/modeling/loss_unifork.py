"""The loss of UniFork's two heads: next-token cross-entropy over text ids and over image codes."""

import torch
from torch import nn


def image_codes_at_positions(input_ids, image_ids, hidden_states, config) -> torch.Tensor:
    """Every position's image code, `(B, T)`, or codes `(B, T, depth)` with the RQ tokenizer: the image's at
    image positions, -100 elsewhere."""
    depth = () if config.rq_config is None else (config.image_depth,)
    codes = torch.full((*hidden_states.shape[:2], *depth), -100, dtype=torch.long, device=hidden_states.device)
    if image_ids is not None and input_ids is not None:
        codes[input_ids == config.image_token_id] = image_ids.reshape(-1, *depth).to(codes.device)
    return codes


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, depth_weights: list[float] | None = None):
    """Summed next-token cross-entropy (position t predicts label t+1) and the number of labelled positions.

    With labels `(B, T, depth)` (RQ codes) a position's loss is the mean over its depth codes, weighted by
    `depth_weights` if given (normalised to sum to 1), so a position counts once, as a token does (and as
    `Trainer` counts `num_items_in_batch` from the `(B, T)` labels)."""
    shift_labels = labels[:, 1:].to(logits.device)
    losses = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    if labels.ndim == 3:
        if depth_weights is None:
            losses = losses.mean(-1)
        else:
            weights = torch.tensor(depth_weights, dtype=losses.dtype, device=losses.device)
            losses = losses @ (weights / weights.sum())
        shift_labels = shift_labels[..., 0]
    return losses.sum(), (shift_labels != -100).sum()
