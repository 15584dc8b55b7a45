"""UniFork: a Y-shaped decoder for unified image understanding and generation (arXiv 2506.17202).

    text tokens + image tokens -> embeddings / image projector
        -> shared layers 0..K-1
        -> understanding layers K..L-1 -> understanding_norm -> lm_head          (text)
        -> generation layers K..L-1    -> generation_norm    -> generation_head  (VQ codes)

The decoder layers, rotary embedding and norm are the source LLM's own classes from transformers.
"""

import hashlib
import itertools
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoProcessor, CompileConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation.logits_process import (
    ClassifierFreeGuidanceLogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .configuration_unifork import UniForkConfig
from .modelcard_unifork import write_model_card
from .vq_unifork import UniForkVQImageTokenizer


# What `generate_image` samples with when neither the call nor the checkpoint's
# `generation_config.image_generation` says otherwise: the usual settings of large autoregressive image
# models (Janus, LlamaGen). Small models trained from scratch often want less guidance and a lower
# temperature: their training recipes write what they measured into the checkpoint.
DEFAULT_IMAGE_GENERATION = {"guidance_scale": 5.0, "temperature": 1.0, "top_k": None, "top_p": None}

# Task ids of the per-sample selector `task`.
UNDERSTANDING = 0
GENERATION = 1
TASKS = {"understanding": UNDERSTANDING, "generation": GENERATION}


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


def task_ids(task, batch_size: int, device) -> tuple[torch.Tensor, int | None]:
    """Normalise a task selector (None, "understanding"/"generation", a list of them, or 0/1 ids) to `(B,)`
    ids, and the batch's task if all its samples have the same one (else None)."""
    if task is None or isinstance(task, (str, int)):  # one task for the batch, known without reading a tensor
        only = UNDERSTANDING if task is None else TASKS.get(task, task)
        if only not in (UNDERSTANDING, GENERATION):
            raise ValueError(f"task must be 'understanding' or 'generation' (or 0/1), got {task!r}.")
        return torch.full((batch_size,), only, dtype=torch.long, device=device), only
    if isinstance(task, (list, tuple)):
        unknown = [t for t in task if isinstance(t, str) and t not in TASKS]
        if unknown:
            raise ValueError(f"task must be 'understanding' or 'generation' (or 0/1), got {unknown[0]!r}.")
        task = torch.tensor([TASKS.get(t, t) for t in task], device=device)
    task = torch.as_tensor(task, device=device).long().reshape(-1)
    if task.numel() == 1 and batch_size != 1:
        task = task.expand(batch_size)
    if task.shape[0] != batch_size:
        raise ValueError(f"task must have one entry per sample ({batch_size}), got {task.shape[0]}.")
    if ((task != UNDERSTANDING) & (task != GENERATION)).any():
        raise ValueError(f"task ids must be {UNDERSTANDING} (understanding) or {GENERATION} (generation).")
    first = int(task[0])
    return task, first if bool((task == first).all()) else None


def _multinomial(probs, generator, rows_per_image=1):
    """One draw per row of `probs`; with a list of generators (one per image), each image's rows use its own."""
    if isinstance(generator, (list, tuple)):
        rows = probs.split(rows_per_image)
        return torch.cat([torch.multinomial(r, 1, generator=g).squeeze(1) for r, g in zip(rows, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _verify_drafts(probs, drafts, draft_probs, generator):
    """Speculative sampling's test of drafted codes, for a batch that advances together.

    `probs` `(B, d + 1, V)`: the model's distributions at the d drafted places and the one after;
    `drafts` `(B, d)`, drawn from `draft_probs` `(B, d, V)`. A draft x is accepted with probability
    min(1, p(x) / q(x)); every image keeps `accepted` = the fewest leading drafts any image accepted,
    plus `next_codes` `(B,)` at the place after: the image's own draft if it accepted that too, else a
    draw from max(0, p - q) (rejected) or from p (no draft left). Each kept code is distributed as p.
    """
    num_drafts = drafts.shape[1]
    if not num_drafts:
        return 0, _multinomial(probs[:, 0], generator)
    p = probs[:, :num_drafts].gather(-1, drafts[..., None]).squeeze(-1)
    q = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    passed = (_uniform(p.shape, generator, probs.device) * q < p).long().cumprod(1).sum(1)
    accepted = int(passed.min())
    if accepted == num_drafts:  # all accepted: the last distribution gives one more code
        return accepted, _multinomial(probs[:, accepted], generator)
    residual = (probs[:, accepted] - draft_probs[:, accepted]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, probs[:, accepted])
    return accepted, torch.where(passed > accepted, drafts[:, accepted], _multinomial(residual, generator))


def _uniform(shape, generator, device):
    """Uniform [0, 1) draws of `(num_images, n)`; with a list of generators, row i from generator i."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in generator])
    return torch.rand(shape, generator=generator, device=device)


def _select_rows(value, rows: torch.Tensor):
    """The given samples of per-sample tensors, in dicts/tuples.

    Batch-1 broadcast tensors, None, and tensors when `rows` are all of them (`rows` is always sorted and
    unique) pass through as they are.
    """
    if isinstance(value, dict):
        return {key: _select_rows(item, rows) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_select_rows(item, rows) for item in value)
    if isinstance(value, torch.Tensor) and value.shape[0] not in (1, rows.numel()):
        return value.index_select(0, rows)
    if value is not None and not isinstance(value, torch.Tensor):
        raise ValueError(f"A batch mixing both tasks cannot split a {type(value).__name__} attention mask.")
    return value


@dataclass
class UniForkModelOutputWithPast(ModelOutput):
    """Output of [`UniForkModel`].

    Args:
        last_hidden_state: `(B, T, hidden)`; row b is the output of sample b's own branch, after its norm.
        cache: the cache (one path through the Y: shared layers + one branch).
        hidden_states: with `output_hidden_states`, the embeddings then the output of every layer on
            each sample's path (K shared + L-K branch layers), before the final norm.
        task: `(B,)` task ids (0 understanding, 1 generation).
        image_ids: `(num_images, num_image_tokens)` VQ codes of the input images, if any.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    task: torch.LongTensor | None = None
    image_ids: torch.LongTensor | None = None


@dataclass
class UniForkCausalLMOutputWithPast(ModelOutput):
    """Output of [`UniForkForConditionalGeneration`].

    Args:
        loss: token-mean cross-entropy over all labelled tokens of both tasks.
        loss_understanding / loss_generation: the same restricted to one task (None when absent).
        logits: text logits `(B_und, T, vocab)` of the understanding samples, in batch order.
        image_logits: image-code logits `(B_gen, T, codebook_size)` of the generation samples.
    """

    loss: torch.FloatTensor | None = None
    loss_understanding: torch.FloatTensor | None = None
    loss_generation: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    task: torch.LongTensor | None = None
    image_ids: torch.LongTensor | None = None


class UniForkImageProjector(nn.Module):
    """Code vector -> LLM embedding: Linear -> GELU -> Linear (the paper's MLP projector).

    With `config.learn_image_code_embeddings` a trainable per-code table (`code_embeddings`, zero at
    initialisation) is added to the projection, so training can give each code the meaning a small
    VQ's vectors lack, as a language model's token embeddings do (Janus learns such a table too).
    With `config.learn_image_position_embeddings` a trainable per-grid-cell table (`position_embeddings`,
    zero at initialisation) is added too: each image token then knows where in the image it is.
    """

    def __init__(self, config: UniForkConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vq_config["vq_embed_dim"], config.projector_hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.projector_hidden_size, config.text_config.hidden_size)
        # a plain Parameter, not an nn.Embedding: transformers then hands this module to `_init_weights`
        self.code_embeddings = (
            nn.Parameter(torch.zeros(config.codebook_size, config.text_config.hidden_size))
            if config.learn_image_code_embeddings
            else None
        )
        self.position_embeddings = (
            nn.Parameter(torch.zeros(config.num_image_tokens, config.text_config.hidden_size))
            if config.learn_image_position_embeddings
            else None
        )

    def forward(self, code_vectors: torch.Tensor, code_ids: torch.LongTensor,
                positions: torch.LongTensor | None = None) -> torch.Tensor:  # fmt: skip
        """`positions`: each code's index in the code grid (raster order); None adds no position term."""
        embeds = self.linear_2(self.act(self.linear_1(code_vectors)))
        if self.code_embeddings is not None:
            embeds = embeds + nn.functional.embedding(code_ids, self.code_embeddings)
        if self.position_embeddings is not None and positions is not None:
            embeds = embeds + nn.functional.embedding(positions, self.position_embeddings)
        return embeds


class UniForkPreTrainedModel(PreTrainedModel):
    config: UniForkConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["UniForkVQImageTokenizer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    # `forward` takes `num_items_in_batch`: Trainer then normalises the loss over the whole
    # accumulated (and distributed) batch, so gradient accumulation and DDP equal one large batch.
    accepts_loss_kwargs = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, UniForkImageProjector):
            # zero: a new model starts as the paper's projector, and training adds what codes need
            for table in (module.code_embeddings, module.position_embeddings):
                if table is not None:
                    init.zeros_(table)


class UniForkModel(UniForkPreTrainedModel):
    """The Y-shaped backbone: embeddings, image projector, shared layers, and the two branches."""

    def __init__(self, config: UniForkConfig):
        super().__init__(config)
        # Hands the attention implementation down to `text_config`; without it the mask builder
        # returns None and attention silently stops being causal.
        config._attn_implementation = config._attn_implementation
        text = config.text_config
        decoder_layer, rms_norm, rotary_embedding = llm_building_blocks(text)
        # Units that device maps and FSDP's wrap policy must keep whole: the LLM's layers and the VQ.
        self._no_split_modules = [decoder_layer.__name__, "UniForkVQImageTokenizer"]
        num_layers, k = text.num_hidden_layers, config.num_shared_layers
        self.layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * num_layers)

        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size, text.pad_token_id)
        self.image_tokenizer = UniForkVQImageTokenizer(config.vq_config, tile_size=config.vq_tile_size)
        self.image_projector = UniForkImageProjector(config)
        self.rotary_emb = rotary_embedding(config=text)
        self.shared_layers = nn.ModuleList([decoder_layer(text, i) for i in range(k)])
        # The branches reuse the layer indices K..L-1: a sample runs through exactly one branch, so
        # a KV cache holds one path through the Y (L layers) and is sized like the source LLM's.
        self.understanding_layers = nn.ModuleList([decoder_layer(text, i) for i in range(k, num_layers)])
        self.understanding_norm = rms_norm(text.hidden_size, eps=text.rms_norm_eps)
        self.generation_layers = nn.ModuleList([decoder_layer(text, i) for i in range(k, num_layers)])
        self.generation_norm = rms_norm(text.hidden_size, eps=text.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embed_image_codes(self, image_ids: torch.LongTensor, positions: torch.LongTensor | None = None) -> torch.Tensor:
        """VQ code ids `(..., n)` -> LLM input embeddings `(..., n, hidden)`; `positions` are the codes'
        places in the code grid (None: no position term, e.g. for a table of every code)."""
        code_vectors = self.image_tokenizer.embed_codes(image_ids).to(self.image_projector.linear_1.weight.dtype)
        return self.image_projector(code_vectors, image_ids, positions)

    def _insert_images(self, input_ids, inputs_embeds, image_ids):
        """Put the projected image codes at the image-placeholder positions of `input_ids`."""
        if input_ids is None:
            raise ValueError("Images (`pixel_values` or `image_ids`) need `input_ids` to locate the image tokens.")
        if self.config.image_token_id is None:
            raise ValueError("Images were given but config.image_token_id is None, so no position of input_ids "
                             "can hold them: build the model with from_pretrained_llm (which adds the image "
                             "tokens to the tokenizer) or set image_token_id, boi_token_id and eoi_token_id.")
        if image_ids.ndim != 2 or image_ids.shape[1] != self.config.num_image_tokens:
            raise ValueError(
                f"image_ids must have shape (num_images, {self.config.num_image_tokens}), got {tuple(image_ids.shape)}."
            )
        is_image = input_ids == self.config.image_token_id
        if int(is_image.sum()) != image_ids.numel():
            raise ValueError(
                f"input_ids hold {int(is_image.sum())} image tokens (id {self.config.image_token_id}) but "
                f"{image_ids.shape[0]} image(s) x {self.config.num_image_tokens} tokens were given: the number of "
                "image placeholders must match the number of images."
            )
        positions = torch.arange(image_ids.shape[1], device=image_ids.device)  # whole images, checked above
        image_embeds = self.embed_image_codes(image_ids, positions).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds)

    def _causal_masks(self, inputs_embeds, attention_mask, cache, position_ids):
        if isinstance(attention_mask, dict):  # e.g. pre-built by `generate` for a static cache
            return attention_mask
        mask_kwargs = {
            "config": self.config.text_config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks

    def _run_layers(self, layers, first_index, hidden_states, context, collect, **layer_kwargs):
        for offset, layer in enumerate(layers):
            hidden_states = layer(
                hidden_states,
                attention_mask=context["masks"][self.layer_types[first_index + offset]],
                position_embeddings=context["position_embeddings"],
                position_ids=context["position_ids"],
                **layer_kwargs,
            )
            if collect is not None:
                collect.append(hidden_states)
        return hidden_states

    def _embed(self, input_ids, inputs_embeds, pixel_values, image_ids):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if pixel_values is not None and image_ids is not None:
            raise ValueError("Pass either pixel_values or image_ids, not both.")
        if inputs_embeds is None:
            if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.ndim != 2 or not input_ids.numel():
                raise ValueError(f"input_ids must be a non-empty (batch, length) tensor of integer token ids, got "
                                 f"dtype {input_ids.dtype} and shape {tuple(input_ids.shape)}.")  # fmt: skip
            vocab_size = self.config.text_config.vocab_size
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(f"input_ids must be in 0..{vocab_size - 1}, got values from {low} to {high}.")
            inputs_embeds = self.embed_tokens(input_ids)
        if pixel_values is not None:
            if not pixel_values.dtype.is_floating_point or not pixel_values.numel():
                raise ValueError(f"pixel_values must be a non-empty float tensor, got dtype {pixel_values.dtype} and "
                                 f"shape {tuple(pixel_values.shape)}.")  # fmt: skip
            if not bool(pixel_values.isfinite().all()) or float(pixel_values.abs().max()) > 1 + 1e-3:
                raise ValueError("pixel_values must be finite numbers in [-1, 1] (what the processor makes of images), "
                                 f"got values from {pixel_values.min().item()} to {pixel_values.max().item()}.")  # fmt: skip
            image_ids = self.image_tokenizer.encode(pixel_values)
        if image_ids is not None:
            inputs_embeds = self._insert_images(input_ids, inputs_embeds, image_ids)
        return inputs_embeds, image_ids

    def _check_inputs(self, input_ids, image_ids, attention_mask, cache, batch_size, total_length):
        if input_ids is not None and image_ids is None and total_length == input_ids.shape[1]:
            if self.config.image_token_id is not None and bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("input_ids contain image tokens but no pixel_values or image_ids were given.")
        max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        if max_positions is not None and total_length > max_positions:
            raise ValueError(
                f"Sequence of {total_length} tokens is longer than the model's max_position_embeddings ({max_positions})."
            )
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            rows, length = attention_mask.shape  # a static cache's mask may cover the whole cache
            if rows != batch_size or length < total_length or (length > total_length and not isinstance(cache, StaticCache)):
                raise ValueError(f"attention_mask must have shape (batch, cached + new tokens) = ({batch_size}, "
                                 f"{total_length}), got {tuple(attention_mask.shape)}.")  # fmt: skip

    def _prepare_cache(self, only_task, cache, use_cache):
        if use_cache is None:
            use_cache = getattr(self.config.text_config, "use_cache", True) and not self.training
            use_cache = use_cache and only_task is not None
        if use_cache and only_task is None:
            raise ValueError("A KV cache holds one path through the Y: use_cache needs a batch of a single task.")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        if cache is not None and only_task is not None:
            # The branches share layer indices, so a cache filled through one cannot go on through the other.
            cache_task = getattr(cache, "unifork_task", None)
            if cache_task not in (None, only_task) and cache.get_seq_length():
                raise ValueError("cache was filled through the other branch of the Y; start a new cache.")
            cache.unifork_task = only_task
        return cache, use_cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_ids: torch.LongTensor | None = None,
        task=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> UniForkModelOutputWithPast:
        r"""
        pixel_values (`(num_images, 3, H, W)`, in [-1, 1]): images, tokenized by the VQ.
        image_ids (`(num_images, num_image_tokens)`): pre-tokenized images (VQ code ids); exclusive with pixel_values.
        task: per-sample task selector: None (all understanding), "understanding"/"generation", a list
            of those, or a `(B,)` tensor of 0 (understanding) / 1 (generation).
        """
        inputs_embeds, image_ids = self._embed(input_ids, inputs_embeds, pixel_values, image_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        task, only_task = task_ids(task, batch_size, inputs_embeds.device)
        cache, use_cache = self._prepare_cache(only_task, cache, use_cache)
        past_length = cache.get_seq_length() if cache is not None else 0
        if not torch.compiler.is_compiling():  # (reading a static cache's length would break a compiled graph)
            self._check_inputs(input_ids, image_ids, attention_mask, cache, batch_size, past_length + seq_len)
        if position_ids is None:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
                # Left padding: positions count real tokens only, as in `generate`.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past_length, past_length + seq_len, device=inputs_embeds.device)[None]
        context = {
            "masks": self._causal_masks(inputs_embeds, attention_mask, cache, position_ids),
            "position_embeddings": self.rotary_emb(inputs_embeds, position_ids),
            "position_ids": position_ids,
        }
        layer_kwargs = {"cache": cache, "use_cache": use_cache, **kwargs}
        shared_states = [inputs_embeds] if output_hidden_states else None
        branch_states = {UNDERSTANDING: [], GENERATION: []} if output_hidden_states else {}

        # The Y: every sample through the shared layers once, then through its own task's branch only.
        k = self.config.num_shared_layers
        shared = self._run_layers(self.shared_layers, 0, inputs_embeds, context, shared_states, **layer_kwargs)
        branches = {
            UNDERSTANDING: (self.understanding_layers, self.understanding_norm),
            GENERATION: (self.generation_layers, self.generation_norm),
        }
        if only_task is not None:  # one-task batch (decoding, length-grouped training): no row selection
            layers, norm = branches[only_task]
            out = self._run_layers(layers, k, shared, context, branch_states.get(only_task), **layer_kwargs)
            last_hidden_state = norm(out)
        else:
            last_hidden_state = torch.empty_like(shared)
            for task_id, (layers, norm) in branches.items():
                rows = (task == task_id).nonzero().squeeze(1)
                out = self._run_layers(
                    layers, k, _select_rows(shared, rows), _select_rows(context, rows), branch_states.get(task_id),
                    **layer_kwargs,
                )  # fmt: skip
                last_hidden_state = last_hidden_state.index_copy(0, rows, norm(out))

        hidden_states = None
        if output_hidden_states:  # per depth, each sample's state on its own path
            hidden_states = list(shared_states)
            for depth in range(len(self.understanding_layers)):
                merged = torch.empty_like(shared)
                for task_id, states in branch_states.items():
                    if states:
                        merged = merged.index_copy(0, (task == task_id).nonzero().squeeze(1), states[depth])
                hidden_states.append(merged)
            hidden_states = tuple(hidden_states)
        return UniForkModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            cache=cache if use_cache else None,
            hidden_states=hidden_states,
            task=task,
            image_ids=image_ids,
        )


class UniForkForConditionalGeneration(UniForkPreTrainedModel, GenerationMixin):
    """UniFork with both heads: text generation through `generate`, image generation through `generate_image`.

    Example:

    ```python
    >>> from unifork_hf import UniForkConfig, UniForkForConditionalGeneration
    >>> model = UniForkForConditionalGeneration(UniForkConfig.from_preset("unifork-tiny"))
    >>> len(model.model.shared_layers), len(model.model.understanding_layers), len(model.model.generation_layers)
    (2, 2, 2)

    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: UniForkConfig):
        super().__init__(config)
        self.model = UniForkModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.generation_head = nn.Linear(config.text_config.hidden_size, config.codebook_size, bias=False)
        self.processor = None  # attached by `from_pretrained` / `from_pretrained_llm`; needed for str prompts
        # Keyword arguments of `build_model_card` (base_model, datasets, eval_results, license, tags, ...)
        # for the README.md that `save_pretrained` / `push_to_hub` write. Not restored by `from_pretrained`.
        self.card_data = {}
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_ids: torch.LongTensor | None = None,
        task=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> UniForkCausalLMOutputWithPast:
        r"""
        labels (`(B, T)`): next-token targets, -100 where no loss is wanted. Understanding samples:
            text token ids. Generation samples: the loss covers the image positions whose label is not
            -100, and the target there is that position's VQ code (so `labels = input_ids` works).
        num_items_in_batch: divide the summed loss by this (labelled tokens of the whole accumulated
            batch, as `Trainer` counts them) instead of this batch's own count.
        See [`UniForkModel.forward`] for the other arguments.

        Example:

        ```python
        >>> import torch
        >>> from unifork_hf import UniForkConfig, UniForkForConditionalGeneration
        >>> model = UniForkForConditionalGeneration(UniForkConfig.from_preset("unifork-tiny"))
        >>> ids = torch.randint(0, 500, (2, 8))
        >>> out = model(input_ids=ids, task=["understanding", "generation"])
        >>> out.logits.shape, out.image_logits.shape
        (torch.Size([1, 8, 512]), torch.Size([1, 8, 64]))

        ```
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_ids=image_ids,
            task=task,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        task = outputs.task
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        und_rows = (task == UNDERSTANDING).nonzero().squeeze(1)
        gen_rows = (task == GENERATION).nonzero().squeeze(1)
        logits = self.lm_head(_select_rows(hidden_states, und_rows)) if len(und_rows) else None
        image_logits = self.generation_head(_select_rows(hidden_states, gen_rows)) if len(gen_rows) else None

        loss = loss_understanding = loss_generation = None
        if labels is not None:
            if labels.shape != outputs.last_hidden_state.shape[:2]:
                raise ValueError(
                    f"labels must have the shape of the input (batch, seq) = "
                    f"{tuple(outputs.last_hidden_state.shape[:2])}, got {tuple(labels.shape)}."
                )
            if logits is not None and logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits at every position: leave logits_to_keep at 0 when training.")
            totals, counts = [], []
            if logits is not None:
                und_labels = _select_rows(labels, und_rows)
                bad = (und_labels != -100) & ((und_labels < 0) | (und_labels >= logits.shape[-1]))
                if bad.any():
                    raise ValueError(
                        f"labels of understanding samples must be text ids in 0..{logits.shape[-1] - 1} or -100."
                    )
                total, count = _shifted_cross_entropy(logits, und_labels)
                loss_understanding = total / count.clamp(min=1)
                totals.append(total), counts.append(count)
            if image_logits is not None:
                gen_targets = _select_rows(self._image_targets(input_ids, outputs.image_ids, labels), gen_rows)
                total, count = _shifted_cross_entropy(image_logits, gen_targets)
                loss_generation = total / count.clamp(min=1)
                totals.append(total), counts.append(count)
            loss = sum(totals) / (num_items_in_batch if num_items_in_batch is not None else sum(counts).clamp(min=1))

        return UniForkCausalLMOutputWithPast(
            loss=loss,
            loss_understanding=loss_understanding,
            loss_generation=loss_generation,
            logits=logits,
            image_logits=image_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            task=task,
            image_ids=outputs.image_ids,
        )

    def _image_targets(self, input_ids, image_ids, labels):
        """Per-position VQ-code targets: the image's code at labelled image positions, -100 elsewhere."""
        targets = torch.full_like(labels, -100)
        if image_ids is None:
            return targets
        is_image = input_ids == self.config.image_token_id
        targets[is_image] = image_ids.reshape(-1).to(targets.dtype)
        return targets.masked_fill(labels == -100, -100)

    # ------------------------------------------------------------------ image generation

    def _require_processor(self):
        if self.processor is None:
            raise ValueError(
                "generate_image with text prompts needs a processor to tokenize them. Load a checkpoint that "
                "contains one (model and processor saved to the same directory), or attach it: "
                "`model.processor = UniForkProcessor.from_pretrained(path)` (or `AutoProcessor.from_pretrained`)."
            )
        return self.processor

    @torch.no_grad()
    def generate_image(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        max_batch_size: int | None = None,
        progress_bar: bool = True,
        jacobi_window: int | None = None,
        compile: bool | CompileConfig = False,
    ):
        """Generate images from text prompts with the generation branch, a KV cache and batched CFG.

        Each step runs the conditional and the unconditional (empty or negative prompt) sequences as
        one batch, mixes their logits as `uncond + guidance_scale * (cond - uncond)`, then samples
        with temperature / top-k / top-p (transformers' logits processors).

        The sampling settings left as None come from the checkpoint: `generation_config.image_generation`
        (a dict that training recipes write, since the settings that work depend on the model), then
        `DEFAULT_IMAGE_GENERATION` (guidance 5.0, temperature 1.0, no top-k, no top-p). See
        [`image_generation_settings`].

        Args:
            prompt: one prompt or a list of prompts.
            negative_prompt: what the unconditional sequence sees (default: an empty prompt).
            guidance_scale: CFG scale; 1 disables guidance (no unconditional sequence is run).
            temperature: softmax temperature (> 0).
            top_k: sample among the k likeliest codes; 0 turns off a checkpoint's top-k.
            top_p: sample among the likeliest codes holding probability p; 1.0 turns off a checkpoint's top-p.
            num_images_per_prompt: images per prompt; images come out prompt by prompt.
            generator: a `torch.Generator`, or one per image: with one per image, every image is the
                same whatever else is in the batch.
            output_type: `"pil"` (list of PIL images), `"pt"` (`(N, 3, H, W)` in [0, 1]) or `"tokens"`
                (`(N, num_image_tokens)` VQ code ids).
            max_batch_size: at most this many images per forward batch (before doubling for CFG).
            jacobi_window: speculative Jacobi decoding: each forward verifies up to `jacobi_window - 1`
                drafted codes and keeps the accepted ones, so an image takes fewer forwards; the codes
                are distributed as without it (greedy `top_k=1` gives the same codes). Images of one
                batch advance together, so with it an image depends on the rest of its batch even
                with one generator per image. None (default) decodes one code per forward.
            compile: run the decoding steps through `torch.compile` (the prompt's prefill stays eager).
                True picks a config for the device: on CPU, inductor with frozen weights and its C++
                GEMM templates (`max_autotune`), which read the weights several times faster than eager
                matmuls at decoding's few rows; elsewhere transformers' default `CompileConfig`. Or pass
                a `CompileConfig`. The first call compiles (a minute or more); later calls with the same
                batch size reuse it, and a change to the weights (training, merging an adapter) is
                detected and compiles again, since frozen weights are baked into the compiled code.

        Example:

        ```python
        >>> import torch, unifork_hf
        >>> from unifork_hf import UniForkForConditionalGeneration
        >>> from unifork_hf.evaluation import detect
        >>> model = UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
        >>> images = model.generate_image(["a large red circle at the top left", "a small blue square at the center"],
        ...                               num_images_per_prompt=2, generator=torch.Generator().manual_seed(0))
        >>> len(images), images[0].size
        (4, (32, 32))
        >>> detect(images[0])  # the Shapes judge reads what was drawn
        [{'colour': 'red', 'shape': 'circle', 'size': 'large', 'position': 'top left'}]

        ```
        """
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r}.")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts.")
        if output_type not in ("pil", "pt", "tokens"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'tokens', got {output_type!r}.")
        settings = self.image_generation_settings(guidance_scale=guidance_scale, temperature=temperature,
                                                  top_k=top_k, top_p=top_p)  # fmt: skip
        guidance_scale, temperature, top_k, top_p = (settings[key] for key in DEFAULT_IMAGE_GENERATION)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}.")
        if jacobi_window is not None and (not isinstance(jacobi_window, int) or jacobi_window < 1):
            raise ValueError(f"jacobi_window must be None or a positive int, got {jacobi_window!r}.")
        if not isinstance(compile, (bool, CompileConfig)):
            raise TypeError(f"compile must be a bool or a transformers CompileConfig, got {compile!r}.")
        if (jacobi_window or 1) > 1 and "sliding_attention" in self.model.layer_types:
            # rejected drafts are undone by rewinding the cache, which a sliding window may already have evicted past
            raise NotImplementedError("jacobi_window needs full-attention layers; this model has sliding-window ones.")
        processor = self._require_processor()

        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
            raise ValueError(f"generator is a list of {len(generator)}, but {len(prompts)} images are generated.")
        if not all(isinstance(g, torch.Generator) for g in (generator if isinstance(generator, (list, tuple)) else
                                                           [] if generator is None else [generator])):  # fmt: skip
            raise TypeError(f"generator must be None, a torch.Generator or a list of them (one per image), got {generator!r}.")
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be None or a positive int, got {max_batch_size!r}.")
        warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1:
            warpers.append(TopPLogitsWarper(top_p))
        guided = guidance_scale != 1
        processors = LogitsProcessorList(
            ([ClassifierFreeGuidanceLogitsProcessor(guidance_scale)] if guided else []) + warpers
        )

        batch = max_batch_size or len(prompts)
        chunks = range(0, len(prompts), batch)
        steps = tqdm(total=len(prompts) * self.config.num_image_tokens, desc="image tokens", disable=not progress_bar)
        codes = []
        for start in chunks:
            stop = start + batch
            texts = prompts[start:stop] + (negatives[start:stop] if guided else [])
            inputs = processor.image_generation_inputs(texts, return_tensors="pt").to(self.device)
            generators = generator[start:stop] if isinstance(generator, (list, tuple)) else generator
            codes.append(self._sample_image_tokens(inputs.input_ids, inputs.attention_mask, processors, generators,
                                                   steps, window=jacobi_window or 1, compile=compile))  # fmt: skip
        steps.close()
        codes = torch.cat(codes)
        if output_type == "tokens":
            return codes
        images = (self.model.image_tokenizer.decode(codes).float() + 1) / 2
        return images if output_type == "pt" else processor.to_pil(images)

    def image_generation_settings(self, **explicit) -> dict:
        """The sampling settings `generate_image` uses: explicit values (not None) over the checkpoint's
        `generation_config.image_generation` over `DEFAULT_IMAGE_GENERATION`, checked.

        Example:

        ```python
        >>> from unifork_hf import UniForkConfig, UniForkForConditionalGeneration
        >>> model = UniForkForConditionalGeneration(UniForkConfig.from_preset("unifork-tiny"))
        >>> model.generation_config.image_generation = {"guidance_scale": 1.0, "temperature": 0.1}
        >>> model.image_generation_settings(temperature=0.5)
        {'guidance_scale': 1.0, 'temperature': 0.5, 'top_k': None, 'top_p': None}

        ```
        """
        unknown = sorted(set(explicit) - set(DEFAULT_IMAGE_GENERATION))
        if unknown:
            raise TypeError(f"Unknown image sampling settings {unknown}; known: {list(DEFAULT_IMAGE_GENERATION)}.")
        saved = getattr(self.generation_config, "image_generation", None) or {}
        if not isinstance(saved, dict) or set(saved) - set(DEFAULT_IMAGE_GENERATION):
            raise ValueError(
                f"generation_config.image_generation must be a dict with keys from {list(DEFAULT_IMAGE_GENERATION)}, "
                f"got {saved!r}."
            )
        settings = {**DEFAULT_IMAGE_GENERATION, **saved, **{k: v for k, v in explicit.items() if v is not None}}
        where = "" if not saved else " (explicitly or in generation_config.image_generation)"
        guidance, temperature, top_k, top_p = (settings[key] for key in DEFAULT_IMAGE_GENERATION)
        if not isinstance(guidance, (int, float)) or not 1 <= guidance < float("inf"):
            raise ValueError(f"guidance_scale must be a finite number >= 1 (1 disables guidance){where}, got {guidance!r}.")
        if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number > 0{where}, got {temperature!r}.")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0 (0: off){where}, got {top_k!r}.")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or in (0, 1] (1: off){where}, got {top_p!r}.")
        return settings

    def _sample_image_tokens(self, input_ids, attention_mask, processors, generator, progress, window=1,
                             compile=False):
        """The decoding loop: prefill the prompts once, then cached forwards along the generation path.

        With `window` > 1 this is speculative Jacobi decoding (Teng et al., 2024, arXiv 2410.01699):
        each forward feeds the last sampled code and `window - 1` drafted codes, verifies each draft
        against the model's distribution with speculative sampling's test (accept a draft `x` drawn
        from `q` with probability `min(1, p(x) / q(x))`, else resample from `max(0, p - q)`), and keeps
        the distributions it computed past the first rejection as the next drafts (the Jacobi step).
        The accepted codes are distributed exactly as one-at-a-time sampling's; a batch advances by
        the fewest any of its images accepted. `window=1` is plain decoding: one code per forward.

        Everything sized by the sequence is allocated once (a `StaticCache`, rolled back past rejected
        drafts; the attention mask; the output codes), and a step runs only the generation path:
        shared layers, generation branch, generation head on the positions that are sampled. With
        `compile`, the steps after the prefill run through `_compiled_decoding`'s compiled step.
        """
        guided = any(isinstance(p, ClassifierFreeGuidanceLogitsProcessor) for p in processors)
        num_images = input_ids.shape[0] // 2 if guided else input_ids.shape[0]
        num_tokens, codebook_size = self.config.num_image_tokens, self.config.codebook_size
        prompt_length = input_ids.shape[1]
        max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        if max_positions is not None and prompt_length + num_tokens > max_positions:
            raise ValueError(
                f"The prompt ({prompt_length} tokens) plus {num_tokens} image tokens is longer "
                f"than the model's max_position_embeddings ({max_positions}); shorten the prompt."
            )
        if compile:
            # One compiled step runs with one cache (its tensors' addresses are baked in): left-pad the prompt
            # to a multiple of 64 so that prompts of other lengths reuse both.
            padded_length = min(-(-prompt_length // 64) * 64, max_positions - num_tokens if max_positions else 2**31)
            pad_id = getattr(self.config.text_config, "pad_token_id", None) or 0
            input_ids = nn.functional.pad(input_ids, (padded_length - prompt_length, 0), value=pad_id)
            attention_mask = nn.functional.pad(attention_mask, (padded_length - prompt_length, 0))
            prompt_length = padded_length
            compiled_forward, cache = self._compiled_decoding(compile, input_ids.shape[0], prompt_length + num_tokens)
        else:
            compiled_forward = self._generation_logits
            cache = StaticCache(config=self.config.text_config, max_cache_len=prompt_length + num_tokens)
        # every step gets the whole mask: places past the cache's length are masked as the future
        full_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], num_tokens))], 1)
        prompt_positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        first_image_position = prompt_positions[:, -1:] + 1  # of image token 0, per row (left padding)
        # Every code's input embedding (VQ codebook vector through the projector), computed once;
        # a fed code adds its grid position's embedding, if the model has them.
        code_embeddings = self.model.embed_image_codes(torch.arange(codebook_size, device=self.device))
        grid_embeddings = self.model.image_projector.position_embeddings
        codes = input_ids.new_empty((num_images, num_tokens))
        drafts = codes.new_empty((num_images, 0))  # codes proposed for the places after the last sampled one
        draft_probs = torch.empty((num_images, 0, codebook_size), device=self.device)  # what each was drawn from

        n = 0  # codes sampled so far
        step_inputs = {"input_ids": input_ids, "position_ids": prompt_positions}
        while n < num_tokens:
            num_drafts = drafts.shape[1]
            # the distributions of places n .. n + num_drafts: (num_images, num_drafts + 1, codebook)
            # (the prefill, and Jacobi's shorter last windows, run eagerly: a compiled step has one shape)
            forward = compiled_forward if n > 0 and num_drafts + 1 == window else self._generation_logits
            scores = forward(step_inputs, full_mask, cache, num_drafts + 1).float().flatten(0, 1)
            history = codes[:, :n] if not num_drafts else codes.new_empty((scores.shape[0] // (1 + guided), 0))
            for processor in processors:  # (not LogitsProcessorList: it inspects signatures every call)
                scores = processor(history, scores)
            probs = scores.softmax(-1).view(num_images, num_drafts + 1, codebook_size)

            accepted, next_codes = _verify_drafts(probs, drafts, draft_probs, generator)
            codes[:, n : n + accepted] = drafts[:, :accepted]
            codes[:, n + accepted] = next_codes
            n += accepted + 1
            progress.update(num_images * (accepted + 1))
            if n == num_tokens:
                break

            # Roll the cache back to the codes kept (the last one is fed next), then draft the next window:
            # the places this forward already has a distribution for sample from it, the rest from its last
            # distribution (any proposal keeps the codes exact; this is the nearest one computed).
            if num_drafts > accepted:
                cache.crop(-(num_drafts - accepted))  # static layers: the next forward overwrites those slots
            num_drafts = min(window, num_tokens - n) - 1
            if num_drafts:
                known = probs[:, accepted + 1 : accepted + 1 + num_drafts]
                last = probs[:, -1:].expand(-1, num_drafts - known.shape[1], -1)
                draft_probs = torch.cat([known, last], 1)
                drafts = _multinomial(draft_probs.flatten(0, 1), generator, rows_per_image=num_drafts)
                drafts = drafts.view(num_images, num_drafts)
            else:
                drafts = codes.new_empty((num_images, 0))

            fed = torch.cat([codes[:, n - 1 : n], drafts], 1)
            places = torch.arange(n - 1, n + num_drafts, device=self.device)
            embeds = code_embeddings[fed]
            if grid_embeddings is not None:  # a code's grid place is its index among the image tokens
                embeds = embeds + grid_embeddings[places]
            step_inputs = {"inputs_embeds": torch.cat([embeds, embeds]) if guided else embeds,
                           "position_ids": first_image_position + places}  # fmt: skip
        return codes

    def _generation_logits(self, step_inputs, attention_mask, cache, num_positions):
        """One cached forward along the generation path -> generation-head logits of the last `num_positions` places."""
        hidden = self.model(**step_inputs, attention_mask=attention_mask, cache=cache, use_cache=True,
                            task=GENERATION).last_hidden_state  # fmt: skip
        return self.generation_head(hidden[:, -num_positions:])

    def _compiled_decoding(self, compile, batch_rows, cache_length):
        """`torch.compile`d `_generation_logits` and the `StaticCache` it runs with, reused while the compile
        config, the batch shape and the weights stay the same (`_weights_fingerprint`)."""
        config = compile if isinstance(compile, CompileConfig) else self._default_decoding_compile_config()
        fingerprint = self._weights_fingerprint()
        key = (config, batch_rows, cache_length, self.device, self.dtype)
        state = getattr(self, "_decoding_state", None)
        if state is None or state["key"] != key or not torch.equal(state["fingerprint"], fingerprint):
            if state is not None:  # drop the compiled code of older weights (it holds a frozen copy of them)
                torch._dynamo.eval_frame.reset_code(self._generation_logits.__code__)
            compiled = torch.compile(self._generation_logits, **config.to_dict())
            # Dynamo reads `freezing` from inductor's global config when it traces (any call may retrace),
            # so `options` alone does not freeze; and inductor would print every GEMM autotuning table.
            # The patch is built once: entering a ready one costs ~10 us a step, building one ~70.
            patch = torch._inductor.config.patch(freezing=bool((config.options or {}).get("freezing")),
                                                 autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)  # fmt: skip

            def forward(*args):
                with patch:
                    return compiled(*args)

            cache = StaticCache(config=self.config.text_config, max_cache_len=cache_length)
            state = self._decoding_state = {"key": key, "fingerprint": fingerprint, "forward": forward, "cache": cache}
        state["cache"].reset()
        return state["forward"], state["cache"]

    @torch.no_grad()
    def _weights_fingerprint(self):
        """One number per parameter and buffer, u^T W v with fixed random u, v (W as rows x columns): any
        change to the content beyond float32 rounding moves it, swapped rows or columns included (a plain
        sum would miss those), at the cost of one read of the weights."""
        vectors = self.__dict__.setdefault("_fingerprint_vectors", {})
        values = []
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            matrix = tensor.detach().reshape(tensor.shape[0] if tensor.ndim else 1, -1).float()
            if matrix.shape not in vectors:
                generator = torch.Generator().manual_seed(sum(matrix.shape) * 1_000_003 + matrix.shape[0])
                vectors[matrix.shape] = tuple(torch.rand(n, generator=generator) + 0.5 for n in matrix.shape)
            u, v = (x.to(matrix.device) for x in vectors[matrix.shape])
            values.append(u @ matrix @ v)
        return torch.stack(values)

    def _default_decoding_compile_config(self):
        if self.device.type == "cpu":
            return CompileConfig(dynamic=False, mode=None, options={"max_autotune": True, "freezing": True})
        return CompileConfig(dynamic=False)

    # ------------------------------------------------------------------ building from an LLM

    @classmethod
    def from_pretrained_llm(
        cls,
        llm,
        vq_model,
        tokenizer=None,
        num_shared_layers: int | None = None,
        **config_kwargs,
    ) -> "UniForkForConditionalGeneration":
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
            vq_model: a diffusers `VQModel` or the path/Hub id of one.
            tokenizer: the LLM's tokenizer; loaded from `llm` when that is a path.
            num_shared_layers: K, the fork point (default L // 2).
            config_kwargs: further [`UniForkConfig`] fields (e.g. `image_size`).

        Example:

        ```python
        >>> model = UniForkForConditionalGeneration.from_pretrained_llm("Qwen/Qwen2.5-0.5B", "path/to/vq")  # doctest: +SKIP
        >>> model.save_pretrained("unifork")  # doctest: +SKIP

        ```
        """
        from diffusers import VQModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .image_processing_unifork import UniForkImageProcessorPil
        from .processing_unifork import UniForkProcessor

        if isinstance(llm, (str, os.PathLike)):
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(llm)
            llm = AutoModelForCausalLM.from_pretrained(llm)
        if not isinstance(llm, PreTrainedModel):
            raise TypeError(f"llm must be a transformers causal LM or a path to one, got {type(llm).__name__}.")
        if tokenizer is None:
            raise ValueError("Pass the LLM's `tokenizer` (it is only loaded automatically when `llm` is a path).")
        if isinstance(vq_model, (str, os.PathLike)):
            vq_model = VQModel.from_pretrained(vq_model)
        if not isinstance(vq_model, VQModel):
            raise TypeError(f"vq_model must be a diffusers VQModel or a path to one, got {type(vq_model).__name__}.")

        special = ["<image>", "<begin_of_image>", "<end_of_image>"]
        tokenizer.add_tokens(special, special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else "<|pad|>"
        if len(tokenizer) > llm.config.get_text_config().vocab_size:
            llm.resize_token_embeddings(len(tokenizer))

        image_token_id, boi_token_id, eoi_token_id = tokenizer.convert_tokens_to_ids(special)
        config = UniForkConfig(
            text_config=llm.config.get_text_config().to_dict(),
            vq_config=dict(vq_model.config),
            num_shared_layers=num_shared_layers,
            image_token_id=image_token_id,
            boi_token_id=boi_token_id,
            eoi_token_id=eoi_token_id,
            **config_kwargs,
        )
        model = cls(config)
        k = config.num_shared_layers
        state = {}
        for name, tensor in llm.state_dict().items():
            if name.startswith("model.layers."):
                index, rest = name.removeprefix("model.layers.").split(".", 1)
                index = int(index)
                if index < k:
                    state[f"model.shared_layers.{index}.{rest}"] = tensor
                else:
                    state[f"model.understanding_layers.{index - k}.{rest}"] = tensor
                    state[f"model.generation_layers.{index - k}.{rest}"] = tensor
            elif name.startswith("model.norm."):
                state[name.replace("model.norm.", "model.understanding_norm.")] = tensor
                state[name.replace("model.norm.", "model.generation_norm.")] = tensor
            else:
                state[name] = tensor  # embeddings and LM head keep their names; anything else is unexpected
        missing, unexpected = model.load_state_dict(state, strict=False)
        new_modules = ("model.image_projector.", "model.image_tokenizer.", "generation_head.", "lm_head.")
        missing = [key for key in missing if not key.startswith(new_modules)]
        if missing or unexpected:
            raise ValueError(
                f"Cannot fork {type(llm).__name__}: its weights do not map onto the Y "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}). Expected a Llama-style causal LM "
                "with `model.embed_tokens`, `model.layers.*`, `model.norm` and `lm_head`."
            )
        model.model.image_tokenizer.vq.load_state_dict(vq_model.state_dict())
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.suppress_tokens = [image_token_id]  # image positions are filled, never written

        size = {"height": config.image_size, "width": config.image_size}
        model.processor = UniForkProcessor(
            UniForkImageProcessorPil(size=size), tokenizer, image_seq_length=config.num_image_tokens
        )
        model.processor.image_tokenizer = model.model.image_tokenizer
        if llm.name_or_path:  # the Hub id or path the LLM was loaded from: the model card's base_model
            model.card_data["base_model"] = llm.name_or_path
        return model

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the model, the attached processor (if any) beside it, and a model card (README.md).

        The card is built from `model.card_data` (see [`build_model_card`]); a README.md already in
        `save_directory` that this package did not generate is left as it is. Everything is written into a
        staging folder inside `save_directory` first and moved in file by file only once all of it was
        written: a failure (a full disk, a bad `card_data`) leaves what was there before as it was. Weight
        files of the other layout (one file vs shards) that a previous save left are removed.
        """
        if not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)
        # push_to_hub=True: save here first, then upload as push_to_hub does (from the complete folder)
        push = kwargs.pop("push_to_hub", False)
        hub_kwargs = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "commit_description", "private",
                                                         "token", "create_pr", "revision", "tags") if key in kwargs}  # fmt: skip
        os.makedirs(save_directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".unifork-saving-", dir=save_directory)  # same filesystem: renames are atomic
        try:
            readme = os.path.join(save_directory, "README.md")
            if os.path.exists(readme):  # the card writer keeps a card the user wrote
                shutil.copy2(readme, staging)
            self._save_all(staging, os.path.basename(os.path.abspath(save_directory)), *args, **kwargs)
            with open(os.path.join(staging, CHECKSUMS_FILE), "w") as f:  # `sha256sum -c` reads it too
                f.writelines(f"{_sha256(os.path.join(staging, name))}  {name}\n"
                             for name in sorted(os.listdir(staging)) if name.endswith(".safetensors"))  # fmt: skip
            written = os.listdir(staging)
            for name in os.listdir(save_directory):
                if _is_weights_file(name) and name not in written:
                    os.remove(os.path.join(save_directory, name))
            for name in sorted(written, key=lambda name: not _is_weights_file(name)):  # weights first, then the rest
                os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if push:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            self.push_to_hub(repo_id, **hub_kwargs)

    def _save_all(self, directory, name, *args, **kwargs):
        # `register_for_auto_class` records one Auto class per model class; list AutoModel too so
        # `AutoModel.from_pretrained(dir, trust_remote_code=True)` also finds the full model.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModel"] = f"modeling_unifork.{type(self).__name__}"
        self.config.auto_map = auto_map
        if getattr(self.generation_config, "image_generation", None):
            # a generation config marked as derived from the model config drops unknown keys when loaded
            self.generation_config._from_model_config = False
        write_model_card(self, directory, repo_id=name)  # first: a bad card_data fails before the weights are written
        super().save_pretrained(directory, *args, **kwargs)
        if self.processor is not None:
            self.processor.save_pretrained(directory)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # Both `push_to_hub` and `save_pretrained(push_to_hub=True)` upload through here, after transformers
        # has put the Hub repo's card (or a placeholder) in README.md: add the processor (not saved yet on
        # the second path) and the UniFork card, unless the Hub's card is the user's own.
        if self.processor is not None:
            self.processor.save_pretrained(working_dir)
        write_model_card(self, working_dir, repo_id=repo_id, keep_tags=True)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a checkpoint; the processor saved beside it, if any, is attached as `model.processor`.

        Raises a `ValueError` when the checkpoint lacks the VQ image tokenizer's weights, and when weights the
        model needs are missing or the checkpoint holds weights the model has no place for (e.g. a config
        whose `num_shared_layers` differs from the one the weights were trained with): transformers would
        only warn and leave those parts randomly initialised. `allow_missing_weights=True` accepts that
        (as for a new head), and `output_loading_info=True` returns transformers' report too.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        allow_missing_weights = kwargs.pop("allow_missing_weights", False)
        verify_weight_checksums(pretrained_model_name_or_path)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing_vq = [key for key in info["missing_keys"] if key.startswith("model.image_tokenizer.")]
        if missing_vq:
            raise ValueError(
                f"Checkpoint {pretrained_model_name_or_path!r} lacks the VQ image tokenizer weights "
                f"({len(missing_vq)} tensors, e.g. {missing_vq[0]!r}); save the model with its image tokenizer."
            )
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if (missing or unexpected) and not allow_missing_weights:
            raise ValueError(
                f"Checkpoint {pretrained_model_name_or_path!r} does not match the model its config describes: "
                f"{len(missing)} weights missing (e.g. {missing[:2]}), {len(unexpected)} unused (e.g. {unexpected[:2]}). "
                "Was the config edited (num_shared_layers, sizes)? Pass allow_missing_weights=True to load anyway "
                "with the missing weights randomly initialised."
            )  # fmt: skip
        model.processor = _load_processor(pretrained_model_name_or_path, kwargs, model.model.image_tokenizer)
        if model.processor is not None:
            _check_processor_matches(model.config, model.processor, pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model


CHECKSUMS_FILE = "weights.sha256"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weight_checksums(directory) -> None:
    """A local checkpoint's weight files against the checksums `save_pretrained` wrote beside them (safetensors
    itself checks only the header: flipped bytes in the data load without a word)."""
    path = os.path.join(str(directory), CHECKSUMS_FILE)
    if not os.path.isfile(path):
        return  # a Hub download (the Hub checks its files) or a checkpoint saved otherwise
    with open(path) as f:
        for line in f:
            expected, name = line.strip().split("  ", 1)
            file = os.path.join(str(directory), name)
            if os.path.exists(file) and _sha256(file) != expected:
                raise ValueError(f"{file} does not match its checksum in {CHECKSUMS_FILE}: the file is corrupted or was "
                                 f"changed after saving. Delete {CHECKSUMS_FILE} to load it anyway.")  # fmt: skip


def _is_weights_file(name: str) -> bool:
    return name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))


