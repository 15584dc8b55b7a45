"""Official UniFork / VILA-U weights -> this package's modules, key by key.

The official layouts are described in docs/official/layout.md (read from tliby/UniFork @ 2c5b757). Every official
key is consumed exactly once: mapped to one of ours, or dropped because the official forward never reads it (the
SigLIP text tower, pooling head and unused last layer, the EMA buffers of the codebook, the aliases of the shared
codebook, which must equal its first copy). A key that is neither, or one of ours left without a source, raises an
error that names it.
"""

import glob
import json
import os
import re

import torch
from safetensors.torch import load_file

# Official tensors the official forward never reads (regexes on the key without its tower prefix).
UNUSED_TOKENIZER_KEYS = (
    r"(siglip_model\.)?logit_(scale|bias)",
    r"siglip_model\.text_model\..*",
    r"siglip_model\.vision_model\.head\..*",
    r"quantizer\.codebooks\.\d+\.(cluster_size_ema|embed_ema)",
)
TOKENIZER_PREFIXES = ("model.vision_tower.vision_tower.rqvaesiglip.", "rqvaesiglip.", "")


def _decoder_key(key: str, num_levels: int) -> str | None:
    """A taming decoder key (`decoder.up.4.block.0.norm1.weight`) -> diffusers' `Decoder` key, or None."""
    for pattern, replacement in (
        (r"decoder\.mid\.block_(\d)\.", lambda m: f"decoder.mid_block.resnets.{int(m[1]) - 1}."),
        (r"decoder\.mid\.attn_1\.", lambda m: "decoder.mid_block.attentions.0."),
        (
            r"decoder\.up\.(\d+)\.block\.(\d+)\.",
            lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.",
        ),
        (
            r"decoder\.up\.(\d+)\.attn\.(\d+)\.",
            lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.attentions.{m[2]}.",
        ),
        (r"decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0."),
        (r"decoder\.norm_out\.", lambda m: "decoder.conv_norm_out."),
        (r"decoder\.(conv_in|conv_out)\.", lambda m: f"decoder.{m[1]}."),
    ):
        match = re.match(pattern, key)
        if match:
            key = replacement(match) + key[match.end() :]
            if ".attentions." in key:  # taming's 1x1 convs q/k/v/proj_out and norm -> diffusers' Attention
                for old, new in (
                    ("norm.", "group_norm."),
                    ("q.", "to_q."),
                    ("k.", "to_k."),
                    ("v.", "to_v."),
                    ("proj_out.", "to_out.0."),
                ):
                    head, _, tail = key.rpartition(".attentions.")
                    index, _, rest = tail.partition(".")
                    if rest.startswith(old):
                        key = f"{head}.attentions.{index}.{new}{rest[len(old) :]}"
                        break
            return key.replace(".nin_shortcut.", ".conv_shortcut.")
    return None


def _tokenizer_key(key: str, layers_run: int, levels: int) -> str | None:
    """Our key for an official tokenizer key (without prefix); None for a tensor the official forward never reads;
    "" for a key this converter does not know."""
    if any(re.fullmatch(pattern, key) for pattern in UNUSED_TOKENIZER_KEYS):
        return None
    if match := re.fullmatch(r"quantizer\.codebooks\.(\d+)\.weight", key):
        return "codebook_embedding.weight" if match[1] == "0" else None  # 1..: aliases of the shared codebook
    if key.startswith("siglip_model.vision_model."):
        match = re.match(r"siglip_model\.vision_model\.encoder\.layers\.(\d+)\.", key)
        if match and int(match[1]) >= layers_run:
            return None  # the layers after the features' layer: the official encode stops before them
        return "encoder." + key.removeprefix("siglip_model.vision_model.")  # transformers 5 naming
    if key.startswith("post_quant_conv."):
        return key
    return (_decoder_key(key, levels) or "") if key.startswith("decoder.") else ""


def _listed(keys) -> str:
    return f"{keys[:10]}{' ...' if len(keys) > 10 else ''} ({len(keys)} in all)"


def _strip_prefix(official: dict, prefixes, anchor: str, what: str) -> dict:
    """The keys under the first of `prefixes` that holds `anchor`, without the prefix."""
    found = [p for p in prefixes if p + anchor in official]
    if not found:
        raise KeyError(
            f"official {what} state dict: no `{anchor}` under any known prefix "
            f"{[p or '(none)' for p in prefixes]}; is this a checkpoint of the official {what}?"
        )
    return {k.removeprefix(found[0]): v for k, v in official.items() if k.startswith(found[0])}


