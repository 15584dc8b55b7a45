"""Image generation for UniFork: the sampling loop over the generation path of the Y.

`UniForkImageGenerationMixin.generate_image` tokenizes prompts with the processor, prefills them, then samples
one image position per cached forward (a VQ code, or several with speculative Jacobi decoding; with the RQ tokenizer
the depth head's `depth` codes), with classifier-free guidance and transformers' logits warpers, and decodes the
codes to pixels with the model's image tokenizer. The mixin needs of the model
only `model` (the backbone: `embed_image_codes`, `image_projector`, `image_tokenizer`, `layer_types`),
`generation_head`, `config`, `generation_config` and `processor`.
"""

import contextlib
import functools
import itertools
import weakref

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AttentionInterface, CompileConfig
from transformers.cache_utils import StaticCache
from transformers.generation.logits_process import (
    ClassifierFreeGuidanceLogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .packing_unifork import PackedLinears, weights_fingerprint

# What `generate_image` samples with when neither the call nor the checkpoint's
# `generation_config.image_generation` says otherwise: the usual settings of large autoregressive image
# models (Janus, LlamaGen). Small models trained from scratch often want less guidance and a lower
# temperature: their training recipes write what they measured into the checkpoint.
DEFAULT_IMAGE_GENERATION = {"guidance_scale": 5.0, "temperature": 1.0, "top_k": None, "top_p": None}

# Each model's packed generation-path weights for eager decoding on CPU (`_packed_generation_path`). Held beside the
# model, not in it, so that copying, pickling or saving a model never meets oneDNN's opaque tensors.
_PACKED_LINEARS = weakref.WeakKeyDictionary()


def one_token_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention, with its eager path for a one-token query (`pack_gqa`: the query heads of one
    key/value head attend as one group of rows, and the cache is read as it is) also under `torch.compile`, where
    transformers copies the whole cache to every query head instead (`repeat_kv`). Compiled decoding on CPU runs with
    it, as attention implementation "unifork_one_token_sdpa" (`_decoding_attention`)."""
    if query.shape[2] != 1 or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    output = nn.functional.scaled_dot_product_attention(
        pack_gqa(query, groups), key, value, attn_mask=pack_gqa(attention_mask, groups), scale=scaling
    )
    return output.reshape(query.shape).transpose(1, 2).contiguous(), None


AttentionInterface.register("unifork_one_token_sdpa", one_token_sdpa)
AttentionMaskInterface.register("unifork_one_token_sdpa", sdpa_mask)


def _draw_device(generator, device):
    """Where draws happen: on the generator's device, so that (as in diffusers) a CPU generator seeds a model on the
    GPU and the same seed draws the same codes from the same probabilities wherever the model runs."""
    first = generator[0] if isinstance(generator, (list, tuple)) else generator
    return device if first is None else first.device


def _multinomial(probs, generator, rows_per_image=1):
    """One draw per row of `probs`; with a list of generators (one per image), each image's rows use its own."""
    there = probs.to(_draw_device(generator, probs.device))  # one copy per step, not one per image
    if isinstance(generator, (list, tuple)):
        rows = there.split(rows_per_image)
        draws = torch.cat([torch.multinomial(r, 1, generator=g) for r, g in zip(rows, generator)])
    else:
        draws = torch.multinomial(there, 1, generator=generator)
    return draws.squeeze(1).to(probs.device)


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


def _next_drafts(probs, accepted: int, num_drafts: int, generator):
    """Jacobi's next window: `num_drafts` codes per image for the places after the last kept code, drawn from
    the distributions this forward already computed for them (`probs` past the `accepted` drafts) and, past
    those, from its last one (any proposal keeps the codes exact; this is the nearest one computed).
    Returns the drafts `(num_images, num_drafts)` and what each was drawn from."""
    if not num_drafts:
        return probs.new_empty((probs.shape[0], 0), dtype=torch.long), probs[:, :0]
    known = probs[:, accepted + 1 : accepted + 1 + num_drafts]
    draft_probs = torch.cat([known, probs[:, -1:].expand(-1, num_drafts - known.shape[1], -1)], 1)
    drafts = _multinomial(draft_probs.flatten(0, 1), generator, rows_per_image=num_drafts)
    return drafts.view(probs.shape[0], num_drafts), draft_probs


def _uniform(shape, generator, device):
    """Uniform [0, 1) draws of `(num_images, n)` on `device`; with a list of generators, row i from generator i."""
    there = _draw_device(generator, device)
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(shape[1:], generator=g, device=there) for g in generator]).to(device)
    return torch.rand(shape, generator=generator, device=there).to(device)


