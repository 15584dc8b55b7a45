"""UniFork: a Y-shaped decoder for unified image understanding and generation (arXiv 2506.17202).

    text tokens + image tokens -> embeddings / image projector
        -> shared layers 0..K-1
        -> understanding layers K..L-1 -> understanding_norm -> lm_head          (text)
        -> generation layers K..L-1    -> generation_norm    -> generation_head  (image codes)

The generation head is a linear layer over the codebook for a VQ (one code per image position), or with the
paper's RQ tokenizer a small depth transformer that predicts a position's `depth` residual codes one by one.

The decoder layers, rotary embedding and norm are the source LLM's own classes from transformers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import slice_logits_to_keep

from .checks_unifork import (
    check_image_placeholders,
    check_input_ids,
    check_labels,
    check_one_of_each,
    check_pixel_values,
    check_sequence,
    check_text_labels,
)
from .configuration_unifork import UniForkConfig
from .depth_head_unifork import UniForkDepthHead
from .forking_unifork import UniForkForkingMixin, llm_building_blocks
from .generation_unifork import DEFAULT_IMAGE_GENERATION, UniForkImageGenerationMixin, offloaded_parts_loaded
from .loss_unifork import image_codes_at_positions, shifted_cross_entropy
from .routing_unifork import GENERATION, UNDERSTANDING, merge_paths, select_rows, task_ids
from .saving_unifork import UniForkSavingMixin
from .vq_unifork import image_tokenizer_from_config


@dataclass
class UniForkModelOutputWithPast(ModelOutput):
    """Output of [`UniForkModel`].

    Args:
        last_hidden_state: `(B, T, hidden)`; row b is the output of sample b's own branch, after its norm.
        cache: the cache (one path through the Y: shared layers + one branch).
        hidden_states: with `output_hidden_states`, the embeddings then the output of every layer on
            each sample's path (K shared + L-K branch layers), before the final norm.
        task: `(B,)` task ids (0 understanding, 1 generation).
        image_ids: the image codes of the input images, if any: `(num_images, num_image_tokens)` for a VQ,
            `(num_images, num_image_tokens, depth)` for the RQ tokenizer.
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
        image_logits: image-code logits of the generation samples, position t predicting position t+1's codes:
            `(B_gen, T, codebook_size)` for a VQ; `(B_gen, T, depth, codebook_size)` for the RQ tokenizer, depth d
            given the true codes 0..d-1 of position t+1 (teacher forcing; 0 where t+1 is no image position).
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
        self.linear_1 = nn.Linear(config.code_dim, config.projector_hidden_size)
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

    def forward(
        self, code_vectors: torch.Tensor, code_ids: torch.LongTensor, positions: torch.LongTensor | None = None
    ) -> torch.Tensor:
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
    _no_split_modules = ["UniForkVQImageTokenizer", "UniForkRQImageTokenizer"]
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
        # Units that device maps and FSDP's wrap policy must keep whole: the LLM's layers and the image tokenizer.
        self._no_split_modules = [decoder_layer.__name__, *UniForkPreTrainedModel._no_split_modules]
        num_layers, k = text.num_hidden_layers, config.num_shared_layers
        self.layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * num_layers)

        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size, text.pad_token_id)
        self.image_tokenizer = image_tokenizer_from_config(config.vq_config, config.rq_config, config.vq_tile_size)
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

    def embed_image_codes(self, image_ids: torch.LongTensor, positions: torch.LongTensor | None = None) -> torch.Tensor:
        """Image code ids `(..., n)` (VQ) or `(..., n, depth)` (RQ: a position is the sum of its code vectors) ->
        LLM input embeddings `(..., n, hidden)`; `positions` are the places in the code grid (None: no position
        term, e.g. for a table of every code)."""
        code_vectors = self.image_tokenizer.embed_codes(image_ids).to(self.image_projector.linear_1.weight.dtype)
        return self.image_projector(code_vectors, image_ids, positions)

    def _insert_images(self, input_ids, inputs_embeds, image_ids):
        """Put the projected image codes at the image-placeholder positions of `input_ids`."""
        is_image = check_image_placeholders(input_ids, image_ids, self.config)
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

    def _layer_context(self, input_ids, inputs_embeds, image_ids, attention_mask, position_ids, cache):
        """What every decoder layer needs besides the hidden states: the causal masks (per attention type),
        the rotary position embeddings and the position ids. Checks the inputs against the cache first."""
        batch_size, seq_len = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        if not torch.compiler.is_compiling():  # (reading a static cache's length would break a compiled graph)
            check_sequence(input_ids, image_ids, attention_mask, cache, batch_size, past_length + seq_len, self.config)
        if position_ids is None:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
                # Left padding: positions count real tokens only, as in `generate`.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past_length, past_length + seq_len, device=inputs_embeds.device)[None]
        return {
            "masks": self._causal_masks(inputs_embeds, attention_mask, cache, position_ids),
            "position_embeddings": self.rotary_emb(inputs_embeds, position_ids),
            "position_ids": position_ids,
        }

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
        check_one_of_each(input_ids, inputs_embeds, pixel_values, image_ids)
        if inputs_embeds is None:
            check_input_ids(input_ids, self.config.text_config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if pixel_values is not None:
            check_pixel_values(pixel_values)
            image_ids = self.image_tokenizer.encode(pixel_values)
        if image_ids is not None:
            inputs_embeds = self._insert_images(input_ids, inputs_embeds, image_ids)
        return inputs_embeds, image_ids

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
        task, only_task = task_ids(task, inputs_embeds.shape[0], inputs_embeds.device)
        cache, use_cache = self._prepare_cache(only_task, cache, use_cache)
        context = self._layer_context(input_ids, inputs_embeds, image_ids, attention_mask, position_ids, cache)
        layer_kwargs = {"cache": cache, "use_cache": use_cache, **kwargs}
        states = {"shared": [inputs_embeds], UNDERSTANDING: [], GENERATION: []} if output_hidden_states else {}
        branches = {
            UNDERSTANDING: (self.understanding_layers, self.understanding_norm),
            GENERATION: (self.generation_layers, self.generation_norm),
        }

        # The Y: every sample through the shared layers once, then through its own task's branch only.
        k = self.config.num_shared_layers
        shared = self._run_layers(self.shared_layers, 0, inputs_embeds, context, states.get("shared"), **layer_kwargs)
        if only_task is not None:  # a one-task batch (decoding, single-task training): no row selection
            layers, norm = branches[only_task]
            last_hidden_state = norm(
                self._run_layers(layers, k, shared, context, states.get(only_task), **layer_kwargs)
            )
        else:
            last_hidden_state = torch.empty_like(shared)
            for task_id, (layers, norm) in branches.items():
                rows = (task == task_id).nonzero().squeeze(1)
                out = self._run_layers(
                    layers,
                    k,
                    select_rows(shared, rows),
                    select_rows(context, rows),
                    states.get(task_id),
                    **layer_kwargs,
                )
                last_hidden_state = last_hidden_state.index_copy(0, rows, norm(out))

        hidden_states = merge_paths(states, task) if output_hidden_states else None
        return UniForkModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            cache=cache if use_cache else None,
            hidden_states=hidden_states,
            task=task,
            image_ids=image_ids,
        )