def _shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor):
    """Summed next-token cross-entropy (position t predicts label t+1) and the number of labelled tokens."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    total = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total, (shift_labels != -100).sum()


def _check_processor_matches(config, processor, path) -> None:
    """Raise, naming both values, where the saved processor and the model config disagree (e.g. a save that
    failed half way with an older package): prompts would put images where the model does not look."""
    size = processor.image_processor.size
    pairs = [("image_token_id", config.image_token_id, processor.image_token_id),
             ("boi_token_id", config.boi_token_id, processor.boi_token_id),
             ("eoi_token_id", config.eoi_token_id, processor.eoi_token_id),
             ("image tokens per image", config.num_image_tokens, processor.image_seq_length),
             ("image size", (config.image_size, config.image_size), (size["height"], size["width"]))]  # fmt: skip
    for what, in_config, in_processor in pairs:
        if in_config != in_processor:
            raise ValueError(f"Checkpoint {path!r}: the config says {what} {in_config}, the processor {in_processor}. "
                             "Save the model and its processor together (model.save_pretrained) again.")  # fmt: skip
    if len(processor.tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"Checkpoint {path!r}: the tokenizer has {len(processor.tokenizer)} tokens, more than the "
                         f"model's vocab_size {config.text_config.vocab_size}.")  # fmt: skip


def _load_processor(path, kwargs, image_tokenizer):
    """The processor saved with a checkpoint (sharing the model's VQ image tokenizer), or None."""
    from transformers.utils import PROCESSOR_NAME, cached_file

    hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs}
    found = cached_file(
        path,
        PROCESSOR_NAME,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if found is None:
        return None
    return AutoProcessor.from_pretrained(
        path, trust_remote_code=kwargs.get("trust_remote_code"), image_tokenizer=image_tokenizer, **hub_kwargs
    )


__all__ = ["DEFAULT_IMAGE_GENERATION", "UniForkModel", "UniForkForConditionalGeneration", "UniForkPreTrainedModel"]
