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


def convert_rq_tokenizer_state_dict(official: dict, tokenizer) -> dict:
    """The official `RQVAESiglipModel` state dict (as saved by VILA-U / UniFork, with or without its
    `rqvaesiglip.` or `model.vision_tower.vision_tower.rqvaesiglip.` prefix) -> a state dict for `tokenizer`
    (a `UniForkRQImageTokenizer` of the same geometry). Keys of the depth head (`rqtransformer.*`) are not
    this function's: pass them to the depth head's converter."""
    prefixes = [p for p in TOKENIZER_PREFIXES if p + "post_quant_conv.weight" in official]
    if not prefixes:
        raise KeyError(
            "official tokenizer state dict: no `post_quant_conv.weight` under any known prefix "
            f"{[p or '(none)' for p in TOKENIZER_PREFIXES]}; is this an RQVAESigLIP checkpoint?"
        )
    state = {k.removeprefix(prefixes[0]): v for k, v in official.items() if k.startswith(prefixes[0])}
    state = {k: v for k, v in state.items() if not k.startswith("rqtransformer.") and ".rqtransformer." not in k}
    expected = tokenizer.state_dict()
    layers_run, levels = tokenizer.encoder.config.num_hidden_layers, len(tokenizer.decoder.up_blocks)
    converted, source, unexpected = {}, {}, []
    for key, tensor in state.items():
        ours = _tokenizer_key(key, layers_run, levels)
        if ours is None:
            alias = re.fullmatch(r"quantizer\.codebooks\.[1-9]\d*\.weight", key)
            if alias and not torch.equal(tensor, state.get("quantizer.codebooks.0.weight", tensor[:0])):
                raise ValueError(
                    f"official key {key!r} differs from quantizer.codebooks.0.weight: this converter supports "
                    "the shared codebook (shared_codebook=true) only."
                )
            continue
        if ours not in expected:
            unexpected.append(key)
            continue
        if ours in converted:
            raise KeyError(f"official keys {source[ours]!r} and {key!r} both map to {ours!r}.")
        if ours == "codebook_embedding.weight" and len(tensor) == len(expected[ours]) + 1:
            tensor = tensor[:-1]  # the last official row is padding, never chosen
        elif ".attentions." in ours and tensor.ndim == 4:
            tensor = tensor[..., 0, 0]  # taming's 1x1 convs are diffusers' linear layers
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise ValueError(
                f"official key {key!r} has shape {tuple(tensor.shape)}; {ours!r} needs {tuple(expected[ours].shape)}."
            )
        converted[ours], source[ours] = tensor, key
    if unexpected:
        raise KeyError(
            f"official tokenizer keys with no place in UniForkRQImageTokenizer: {_listed(sorted(unexpected))}."
        )
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise KeyError(f"UniForkRQImageTokenizer weights with no official source: {_listed(missing)}.")
    return converted