class UniForkForConditionalGeneration(
    UniForkForkingMixin, UniForkSavingMixin, UniForkImageGenerationMixin, UniForkPreTrainedModel, GenerationMixin
):
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
        if config.rq_config is None:  # a VQ: one code per position, a linear head over the codebook
            self.generation_head = nn.Linear(config.text_config.hidden_size, config.codebook_size, bias=False)
        else:
            self.generation_head = UniForkDepthHead.from_config(config)
        self.processor = None  # attached by `from_pretrained` / `from_pretrained_llm`; needed for str prompts
        # Keyword arguments of `build_model_card` (base_model, datasets, eval_results, license, tags, ...)
        # for the README.md that `save_pretrained` / `push_to_hub` write. Not restored by `from_pretrained`.
        self.card_data = {}
        self.post_init()

    def y_parts(self) -> dict[str, nn.Module]:
        """The parts of the Y by role. Freezing stages, LoRA targets, forking an LLM, saving and the model card
        find modules through this table (by object: `y_part_names` reads their names off the model), so
        renaming a module is an edit of its attribute and nothing else."""
        return {
            "embeddings": self.model.embed_tokens,
            "image_tokenizer": self.model.image_tokenizer,
            "image_projector": self.model.image_projector,
            "shared_layers": self.model.shared_layers,
            "understanding_layers": self.model.understanding_layers,
            "understanding_norm": self.model.understanding_norm,
            "understanding_head": self.lm_head,
            "generation_layers": self.model.generation_layers,
            "generation_norm": self.model.generation_norm,
            "generation_head": self.generation_head,
        }

    def y_part_names(self) -> dict[str, str]:
        """The Y's parts by role -> module name, e.g. `"generation_layers"` -> `"model.generation_layers"`."""
        names = {module: name for name, module in self.named_modules()}
        return {role: names[module] for role, module in self.y_parts().items()}

    @offloaded_parts_loaded
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
        logits = self.lm_head(select_rows(hidden_states, und_rows)) if len(und_rows) else None
        image_logits = image_codes = None
        if len(gen_rows):
            image_codes = image_codes_at_positions(input_ids, outputs.image_ids, outputs.last_hidden_state, self.config)
            image_logits = self._image_logits(
                select_rows(hidden_states, gen_rows), image_codes, gen_rows, logits_to_keep
            )

        loss = loss_understanding = loss_generation = None
        if labels is not None:
            check_labels(labels, outputs.last_hidden_state, logits)
            totals, counts = [], []
            if logits is not None:
                und_labels = select_rows(labels, und_rows)
                check_text_labels(und_labels, logits.shape[-1])
                total, count = shifted_cross_entropy(logits, und_labels)
                loss_understanding = total / count.clamp(min=1)
                totals.append(total), counts.append(count)
            if image_logits is not None:
                unlabelled = (labels == -100).view(*labels.shape, *[1] * (image_codes.ndim - 2))
                gen_targets = select_rows(image_codes.masked_fill(unlabelled, -100), gen_rows)
                total, count = shifted_cross_entropy(image_logits, gen_targets, self.config.image_depth_loss_weights)
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

    def _image_logits(self, hidden_states, image_codes, rows, logits_to_keep):
        """The generation head on the generation rows; the depth head is teacher-forced with the codes of the
        position each place predicts (the next)."""
        if self.config.rq_config is None:
            return self.generation_head(hidden_states)
        next_codes = nn.functional.pad(image_codes[:, 1:], (0, 0, 0, 1), value=-100)  # the last place has none
        next_codes = select_rows(slice_logits_to_keep(next_codes, logits_to_keep), rows)
        return self.generation_head.teacher_forced(hidden_states, next_codes, self.model.image_tokenizer.codebook)


__all__ = [
    "DEFAULT_IMAGE_GENERATION",
    "UniForkModel",
    "UniForkForConditionalGeneration",
    "UniForkPreTrainedModel",
]