def _check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    """The prompts and their negative prompts as lists of equal length."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r}.")
    if negative_prompt is None or isinstance(negative_prompt, str):
        return list(prompts), [negative_prompt or ""] * len(prompts)
    negatives = list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts.")
    return list(prompts), negatives


def _check_decoding_options(num_images_per_prompt, jacobi_window, compile, max_batch_size) -> None:
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}.")
    if jacobi_window is not None and (not isinstance(jacobi_window, int) or jacobi_window < 1):
        raise ValueError(f"jacobi_window must be None or a positive int, got {jacobi_window!r}.")
    if not isinstance(compile, (bool, CompileConfig)):
        raise TypeError(f"compile must be a bool or a transformers CompileConfig, got {compile!r}.")
    if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be None or a positive int, got {max_batch_size!r}.")


def _check_generator(generator, num_images: int) -> None:
    if isinstance(generator, (list, tuple)) and len(generator) != num_images:
        raise ValueError(f"generator is a list of {len(generator)}, but {num_images} images are generated.")
    generators = generator if isinstance(generator, (list, tuple)) else [] if generator is None else [generator]
    if not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError(
            f"generator must be None, a torch.Generator or a list of them (one per image), got {generator!r}."
        )


# The arguments of `generate_image` that `generate(..., generation_mode="image")` passes on.
IMAGE_GENERATE_ARGUMENTS = (
    "negative_prompt",
    "guidance_scale",
    "temperature",
    "top_k",
    "top_p",
    "generator",
    "max_batch_size",
    "progress_bar",
    "jacobi_window",
    "compile",
)


def offloaded_parts_loaded(method):
    """accelerate's offload hooks (`from_pretrained(device_map=..., offload_folder=...)`) load a module's weights
    only while its forward runs. Generation reads the VQ codebook and the image projector's tables outside
    their forwards, so those (small) parts are loaded for the whole call; the decoder layers and heads are
    called through their forwards and stay offloaded between uses."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not hasattr(self, "_hf_hook"):  # not dispatched by accelerate: nothing is offloaded
            return method(self, *args, **kwargs)
        parts = (self.model.image_tokenizer, self.model.image_projector)
        hooked = [
            m for part in parts for m in part.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)
        ]
        for module in hooked:
            module._hf_hook.pre_forward(module)
            module._hf_hook.offload = False  # their own forwards inside the call keep them loaded
        try:
            return method(self, *args, **kwargs)
        finally:
            for module in hooked:
                module._hf_hook.offload = True
                module._hf_hook.post_forward(module, None)

    return wrapper


