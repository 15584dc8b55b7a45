"""Official UniFork / VILA-U weights -> this package's modules, key by key.

The official layouts are described in docs/official/layout.md (read from tliby/UniFork @ 2c5b757). Every official
key is consumed exactly once: mapped to one of ours, or dropped because the official forward never reads it (the
SigLIP text tower, pooling head and unused last layer, the EMA buffers of the codebook, the aliases of the shared
codebook, which must equal its first copy). A key that is neither, or one of ours left without a source, raises an
error that names it.
"""

import re

import torch

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
    unexpected), `adapt`ed, shape-checked; raises naming the unexpected, duplicated, reshaped or missing keys."""
    expected = module.state_dict()
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
        raise KeyError(f"official {what} keys with no place in {type(module).__name__}: {_listed(sorted(unexpected))}.")
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise KeyError(f"{type(module).__name__} weights with no official source: {_listed(missing)}.")
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
        if re.fullmatch(r"quantizer\.codebooks\.[1-9]\d*\.weight", key) and not torch.equal(tensor, codebook):
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