def _convert(state: dict, module, ours_for, what: str, adapt=lambda ours, tensor: tensor) -> dict:
    """Every key of `state` -> `ours_for(key)` (None: read by no official forward, dropped; a name `module` lacks:
    unexpected), `adapt`ed, shape-checked; raises naming the unexpected, duplicated, reshaped or missing keys.
    `module`: the module converted to, or its expected state dict (name -> tensor)."""
    expected = module if isinstance(module, dict) else module.state_dict()
    owner = "the model" if isinstance(module, dict) else type(module).__name__
    converted, source, unexpected = {}, {}, []
    for key, tensor in state.items():
        ours = ours_for(key)
        if ours is None:
            continue
        if ours not in expected:
            unexpected.append(key)
            continue
        if ours in converted:
            raise KeyError(f"official keys {source[ours]!r} and {key!r} both map to {ours!r}.")
        tensor = adapt(ours, tensor)
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise ValueError(
                f"official key {key!r} has shape {tuple(tensor.shape)}; {ours!r} needs {tuple(expected[ours].shape)}."
            )
        converted[ours], source[ours] = tensor, key
    if unexpected:
        raise KeyError(f"official {what} keys with no place in {owner}: {_listed(sorted(unexpected))}.")
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise KeyError(f"{owner} weights with no official source: {_listed(missing)}.")
    return converted


def convert_rq_tokenizer_state_dict(official: dict, tokenizer) -> dict:
    """The official `RQVAESiglipModel` state dict (as saved by VILA-U / UniFork, with or without its
    `rqvaesiglip.` or `model.vision_tower.vision_tower.rqvaesiglip.` prefix) -> a state dict for `tokenizer`
    (a `UniForkRQImageTokenizer` of the same geometry). Keys of the depth head (`rqtransformer.*`) are not
    this function's: see `convert_depth_head_state_dict`."""
    state = _strip_prefix(official, TOKENIZER_PREFIXES, "post_quant_conv.weight", "RQVAESigLIP tokenizer")
    state = {k: v for k, v in state.items() if not k.startswith("rqtransformer.") and ".rqtransformer." not in k}
    codebook = state.get("quantizer.codebooks.0.weight")
    for key, tensor in state.items():
        alias = re.fullmatch(r"quantizer\.codebooks\.[1-9]\d*\.weight", key)
        if alias and not tensor.is_meta and not torch.equal(tensor, codebook):  # (meta: key mapping checks only)
            raise ValueError(
                f"official key {key!r} differs from quantizer.codebooks.0.weight: this converter supports "
                "the shared codebook (shared_codebook=true) only."
            )
    rows = tokenizer.codebook_size

    def adapt(ours, tensor):
        if ours == "codebook_embedding.weight" and len(tensor) == rows + 1:
            return tensor[:-1]  # the last official row is padding, never chosen
        if ".attentions." in ours and tensor.ndim == 4:
            return tensor[..., 0, 0]  # taming's 1x1 convs are diffusers' linear layers
        return tensor

    layers_run, levels = tokenizer.encoder.config.num_hidden_layers, len(tokenizer.decoder.up_blocks)
    return _convert(state, tokenizer, lambda key: _tokenizer_key(key, layers_run, levels), "tokenizer", adapt)


DEPTH_HEAD_PREFIXES = ("model.vision_tower.vision_tower.rqtransformer.", "rqtransformer.", "")
DEPTH_HEAD_NAMES = (
    (r"pos_emb_d", "depth_position"),
    (r"in_mlp_1\.", "code_in."),
    (r"in_mlp_2\.", "hidden_in."),
    (r"head_transformer\.blocks\.", "blocks."),
    (r"classifier_mlp\.layer_norm\.", "norm."),
    (r"classifier_mlp\.linear\.", "classifier."),
)


def convert_depth_head_state_dict(official: dict, head) -> dict:
    """The official `RQTransformer` state dict (`rqtransformer.*` of a VILA-U / UniFork vision tower, with or
    without that prefix) -> a state dict for `head` (a `UniForkDepthHead` of the same geometry). The block
    internals keep their official names (ln1, attn_in_proj, attn.query/key/value/proj, attn_out_proj, ln2, mlp)."""
    state = _strip_prefix(official, DEPTH_HEAD_PREFIXES, "pos_emb_d", "RQTransformer depth head")

    def ours_for(key):
        for pattern, replacement in DEPTH_HEAD_NAMES:
            if re.match(pattern, key):
                return re.sub("^" + pattern, replacement, key)
        return ""

    return _convert(state, head, ours_for, "depth head")


