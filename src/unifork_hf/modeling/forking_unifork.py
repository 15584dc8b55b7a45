"""Forking a pretrained LLM into a UniFork, the paper's way (`UniForkForConditionalGeneration.from_pretrained_llm`).

The LLM's embeddings, layers 0..K-1 (shared), layers K..L-1 with the final norm (understanding branch) and LM
head are loaded as they are; layers K..L-1 and the final norm are copied once more into the generation branch.
The image projector and the generation head are new; the image tokenizer is the given diffusers `VQModel` or
[`UniForkRQImageTokenizer`].
"""

import os
import sys

from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import logging

from .configuration_unifork import UniForkConfig, vq_downsampling_factor
from .image_processing_unifork import UniForkImageProcessorPil
from .processing_unifork import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, UniForkProcessor
from .rq_unifork import UniForkRQImageTokenizer

IMAGE_TOKENS = (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN)
# The image geometry `unifork_hf.training.train_vq_tokenizer` records in a VQ's config (diffusers keeps `_` keys
# through save and load, and does not pass them to `VQModel.__init__`).
VQ_IMAGE_SIZE_KEY, VQ_TILE_SIZE_KEY = "_unifork_image_size", "_unifork_tile_size"

logger = logging.get_logger(__name__)


def fork_llm(model_class, llm, vq_model, tokenizer=None, num_shared_layers: int | None = None, **config_kwargs):
    """A `model_class` (UniForkForConditionalGeneration) built from `llm` and `vq_model`, with its processor
    attached; see `UniForkForConditionalGeneration.from_pretrained_llm`."""
    llm, vq_model, tokenizer = _load(llm, vq_model, tokenizer)
    if isinstance(vq_model, UniForkRQImageTokenizer):
        config_kwargs = {**config_kwargs, "rq_config": vq_model.rq_config}
    else:
        config_kwargs = {**_image_geometry(vq_model, config_kwargs), "vq_config": dict(vq_model.config)}
    image_token_id, boi_token_id, eoi_token_id = _add_image_tokens(tokenizer, llm)
    config = UniForkConfig(
        text_config=llm.config.get_text_config().to_dict(),
        num_shared_layers=num_shared_layers,
        image_token_id=image_token_id,
        boi_token_id=boi_token_id,
        eoi_token_id=eoi_token_id,
        **config_kwargs,
    )
    model = model_class(config)
    names = model.y_part_names()
    state = llm_state_dict_to_y(llm.state_dict(), config.num_shared_layers, names)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # parts an LLM does not have (and the LM head, absent from its state dict when tied to the embeddings)
    new_parts = tuple(
        names[role] + "." for role in ("image_projector", "image_tokenizer", "generation_head", "understanding_head")
    )
    missing = [key for key in missing if not key.startswith(new_parts)]
    if missing or unexpected:
        raise ValueError(
            f"Cannot fork {type(llm).__name__}: its weights do not map onto the Y "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}). Expected a Llama-style causal LM "
            "with `model.embed_tokens`, `model.layers.*`, `model.norm` and `lm_head`."
        )
    tokenizer_part = model.model.image_tokenizer
    (tokenizer_part if isinstance(vq_model, UniForkRQImageTokenizer) else tokenizer_part.vq).load_state_dict(
        vq_model.state_dict()
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.suppress_tokens = [image_token_id]  # image positions are filled, never written

    size = {"height": config.image_size, "width": config.image_size}
    model.processor = UniForkProcessor(
        UniForkImageProcessorPil(size=size), tokenizer, image_seq_length=config.num_image_tokens
    )
    if llm.name_or_path:  # the Hub id or path the LLM was loaded from: the model card's base_model
        model.card_data["base_model"] = llm.name_or_path
    return model


def llm_building_blocks(text_config):
    """The decoder layer, RMSNorm and rotary-embedding classes of the LLM behind `text_config`.

    They are looked up in the transformers module of the LLM's base model (e.g. `Qwen2Model` ->
    `Qwen2DecoderLayer`, `Qwen2RMSNorm`, `Qwen2RotaryEmbedding`), so UniFork runs the LLM's own code.
    """
    model_type = getattr(text_config, "model_type", type(text_config).__name__)
    try:
        base_model_class = MODEL_MAPPING[type(text_config)]
    except KeyError:
        raise ValueError(f"text_config: transformers has no base model for config type {model_type!r}.") from None
    module = sys.modules[base_model_class.__module__]
    layer_names = [name for name in (base_model_class._no_split_modules or []) if name.endswith("DecoderLayer")]
    prefix = layer_names[0].removesuffix("DecoderLayer") if layer_names else None
    classes = [getattr(module, f"{prefix}{suffix}", None) for suffix in ("DecoderLayer", "RMSNorm", "RotaryEmbedding")]
    if prefix is None or None in classes:
        raise ValueError(
            f"text_config: cannot fork a {model_type!r} LLM: UniFork needs a decoder-only LLM built from "
            "`*DecoderLayer`, `*RMSNorm` and `*RotaryEmbedding` modules (Qwen2, Llama, Mistral, Qwen3, ...)."
        )
    return classes


class UniForkForkingMixin:
    """`from_pretrained_llm` for [`UniForkForConditionalGeneration`]."""

    @classmethod
    def from_pretrained_llm(
        cls,
        llm,
        vq_model,
        tokenizer=None,
        num_shared_layers: int | None = None,
        **config_kwargs,
    ):
        """Build a UniFork from a pretrained LLM and VQ tokenizer, the paper's way.

        The LLM's embeddings, layers 0..K-1 (shared), layers K..L-1 with the final norm
        (understanding branch) and LM head are loaded as they are; layers K..L-1 and the final norm
        are copied once more into the generation branch. The image projector and the generation
        head are new. The tokenizer gets the `<image>`, `<begin_of_image>` and `<end_of_image>`
        tokens (and a pad token if it has none); the embeddings grow when the vocabulary must.
        The processor is attached as `model.processor` and saved by `model.save_pretrained`.

        Args:
            llm: a causal LM (`*ForCausalLM`) or the path/Hub id of one. A passed model has its
                embeddings resized in place if the new tokens do not fit.
            vq_model: the image tokenizer: a diffusers `VQModel` or a [`UniForkRQImageTokenizer`] (the paper's
                residual-quantised one), or the path/Hub id of either (saved with `save_pretrained`).
            tokenizer: the LLM's tokenizer; loaded from `llm` when that is a path.
            num_shared_layers: K, the fork point (default L // 2).
            config_kwargs: further [`UniForkConfig`] fields (e.g. `image_size`).

        Example:

        ```python
        >>> model = UniForkForConditionalGeneration.from_pretrained_llm("Qwen/Qwen2.5-0.5B", "path/to/vq")  # doctest: +SKIP
        >>> model.save_pretrained("unifork")  # doctest: +SKIP

        ```
        """
        return fork_llm(cls, llm, vq_model, tokenizer, num_shared_layers, **config_kwargs)


def llm_state_dict_to_y(state: dict, num_shared_layers: int, parts: dict[str, str]) -> dict:
    """A Llama-style causal LM's state dict under the Y's module names (`parts`: the model's `y_part_names()`):
    layer i < K into the shared layers, the others and the final norm into both branches."""
    y = {}
    for name, tensor in state.items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            index = int(index)
            if index < num_shared_layers:
                y[f"{parts['shared_layers']}.{index}.{rest}"] = tensor
            else:
                for branch in ("understanding_layers", "generation_layers"):
                    y[f"{parts[branch]}.{index - num_shared_layers}.{rest}"] = tensor
        elif name.startswith("model.norm."):
            for norm in ("understanding_norm", "generation_norm"):
                y[f"{parts[norm]}.{name.removeprefix('model.norm.')}"] = tensor
        elif name.startswith("model.embed_tokens."):
            y[f"{parts['embeddings']}.{name.removeprefix('model.embed_tokens.')}"] = tensor
        elif name.startswith("lm_head."):
            y[f"{parts['understanding_head']}.{name.removeprefix('lm_head.')}"] = tensor
        else:
            y[name] = tensor  # unexpected: reported by the caller
    return y


def _load(llm, vq_model, tokenizer):
    """The LLM, VQ and tokenizer as objects (loaded where paths were given), checked."""
    from diffusers import VQModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(llm, (str, os.PathLike)):
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(llm)
        llm = AutoModelForCausalLM.from_pretrained(llm)
    if not isinstance(llm, PreTrainedModel):
        raise TypeError(f"llm must be a transformers causal LM or a path to one, got {type(llm).__name__}.")
    if tokenizer is None:
        raise ValueError("Pass the LLM's `tokenizer` (it is only loaded automatically when `llm` is a path).")
    if isinstance(vq_model, (str, os.PathLike)):
        vq_model = _load_image_tokenizer(vq_model)
    if not isinstance(vq_model, (VQModel, UniForkRQImageTokenizer)):
        raise TypeError(
            "vq_model must be a diffusers VQModel, a UniForkRQImageTokenizer or a path to one, "
            f"got {type(vq_model).__name__}."
        )
    return llm, vq_model, tokenizer


def _load_image_tokenizer(path):
    """A saved image tokenizer: a UniForkRQImageTokenizer (its config.json holds an `rq_config`) or a VQModel."""
    import json

    from diffusers import VQModel
    from huggingface_hub import hf_hub_download

    config_file = (
        os.path.join(path, "config.json") if os.path.isdir(path) else hf_hub_download(str(path), "config.json")
    )
    with open(config_file) as f:
        is_rq = "rq_config" in json.load(f)
    return UniForkRQImageTokenizer.from_pretrained(path) if is_rq else VQModel.from_pretrained(path)


def _image_geometry(vq_model, config_kwargs: dict) -> dict:
    """`image_size` and `vq_tile_size` as given, else as the VQ's training recorded them, else the VQ's
    `sample_size` without tiles; says what it chose, as that decides how many tokens an image is."""
    recorded = {
        "image_size": vq_model.config.get(VQ_IMAGE_SIZE_KEY),
        "vq_tile_size": vq_model.config.get(VQ_TILE_SIZE_KEY),
    }
    if config_kwargs.get("image_size") is not None:
        return config_kwargs
    if recorded["image_size"] is None:
        size, source = vq_model.config.sample_size, "the VQ's sample_size: the VQ records no image size"
    else:
        size, source = recorded["image_size"], "as the VQ was trained (train_vq_tokenizer)"
        config_kwargs = {**config_kwargs, "image_size": size}
        config_kwargs.setdefault("vq_tile_size", recorded["vq_tile_size"])
    grid = size // vq_downsampling_factor(vq_model.config)
    logger.warning(
        f"from_pretrained_llm: image_size={size}, vq_tile_size={config_kwargs.get('vq_tile_size')} ({source}): "
        f"images of {grid}x{grid} = {grid * grid} tokens. Pass image_size= and vq_tile_size= to choose."
    )
    return config_kwargs


def _add_image_tokens(tokenizer, llm):
    """Add the image tokens (and a pad token if there is none) to `tokenizer`, growing the LLM's embeddings
    if they do not fit; returns the ids of the image placeholder, begin and end tokens."""
    tokenizer.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else "<|pad|>"
    if len(tokenizer) > llm.config.get_text_config().vocab_size:
        llm.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
