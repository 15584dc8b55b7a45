"""LoRA on one part of the Y: the shared trunk, one branch, or all decoder layers."""

import functools
import re

import torch
from peft import LoraConfig, TaskType

from ..modeling.configuration_unifork import UniForkConfig
from ..modeling.modeling_unifork import UniForkForConditionalGeneration

# Branch -> the parts of the Y (`model.y_parts()`) that get adapters, and those `train_head` trains fully.
BRANCH_LAYERS = {
    "shared": ("shared_layers",),
    "understanding": ("understanding_layers",),
    "generation": ("generation_layers",),
    "all": ("shared_layers", "understanding_layers", "generation_layers"),
}
BRANCH_HEADS = {
    "shared": (),
    "understanding": ("understanding_head", "understanding_norm"),
    "generation": ("generation_head", "generation_norm"),
    "all": ("understanding_head", "understanding_norm", "generation_head", "generation_norm"),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(
    branch: str = "generation",
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_projections=PROJECTIONS,
    train_head: bool = False,
    **lora_kwargs,
) -> LoraConfig:
    """A `peft.LoraConfig` whose LoRA adapters sit on exactly one part of UniFork's Y.

    Args:
        branch: `"generation"` (text -> image only), `"understanding"` (image -> text only),
            `"shared"` (layers 0..K-1, used by both tasks) or `"all"` (every decoder layer).
        r, alpha, dropout: LoRA rank, `lora_alpha` and `lora_dropout`.
        target_projections: the linear layers of each decoder layer to adapt (by their last name).
        train_head: also train the branch's head and final norm in full, saved with the adapter
            (`modules_to_save`): generation -> `generation_head`, `generation_norm`; understanding ->
            `lm_head`, `understanding_norm`; all -> both. (With tied embeddings, `lm_head` is the
            embedding matrix: prefer `train_head=False` for the understanding branch then.)
        lora_kwargs: any other `LoraConfig` field (e.g. `use_rslora=True`, `modules_to_save=[...]`).

    `target_modules` is a regex matched (`re.fullmatch`) against full module names, so the same
    config works on the bare model and on a `PeftModel`. A generation-branch adapter leaves the
    understanding path untouched: its outputs stay bit-identical, before and after merging.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> from unifork_hf import UniForkConfig, UniForkForConditionalGeneration
    >>> from unifork_hf.training import lora_config
    >>> model = UniForkForConditionalGeneration(UniForkConfig.from_preset("unifork-tiny"))
    >>> model = get_peft_model(model, lora_config(branch="generation", r=16, train_head=True))
    >>> all("generation_" in name for name, p in model.named_parameters() if p.requires_grad)
    True
    >>> model.print_trainable_parameters()  # LoRA on generation_layers.* + generation_head / generation_norm
    trainable params: 36,928 || all params: 1,018,923 || trainable%: 3.6242

    ```
    """
    if branch not in BRANCH_LAYERS:
        raise ValueError(f"branch must be one of {sorted(BRANCH_LAYERS)}, got {branch!r}.")
    if isinstance(target_projections, str):
        target_projections = (target_projections,)
    if not target_projections:
        raise ValueError("target_projections must name at least one projection (e.g. 'q_proj').")
    if train_head and not BRANCH_HEADS[branch]:
        raise ValueError(f"train_head=True: branch {branch!r} has no head (use 'understanding' or 'generation').")

    names = dict(_part_names())
    layers = "|".join(re.escape(names[part]) for part in BRANCH_LAYERS[branch])
    projections = "|".join(re.escape(p) for p in target_projections)
    # e.g. `model.generation_layers.3.self_attn.q_proj`, under any prefix (`base_model.model.` in a PeftModel).
    target_modules = rf"(?:.*\.)?({layers})\.\d+\.\w+\.({projections})"
    modules_to_save = list(lora_kwargs.pop("modules_to_save", None) or [])
    if train_head:
        # by the module's own name: peft matches these as name suffixes, also under a PeftModel's prefix
        heads = [names[part].rsplit(".", 1)[-1] for part in BRANCH_HEADS[branch]]
        modules_to_save += [name for name in heads if name not in modules_to_save]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        task_type=TaskType.CAUSAL_LM,
        **lora_kwargs,
    )


@functools.cache
def _part_names() -> tuple:
    """`model.y_part_names()` of the class's own layout: a LoRA config is made before (and without) a model."""
    with torch.device("meta"):  # structure only: no memory, no initialisation
        model = UniForkForConditionalGeneration(UniForkConfig.from_preset("unifork-tiny"))
    return tuple(model.y_part_names().items())


__all__ = ["lora_config"]