# ---------------------------------------------------------------------- the LLM side (LLaVA-style Qwen2 with the fork)

VISION_TOWER_PREFIX = "model.vision_tower."


def convert_llm_state_dict(official: dict, model) -> dict:
    """An official UniFork checkpoint's LLM side -> a state dict for `model`'s LLM parts (a
    `UniForkForConditionalGeneration` of the same geometry, `num_shared_layers` = the official K).

    Official layout (docs/official/layout.md section 3): `model.layers.{0..L-1}` with `model.norm` and `lm_head` are the
    understanding path; layers below K are shared; `model.gen_fork_layers.{0..L-K-1}` with `model.norm_gen` are the
    generation branch; `model.mm_projector.linear{1,2}` is the image projector of both tasks, and its
    `token_embedding` rows 0 / 1 (BOI / EOI) become the rows of `model.config.boi_token_id` / `eoi_token_id` in the
    embeddings. A tied `lm_head.weight` must equal the embeddings. Keys of the vision tower are not read here.
    """
    parts, k = model.y_part_names(), model.config.num_shared_layers
    state = {key: tensor for key, tensor in official.items() if not key.startswith(VISION_TOWER_PREFIX)}
    boi_eoi = state.pop("model.mm_projector.token_embedding.weight", None)
    if boi_eoi is None or boi_eoi.shape[0] != 2:
        raise KeyError("official LLM state dict: `model.mm_projector.token_embedding.weight` (BOI, EOI) is missing.")
    tied = model.config.tie_word_embeddings
    head = state.pop("lm_head.weight", None) if tied else None
    projector = {"linear1.": "linear_1.", "linear2.": "linear_2."}

    def ours_for(key):
        if match := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key):
            index, rest = int(match[1]), match[2]
            return (
                f"{parts['shared_layers']}.{index}.{rest}"
                if index < k
                else f"{parts['understanding_layers']}.{index - k}.{rest}"
            )
        if match := re.fullmatch(r"model\.gen_fork_layers\.(\d+)\.(.+)", key):
            return f"{parts['generation_layers']}.{match[1]}.{match[2]}"
        if match := re.fullmatch(r"model\.mm_projector\.(linear[12]\.)(.+)", key):
            return f"{parts['image_projector']}.{projector[match[1]]}{match[2]}"
        for official_name, role in (
            ("model.norm.", "understanding_norm"),
            ("model.norm_gen.", "generation_norm"),
            ("model.embed_tokens.", "embeddings"),
            ("lm_head.", "understanding_head"),
        ):
            if key.startswith(official_name):
                return f"{parts[role]}.{key.removeprefix(official_name)}"
        return ""

    llm_roles = ("embeddings", "image_projector", "shared_layers", "understanding_layers", "understanding_norm")
    llm_roles += ("generation_layers", "generation_norm") + (() if tied else ("understanding_head",))
    expected = {
        f"{parts[role]}.{name}": tensor
        for role in llm_roles
        for name, tensor in model.get_submodule(parts[role]).state_dict().items()
    }
    converted = _convert(state, expected, ours_for, "LLM")
    embeddings = converted[f"{parts['embeddings']}.weight"] = converted[f"{parts['embeddings']}.weight"].clone()
    if head is not None and not head.is_meta and not torch.equal(head, embeddings):
        raise ValueError("official key 'lm_head.weight' differs from the embeddings, but the config ties them.")
    embeddings[[model.config.boi_token_id, model.config.eoi_token_id]] = boi_eoi.to(embeddings.dtype)
    return converted


# ---------------------------------------------------------------------- configs and whole checkpoints