class UniForkImageGenerationMixin:
    """`generate_image` and its sampling loop, for [`UniForkForConditionalGeneration`]."""

    input_modalities = ("image", "text")
    output_modalities = ("image", "text")  # `generate(..., generation_mode="image")`, the any-to-any pipeline

    @property
    def processor(self):
        """The processor `generate_image` tokenizes text prompts and decodes images with (None until attached).
        Attaching one gives it the model's image tokenizer, the one copy of it, in place of its own."""
        return self.__dict__.get("_processor")

    @processor.setter
    def processor(self, processor):
        if processor is not None:
            processor.image_tokenizer = self.model.image_tokenizer
        self.__dict__["_processor"] = processor

    def require_processor(self):
        """`model.processor`, or a ValueError saying how to attach one."""
        if self.processor is None:
            raise ValueError(
                "generate_image with text prompts needs a processor to tokenize them. Load a checkpoint that "
                "contains one (model and processor saved to the same directory), or attach it: "
                "`model.processor = UniForkProcessor.from_pretrained(path)` (or `AutoProcessor.from_pretrained`)."
            )
        return self.processor

    @property
    def device(self) -> torch.device:
        """Where the model computes: accelerate's execution device when weights are offloaded (they then sit on
        the meta device between uses), else the parameters' device."""
        device = getattr(getattr(self, "_hf_hook", None), "execution_device", None)
        return torch.device(device) if device is not None else super().device

    @torch.no_grad()
    @offloaded_parts_loaded
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
        callback=None,
    ):
        """Generate images from text prompts with the generation branch, a KV cache and batched CFG.

        Each step runs the conditional and the unconditional (empty or negative prompt) sequences as
        one batch, mixes their logits as `uncond + guidance_scale * (cond - uncond)`, then samples
        with temperature / top-k / top-p (transformers' logits processors). With the RQ tokenizer the
        depth head draws a position's codes one depth after another, with the same guidance and warpers
        at every depth; both sequences go on with the conditional draw.

        The sampling settings left as None come from the checkpoint: `generation_config.image_generation`
        (a dict that training recipes write, since the settings that work depend on the model), then
        `DEFAULT_IMAGE_GENERATION` (guidance 5.0, temperature 1.0, no top-k, no top-p). See
        [`image_generation_settings`].

        On CPU, eager or compiled, the generation path's large float32 linears run on a copy of their weights
        packed once for oneDNN (`packing_unifork.PackedLinears`; 1.4-3x faster matmuls at decoding's few rows).
        The copy is kept for later calls while the weights stay the same and costs their size in memory
        (~400 MB at ~100M parameters on the generation path).

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
                (code ids: `(N, num_image_tokens)` for a VQ, `(N, num_image_tokens, depth)` for the RQ tokenizer).
            max_batch_size: at most this many images per forward batch (before doubling for CFG).
            jacobi_window: speculative Jacobi decoding: each forward verifies up to `jacobi_window - 1`
                drafted codes and keeps the accepted ones, so an image takes fewer forwards; the codes
                are distributed as without it (greedy `top_k=1` gives the same codes). Images of one
                batch advance together, so with it an image depends on the rest of its batch even
                with one generator per image. None (default) decodes one code per forward.
            compile: run the decoding steps through `torch.compile` (the prompt's prefill stays eager).
                True picks a config for the device: on CPU, inductor without weight freezing, the linears kept
                as one call each on their packed weights (below), attention reading the KV cache in place
                (`one_token_sdpa`); elsewhere transformers' default
                `CompileConfig` (CUDA graphs). Or pass a `CompileConfig`. The first call of a batch size
                compiles (torch caches the result on disk, so later processes start faster); later calls
                reuse it. A config with `freezing` bakes the weights into the compiled code: a change to them
                (training, merging an adapter) is then detected and compiles again.
            callback: called after every decoding step as `callback(n, codes)`, with `codes` the
                `(batch, n)` codes sampled so far of the batch being decoded (see `max_batch_size`).

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
        prompts, negatives = _check_prompts(prompt, negative_prompt)
        if output_type not in ("pil", "pt", "tokens"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'tokens', got {output_type!r}.")
        settings = self.image_generation_settings(
            guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p
        )
        guidance_scale, temperature, top_k, top_p = (settings[key] for key in DEFAULT_IMAGE_GENERATION)
        _check_decoding_options(num_images_per_prompt, jacobi_window, compile, max_batch_size)
        if (jacobi_window or 1) > 1 and "sliding_attention" in self.model.layer_types:
            # rejected drafts are undone by rewinding the cache, which a sliding window may already have evicted past
            raise NotImplementedError("jacobi_window needs full-attention layers; this model has sliding-window ones.")
        if (jacobi_window or 1) > 1 and self.config.rq_config is not None:
            raise NotImplementedError(
                f"jacobi_window drafts one code per position; this model draws {self.config.image_depth} residual codes "
                "per position with its depth head (RQ tokenizer). Leave jacobi_window at None."
            )
        processor = self.require_processor()

        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        _check_generator(generator, len(prompts))
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
        rows = min(batch, len(prompts)) * (1 + guided)
        with self._packed_generation_path(rows, compile), self._decoding_attention(compile):
            for start in chunks:
                stop = start + batch
                texts = prompts[start:stop] + (negatives[start:stop] if guided else [])
                inputs = processor.image_generation_inputs(texts, return_tensors="pt").to(self.device)
                generators = generator[start:stop] if isinstance(generator, (list, tuple)) else generator
                codes.append(
                    self._sample_image_tokens(
                        inputs.input_ids,
                        inputs.attention_mask,
                        processors,
                        generators,
                        steps,
                        guided=guided,
                        window=jacobi_window or 1,
                        compile=compile,
                        callback=callback,
                    )
                )
        steps.close()
        codes = torch.cat(codes)
        if output_type == "tokens":
            return codes
        return processor.decode_image_tokens(codes, output_type)

    def generate(self, inputs=None, generation_mode: str = "text", **kwargs):
        """transformers' `generate`, for text (answers). With `generation_mode="image"` (as Janus's), the
        prompts in `input_ids` are drawn instead: returns `(B * num_return_sequences, num_image_tokens)` VQ
        code ids; `model.decode_image_tokens` / `processor.decode_image_tokens` make pictures of them. The
        image path takes `generate_image`'s sampling arguments (`guidance_scale`, `temperature`, `top_k`,
        `top_p`, `generator`, ...), the checkpoint's settings for those left out, and ignores text-only
        ones such as `max_new_tokens`. This is what `pipeline("any-to-any", model=...)` calls.

        Example:

        ```python
        >>> import torch, unifork_hf
        >>> from unifork_hf import UniForkForConditionalGeneration
        >>> model = UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
        >>> inputs = model.processor(text=["a large red circle at the top left"], return_tensors="pt")
        >>> codes = model.generate(**inputs, generation_mode="image", generator=torch.Generator().manual_seed(0))
        >>> codes.shape, model.processor.decode_image_tokens(codes)[0].size
        (torch.Size([1, 64]), (32, 32))

        ```
        """
        if generation_mode == "text":
            return super().generate(inputs, **kwargs)
        if generation_mode != "image":
            raise ValueError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}.")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError(
                "generation_mode='image' needs `input_ids` of shape (batch, length): the tokenized prompts."
            )
        mask = kwargs.pop("attention_mask", None)
        mask = torch.ones_like(input_ids) if mask is None else mask
        # the prompts as text: generate_image wraps each in the chat turn that asks for an image
        rows = [ids[keep.bool()] for ids, keep in zip(input_ids, mask)]  # without padding (id 0 need not be special)
        prompts = self.require_processor().batch_decode(rows, skip_special_tokens=True)
        config = kwargs.pop("generation_config", None)
        count = kwargs.pop("num_return_sequences", None) or getattr(config, "num_return_sequences", None) or 1
        wanted = {key: kwargs[key] for key in IMAGE_GENERATE_ARGUMENTS if key in kwargs}
        return self.generate_image(
            [p.strip() for p in prompts], num_images_per_prompt=count, output_type="tokens", **wanted
        )

    def decode_image_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """VQ code ids `(B, num_image_tokens)` -> images `(B, 3, H, W)` in [0, 1] (as Janus's, for the pipeline)."""
        return self.require_processor().decode_image_tokens(image_tokens, output_type="pt")

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
            raise ValueError(
                f"guidance_scale must be a finite number >= 1 (1 disables guidance){where}, got {guidance!r}."
            )
        if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number > 0{where}, got {temperature!r}.")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0 (0: off){where}, got {top_k!r}.")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or in (0, 1] (1: off){where}, got {top_p!r}.")
        return settings

    def _sample_image_tokens(
        self,
        input_ids,
        attention_mask,
        processors,
        generator,
        progress,
        guided=False,
        window=1,
        compile=False,
        callback=None,
    ):
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
        num_images = input_ids.shape[0] // 2 if guided else input_ids.shape[0]  # guided: then the unconditional rows
        num_tokens, codebook_size = self.config.num_image_tokens, self.config.codebook_size
        input_ids, attention_mask, compiled_forward, cache = self._decoding_setup(input_ids, attention_mask, compile)
        # every step gets the whole mask: places past the cache's length are masked as the future
        full_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], num_tokens))], 1)
        prompt_positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        first_image_position = prompt_positions[:, -1:] + 1  # of image token 0, per row (left padding)
        depth_head = self.config.rq_config is not None  # RQ: `depth` codes per position, drawn by the depth head
        # A VQ code's input embedding (codebook vector through the projector), computed once for every code.
        code_embeddings = (
            None if depth_head else self.model.embed_image_codes(torch.arange(codebook_size, device=self.device))
        )
        codes = input_ids.new_empty((num_images, num_tokens, *([self.config.image_depth] if depth_head else [])))
        drafts = codes[:, :0]  # codes proposed for the places after the last sampled one
        draft_probs = torch.empty((num_images, 0, codebook_size), device=self.device)  # what each was drawn from

        n = 0  # positions sampled so far
        step_inputs = {"input_ids": input_ids, "position_ids": prompt_positions}
        while n < num_tokens:
            num_drafts = drafts.shape[1]
            # the distributions of places n .. n + num_drafts: (num_images, num_drafts + 1, codebook)
            # (the prefill, and Jacobi's shorter last windows, run eagerly: a compiled step has one shape)
            forward = compiled_forward if n > 0 and num_drafts + 1 == window else self._generation_step
            output = forward(step_inputs, full_mask, cache, num_drafts + 1)
            if depth_head:
                accepted, next_codes = 0, self._sample_position_codes(output[:, -1], processors, generator, guided)
            else:
                scores = output.float().flatten(0, 1)
                history = codes[:, :n] if not num_drafts else codes.new_empty((scores.shape[0] // (1 + guided), 0))
                for processor in processors:  # (not LogitsProcessorList: it inspects signatures every call)
                    scores = processor(history, scores)
                probs = scores.softmax(-1).view(num_images, num_drafts + 1, codebook_size)
                accepted, next_codes = _verify_drafts(probs, drafts, draft_probs, generator)
            codes[:, n : n + accepted] = drafts[:, :accepted]
            codes[:, n + accepted] = next_codes
            n += accepted + 1
            progress.update(num_images * (accepted + 1))
            if callback is not None:
                callback(n, codes[:, :n])
            if n == num_tokens:
                break

            # Roll the cache back to the codes kept (the last one is fed next), then draft the next window.
            if num_drafts > accepted:
                cache.crop(-(num_drafts - accepted))  # static layers: the next forward overwrites those slots
            if window > 1:
                drafts, draft_probs = _next_drafts(probs, accepted, min(window, num_tokens - n) - 1, generator)
            fed = torch.cat([codes[:, n - 1 : n], drafts], 1)
            places = torch.arange(n - 1, n + drafts.shape[1], device=self.device)
            embeds = self._embed_fed_codes(fed, places, code_embeddings)
            step_inputs = {
                "inputs_embeds": torch.cat([embeds, embeds]) if guided else embeds,
                "position_ids": first_image_position + places,
            }
        return codes

    def _embed_fed_codes(self, fed, places, code_embeddings):
        """The input embeddings of the codes fed next, at their places in the code grid: a VQ's from the table of
        every code's embedding (`code_embeddings`), plus the place's; an RQ position's from its codes' vectors."""
        if code_embeddings is None:
            return self.model.embed_image_codes(fed, places)
        grid_embeddings = self.model.image_projector.position_embeddings
        embeds = code_embeddings[fed]
        return embeds if grid_embeddings is None else embeds + grid_embeddings[places]

    def _decoding_setup(self, input_ids, attention_mask, compile):
        """The prompts (left-padded further when compiled), the step function and the `StaticCache` it fills."""
        num_tokens, prompt_length = self.config.num_image_tokens, input_ids.shape[1]
        max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        if max_positions is not None and prompt_length + num_tokens > max_positions:
            raise ValueError(
                f"The prompt ({prompt_length} tokens) plus {num_tokens} image tokens is longer "
                f"than the model's max_position_embeddings ({max_positions}); shorten the prompt."
            )
        if not compile:
            cache = StaticCache(config=self.config.text_config, max_cache_len=prompt_length + num_tokens)
            return input_ids, attention_mask, self._generation_step, cache
        # One compiled step runs with one cache (its tensors' addresses are baked in): left-pad the prompt
        # to a multiple of 64 so that prompts of other lengths reuse both.
        padded_length = min(-(-prompt_length // 64) * 64, max_positions - num_tokens if max_positions else 2**31)
        pad_id = getattr(self.config.text_config, "pad_token_id", None) or 0
        input_ids = nn.functional.pad(input_ids, (padded_length - prompt_length, 0), value=pad_id)
        attention_mask = nn.functional.pad(attention_mask, (padded_length - prompt_length, 0))
        compiled_forward, cache = self._compiled_decoding(compile, input_ids.shape[0], padded_length + num_tokens)
        return input_ids, attention_mask, compiled_forward, cache

    def _generation_step(self, step_inputs, attention_mask, cache, num_positions):
        """One cached forward along the generation path, for the last `num_positions` places: the linear generation
        head's logits, or with the RQ depth head the hidden states it samples from (its loop over depth runs after)."""
        hidden = self.model(
            **step_inputs, attention_mask=attention_mask, cache=cache, use_cache=True, task="generation"
        ).last_hidden_state[:, -num_positions:]
        return hidden if self.config.rq_config is not None else self.generation_head(hidden)

    def _sample_position_codes(self, hidden, processors, generator, guided):
        """The RQ depth head's codes `(num_images, depth)` for one position: at every depth CFG and the warpers on
        its logits, then a draw (one generator per image where given); the unconditional rows go on with the
        conditional rows' codes, as the official sampler does."""
        codebook = self.model.image_tokenizer.codebook.to(hidden.dtype)
        no_history = torch.empty((hidden.shape[0] // (1 + guided), 0), dtype=torch.long, device=hidden.device)

        def pick(logits, depth):
            scores = logits.float()
            for processor in processors:
                scores = processor(no_history, scores)
            chosen = _multinomial(scores.softmax(-1), generator)
            return torch.cat([chosen, chosen]) if guided else chosen

        codes = self.generation_head.sample(hidden, codebook, pick)
        return codes[: codes.shape[0] // 2] if guided else codes

    def _compiled_decoding(self, compile, batch_rows, cache_length):
        """`torch.compile`d `_generation_step` and the `StaticCache` it runs with, reused while the compile
        config and the batch shape stay the same, and for a config that freezes the weights into the compiled code,
        the weights too (`_weights_fingerprint`)."""
        config = self._decoding_compile_config(compile)
        frozen = bool((config.options or {}).get("freezing"))  # else the weights are inputs of the compiled graph
        fingerprint = self._weights_fingerprint() if frozen else None
        key = (config, batch_rows, cache_length, self.device, self.dtype, self.config.text_config._attn_implementation)
        state = getattr(self, "_decoding_state", None)
        if state is None or state["key"] != key or (frozen and not torch.equal(state["fingerprint"], fingerprint)):
            if state is not None:  # drop the compiled code of older weights (it holds a frozen copy of them)
                torch._dynamo.eval_frame.reset_code(self._generation_step.__code__)
            compiled = torch.compile(self._generation_step, **config.to_dict())
            # Dynamo reads `freezing` from inductor's global config when it traces (any call may retrace),
            # so `options` alone does not freeze; and inductor would print every GEMM autotuning table.
            # The patch is built once: entering a ready one costs ~10 us a step, building one ~70.
            patch = torch._inductor.config.patch(
                freezing=frozen,
                autotune_num_choices_displayed=0,
                max_autotune_report_choices_stats=False,
            )

            def forward(*args):
                with patch:
                    return compiled(*args)

            cache = StaticCache(config=self.config.text_config, max_cache_len=cache_length)
            state = self._decoding_state = {"key": key, "fingerprint": fingerprint, "forward": forward, "cache": cache}
        state["cache"].reset()
        return state["forward"], state["cache"]

    def _weights_fingerprint(self):
        """A fingerprint of every parameter and buffer (`weights_fingerprint`), to tell when compiled code with
        frozen weights is out of date."""
        return weights_fingerprint(
            itertools.chain(self.parameters(), self.buffers()), self.__dict__.setdefault("_fingerprint_vectors", {})
        )

    def _packed_generation_path(self, rows: int, compile):
        """A context in which the generation path's large linears run on weights packed for oneDNN (`PackedLinears`:
        2-2.7x faster matmuls on CPU at decoding's `rows`), eager or compiled (`compile`), unless the compile config
        freezes the weights (inductor then packs its own copy). The packed copy is kept for later calls while the
        weights stay the same (checked with a fingerprint, one read of them per call), and packed anew otherwise."""
        config = self._decoding_compile_config(compile) if compile else None
        if config is not None and (config.options or {}).get("freezing"):
            return contextlib.nullcontext()
        parts = (self.model.shared_layers, self.model.generation_layers, self.generation_head)
        packed = _PACKED_LINEARS.get(self)
        if packed is None or not packed.is_current(parts):
            _PACKED_LINEARS.pop(self, None)  # free the old copy before packing anew
            packed = _PACKED_LINEARS[self] = PackedLinears(parts, rows)
        return packed.active(traceable=config is not None)

    @contextlib.contextmanager
    def _decoding_attention(self, compile):
        """A context in which compiled decoding on CPU with SDPA attends with `one_token_sdpa`, which reads the KV
        cache in place; set once per call, not per step. The prefill and any eager step run on it too: for more
        than one token it is transformers' SDPA, for one token transformers' own eager path."""
        text = self.config.text_config
        previous = text._attn_implementation
        if compile and self.device.type == "cpu" and previous == "sdpa":
            text._attn_implementation = "unifork_one_token_sdpa"
        try:
            yield
        finally:
            text._attn_implementation = previous

    def _decoding_compile_config(self, compile):
        """`compile` if a `CompileConfig`; for True the device's default: on CPU inductor without freezing (the linears
        run on `PackedLinears`' weights through one op each), elsewhere transformers' default (CUDA graphs)."""
        if isinstance(compile, CompileConfig):
            return compile
        return CompileConfig(dynamic=False, mode=None) if self.device.type == "cpu" else CompileConfig(dynamic=False)