# google/siglip-large-patch16-256's vision config (the official tokenizer fetches it from the Hub by this name).
KNOWN_SIGLIP_VISION = {
    "google/siglip-large-patch16-256": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 256,
        "patch_size": 16,
    }
}
# The unconditional prompt of the official `infer_t2i.py` (its f-string adds the second "."):
# `generate_image(prompt, negative_prompt=OFFICIAL_NEGATIVE_PROMPT)` samples as the official script does.
OFFICIAL_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, "
    "low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.."
)
# The official sampler's settings, hard-coded in its `RQTransformer.generate` (docs/official/layout.md section 2.3).
OFFICIAL_IMAGE_GENERATION = {"guidance_scale": 4.0, "temperature": 1.0, "top_k": 900, "top_p": 0.96}
# The official prompts: understanding in LLaVA's `vicuna_v1` conversation (system prompt, "USER: <image>\n...
# ASSISTANT:", replies ending in <|im_end|>); image generation as `infer_t2i.py` writes it ("<|im_start|>USER: {prompt}
# ASSISTANT: ", then BOI), which the processor asks for with `image_generation=True`.
OFFICIAL_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}<image>{{ '\\n' }}{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "<|im_start|>"
    "{%- if not image_generation -%}A chat between a curious user and an artificial intelligence assistant. The "
    "assistant gives helpful, detailed, and polite answers to the user's questions. {% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "ASSISTANT: {% generation -%}{{ render(message['content']) }}<|im_end|>{%- endgeneration -%}"
    "{%- else -%}USER: {{ render(message['content']) }} {% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{{ ' ' if image_generation else '' }}{%- endif -%}"
)


def rq_configs_from_official(tower_config: dict, siglip_vision_config: dict | None = None) -> tuple[dict, dict]:
    """The official vision tower's `config.json` (`RQVAESIGLIPTransformer`: `rqvaesiglip` + `rqtransformer`) ->
    this package's `(rq_config, depth_head_config)`. The SigLIP encoder's own config is fetched by name in the
    official code; pass it as `siglip_vision_config` unless it is one of `KNOWN_SIGLIP_VISION`."""
    rq, head = tower_config["rqvaesiglip"], tower_config["rqtransformer"]
    if siglip_vision_config is None:
        if rq.get("pretrained_model") not in KNOWN_SIGLIP_VISION:
            raise ValueError(
                f"the tower's SigLIP is {rq.get('pretrained_model')!r}; pass its vision config (siglip_vision_config) "
                f"or use one of {sorted(KNOWN_SIGLIP_VISION)}."
            )
        siglip_vision_config = KNOWN_SIGLIP_VISION[rq["pretrained_model"]]
    dd = rq["ddconfig"]
    if not rq.get("shared_codebook", True):
        raise ValueError("this converter supports the shared codebook (rqvaesiglip.shared_codebook = true) only.")
    levels = len(dd["ch_mult"])
    # taming's up level i works at resolution / 2^i; diffusers' up block j is level L-1-j
    attention = [dd["resolution"] // 2 ** (levels - 1 - j) in dd.get("attn_resolutions", []) for j in range(levels)]
    vision = {**siglip_vision_config, "vision_use_head": False}
    vision["num_hidden_layers"] -= 1  # the features are the second-to-last layer's output (layout.md section 1)
    rq_config = {
        "vision_config": vision,
        "codebook_size": rq["n_embed"],
        "depth": rq["code_shape"][-1],
        "latent_channels": dd["z_channels"],
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attention],
        "layers_per_block": dd["num_res_blocks"],
        "norm_num_groups": 32,
    }
    depth_head_config = {
        "width": head.get("embed_dim_out", head["embed_dim"]),
        "attention_width": head["embed_dim"],
        "num_heads": head["head"]["block"]["n_head"],
        "num_layers": head["head"]["n_layer"],
    }
    return rq_config, depth_head_config


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def load_state_dict(directory) -> dict:
    """All tensors of a checkpoint folder: `model.safetensors`, its shards, or `pytorch_model*.bin`."""

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    binaries = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if not files and not binaries:
        raise FileNotFoundError(f"{directory} holds no *.safetensors or pytorch_model*.bin weights.")
    state = {}
    for file in files:
        state.update(load_file(file))
    for file in binaries if not files else []:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


# The official vision tower's geometry (tliby/UniFork configs/config.json), for checkpoints saved without it.
OFFICIAL_TOWER_CONFIG = {
    "rqvaesiglip": {
        "pretrained_model": "google/siglip-large-patch16-256",
        "n_embed": 16384,
        "code_shape": [16, 16, 4],
        "shared_codebook": True,
        "ddconfig": {
            "attn_resolutions": [16],
            "ch": 128,
            "ch_mult": [1, 1, 2, 2, 4],
            "num_res_blocks": 2,
            "resolution": 256,
            "z_channels": 256,
        },
    },
    "rqtransformer": {"embed_dim": 3584, "embed_dim_out": 896, "head": {"block": {"n_head": 32}, "n_layer": 6}},
}
TOWER_KEY = "model.vision_tower.vision_tower."


def convert_official_checkpoint(
    checkpoint, vision_tower=None, output_dir=None, siglip_vision_config=None, image_size=None
):
    """A checkpoint trained with the official UniFork code -> a `UniForkForConditionalGeneration` (with its processor),
    saved to `output_dir` when given, for `AutoModel.from_pretrained`.

    Args:
        checkpoint: the official training output: `config.json` (`llava_qwen2`), the weights (`model.layers.*`,
            `model.gen_fork_layers.*`, `model.norm_gen`, `model.mm_projector.*`, ...) and the Qwen2 tokenizer.
        vision_tower: the official vision tower folder (`config.json` of `RQVAESIGLIPTransformer` and weights
            `rqvaesiglip.*`, `rqtransformer.*`), e.g. VILA-U's `vision_tower` fine-tuned by UniFork. Default: the
            config's `mm_vision_tower` where that folder exists; tower weights saved inside `checkpoint` win.
        siglip_vision_config: the SigLIP encoder's vision config, when it is not `google/siglip-large-patch16-256`.
        image_size: default: the checkpoint's `preprocessor_config.json` `image_size`, else 384 (the official one).
    """
    from transformers import AutoTokenizer, Qwen2Config

    from ..modeling.configuration_unifork import UniForkConfig
    from ..modeling.forking_unifork import IMAGE_TOKENS
    from ..modeling.image_processing_unifork import UniForkImageProcessorPil
    from ..modeling.modeling_unifork import UniForkForConditionalGeneration
    from ..modeling.processing_unifork import UniForkProcessor

    checkpoint = str(checkpoint)
    llm_config = _read_json(os.path.join(checkpoint, "config.json"))
    state = load_state_dict(checkpoint)
    tower_config, tower_state = _vision_tower(checkpoint, llm_config, state, vision_tower)
    rq_config, depth_head_config = rq_configs_from_official(tower_config, siglip_vision_config)

    qwen2_fields = set(Qwen2Config().to_dict()) | {"rope_theta"}
    text_config = {k: v for k, v in llm_config.items() if k in qwen2_fields and k != "architectures"}
    text_config["model_type"] = "qwen2"
    forks = {int(m[1]) for key in state if (m := re.match(r"model\.gen_fork_layers\.(\d+)\.", key))}
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    if "<|vision_pad|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|vision_pad|>"  # the official training's pad token
    image_token_id, boi_token_id, eoi_token_id = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    if image_size is None:
        processor_file = os.path.join(checkpoint, "preprocessor_config.json")
        image_size = _read_json(processor_file).get("image_size", 384) if os.path.isfile(processor_file) else 384
    config = UniForkConfig(
        text_config=Qwen2Config.from_dict(text_config).to_dict(),
        rq_config=rq_config,
        depth_head_config=depth_head_config,
        image_size=image_size,
        num_shared_layers=llm_config["num_hidden_layers"] - len(forks),
        image_token_id=image_token_id,
        boi_token_id=boi_token_id,
        eoi_token_id=eoi_token_id,
    )
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"the tokenizer with the image tokens has {len(tokenizer)} ids, more than the vocabulary.")
    model = UniForkForConditionalGeneration(config)
    model.load_state_dict(official_model_state_dict(state, tower_state, model), strict=False, assign=False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    vocab = tokenizer.get_vocab()  # the official replies end in <|im_end|>
    model.generation_config.eos_token_id = vocab.get("<|im_end|>", tokenizer.eos_token_id)
    model.generation_config.suppress_tokens = [image_token_id, boi_token_id, eoi_token_id]
    model.generation_config.image_generation = dict(OFFICIAL_IMAGE_GENERATION)
    size = {"height": image_size, "width": image_size}
    model.processor = UniForkProcessor(
        UniForkImageProcessorPil(size=size), tokenizer, OFFICIAL_CHAT_TEMPLATE, config.num_image_tokens
    )
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


def _vision_tower(checkpoint, llm_config, state, vision_tower) -> tuple[dict, dict]:
    """The tower's config (its folder's, else the official one) and weights (in the checkpoint, else its folder's)."""
    vision_tower = vision_tower or llm_config.get("mm_vision_tower")
    has_tower_dir = vision_tower is not None and os.path.isfile(os.path.join(str(vision_tower), "config.json"))
    tower_config = (
        _read_json(os.path.join(str(vision_tower), "config.json")) if has_tower_dir else OFFICIAL_TOWER_CONFIG
    )
    tower_state = {k.removeprefix(TOWER_KEY): v for k, v in state.items() if k.startswith(TOWER_KEY)}
    if not tower_state:
        if not has_tower_dir:
            raise FileNotFoundError(
                f"{checkpoint} holds no vision tower weights ({TOWER_KEY}*) and no vision tower folder was found "
                f"(mm_vision_tower = {llm_config.get('mm_vision_tower')!r}): pass vision_tower=DIR."
            )
        tower_state = load_state_dict(str(vision_tower))
    return tower_config, tower_state


def official_model_state_dict(llm_state: dict, tower_state: dict, model) -> dict:
    """The whole model's state dict from the official LLM and vision-tower state dicts; raises unless every tensor of
    `model` has exactly one source (a tied LM head is the embeddings)."""
    parts = model.y_part_names()
    state = convert_llm_state_dict(llm_state, model)
    tokenizer = convert_rq_tokenizer_state_dict(tower_state, model.model.image_tokenizer)
    head = convert_depth_head_state_dict(tower_state, model.generation_head)
    state.update({f"{parts['image_tokenizer']}.{k}": v for k, v in tokenizer.items()})
    state.update({f"{parts['generation_head']}.{k}": v for k, v in head.items()})
    expected = set(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.discard(f"{parts['understanding_head']}.weight")
    if set(state) != expected:
        raise KeyError(f"converted keys differ from the model's: missing {sorted(expected - set(state))[:5]}, "
                       f"extra {sorted(set(state) - expected)[:5]}.")  # fmt: skip
    return state


def convert_official_vision_tower(vision_tower, output_dir=None, siglip_vision_config=None):
    """An official VILA-U / UniFork vision tower folder (`RQVAESIGLIPTransformer`: `config.json` + weights) -> a
    `UniForkRQImageTokenizer`, saved to `output_dir` when given; `unifork build --vq OUTPUT_DIR` (or
    `from_pretrained_llm(llm, OUTPUT_DIR)`) then builds a UniFork on it. The tower's depth head is not kept: a new
    model trains its own (`convert_official_checkpoint` converts a trained one)."""
    from ..modeling.rq_unifork import UniForkRQImageTokenizer

    tower_config = _read_json(os.path.join(str(vision_tower), "config.json"))
    rq_config, _ = rq_configs_from_official(tower_config, siglip_vision_config)
    tokenizer = UniForkRQImageTokenizer(rq_config)
    tokenizer.load_state_dict(convert_rq_tokenizer_state_dict(load_state_dict(str(vision_tower)), tokenizer))
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def add_arguments(parser):
    parser.add_argument(
        "--checkpoint", help="a checkpoint trained with the official UniFork code (config.json, weights, tokenizer)"
    )
    parser.add_argument(
        "--vision-tower",
        help="the official vision tower folder (RQVAESIGLIPTransformer); alone: convert only the image tokenizer",
    )
    parser.add_argument(
        "--siglip-config", help="JSON file: the SigLIP vision config, when it is not google/siglip-large-patch16-256"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="default: the checkpoint's preprocessor image_size, else 384"
    )
    parser.add_argument("--out", required=True, help="output directory (save_pretrained)")  # fmt: skip
    return parser


def run(args) -> str:
    """Convert as `args` (from `add_arguments`) say; returns a one-line summary."""
    siglip = _read_json(args.siglip_config) if args.siglip_config else None
    if args.checkpoint is None and args.vision_tower is None:
        raise ValueError("pass --checkpoint (a whole official model) or --vision-tower alone (its image tokenizer).")
    if args.checkpoint is None:
        tokenizer = convert_official_vision_tower(args.vision_tower, args.out, siglip)
        config = tokenizer.rq_config
        return (
            f"RQ image tokenizer written to {args.out}: {sum(p.numel() for p in tokenizer.parameters()):,} parameters, "
            f"{config['depth']} codes per position from {config['codebook_size']:,}"
        )
    model = convert_official_checkpoint(args.checkpoint, args.vision_tower, args.out, siglip, args.image_size)
    config = model.config
    return (
        f"UniFork written to {args.out}: K={config.num_shared_layers} of {config.text_config.num_hidden_layers} layers, "
        f"{model.num_parameters():,} parameters, {config.image_size} px images as {config.image_grid_size}x"
        f"{config.image_grid_size} positions x {config.image_depth} codes"
    )


def main(argv=None):
    import argparse

    parser = add_arguments(argparse.ArgumentParser(description="Official UniFork / VILA-U checkpoints -> unifork_hf"))
    print(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
