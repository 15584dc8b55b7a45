"""The residual-quantised SigLIP image tokenizer and its converter from the official checkpoints.

The official numbers come from tests/fixtures/official_rq_tokenizer.pt, recorded by running the official UniFork
modules (scripts/official_reference/make_rq_tokenizer_fixture.py) on weights that tests/fixtures/official_weights.py
rebuilds from the key names.
"""

import os
import re
import sys

import pytest
import torch

from unifork_hf.conversion import convert_rq_tokenizer_state_dict
from unifork_hf.modeling.rq_unifork import DEFAULT_RQ_CONFIG, UniForkRQImageTokenizer

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "fixtures"))
from official_weights import official_weight  # noqa: E402


@pytest.fixture(scope="module")
def official():
    return torch.load(os.path.join(HERE, "fixtures", "official_rq_tokenizer.pt"))


def official_state(record, prefix="rqvaesiglip."):
    return {prefix + key: official_weight(key, shape) for key, shape in record["shapes"].items()}


def tokenizer_like(record) -> UniForkRQImageTokenizer:
    """Our tokenizer at the fixture's geometry, written in this package's terms."""
    vision, rq = record["vision_config"], record["rq_config"]
    ddconfig = rq["ddconfig"]
    levels = len(ddconfig["ch_mult"])
    return UniForkRQImageTokenizer(
        {
            # the official encode stops one layer before the end
            "vision_config": {**vision, "num_hidden_layers": vision["num_hidden_layers"] - 1, "vision_use_head": False},
            "codebook_size": rq["n_embed"],
            "depth": rq["code_shape"][-1],
            "latent_channels": ddconfig["z_channels"],
            "block_out_channels": [ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
            "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1),  # attention: lowest res
            "layers_per_block": ddconfig["num_res_blocks"],
            "norm_num_groups": 32,
        }
    ).eval()


@pytest.fixture(scope="module")
def converted(official):
    tokenizer = tokenizer_like(official)
    tokenizer.load_state_dict(convert_rq_tokenizer_state_dict(official_state(official), tokenizer))
    return tokenizer


@pytest.mark.parametrize("side", [4, 6])  # 6: a grid larger than the position table (bicubic interpolation)
def test_converted_tokenizer_gives_the_official_codes_embeddings_and_pixels(official, converted, side):
    images, codes = official[f"images_{side}"], official[f"codes_{side}"]
    assert len(codes.unique()) > 10, "a degenerate fixture (few distinct codes) would test little"
    ours = converted.encode(images)
    assert torch.equal(ours, codes.reshape(2, side * side, 4))
    summed = converted.embed_codes(ours).reshape(2, side, side, -1)
    torch.testing.assert_close(summed, official[f"summed_{side}"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(converted.decode(ours), official[f"pixels_{side}"], atol=1e-4, rtol=1e-4)


def test_converter_accepts_every_official_prefix_and_codebook_layout(official, converted):
    expected = converted.state_dict()
    for prefix in ("", "rqvaesiglip.", "model.vision_tower.vision_tower.rqvaesiglip."):
        state = official_state(official, prefix)
        state[prefix + "quantizer.codebooks.0.weight"] = state[prefix + "quantizer.codebooks.0.weight"][:-1]  # no pad
        for depth in (1, 2, 3):  # the shared codebook saved once (transformers 4.36) instead of 4 times
            state.pop(f"{prefix}quantizer.codebooks.{depth}.weight")
        result = convert_rq_tokenizer_state_dict(state, converted)
        assert result.keys() == expected.keys()
        assert all(torch.equal(result[k], expected[k]) for k in expected)


def test_converter_consumes_every_key_once_and_names_what_is_wrong(official, converted):
    state = official_state(official)
    prefix = "rqvaesiglip."
    missing = dict(state)
    del missing[prefix + "decoder.up.4.attn.0.q.weight"]
    with pytest.raises(KeyError, match=r"no official source: \['decoder.up_blocks.0.attentions.0.to_q.weight'\]"):
        convert_rq_tokenizer_state_dict(missing, converted)
    extra = {**state, prefix + "decoder.up.4.extra.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"no place in UniForkRQImageTokenizer: \['decoder.up.4.extra.weight'\]"):
        convert_rq_tokenizer_state_dict(extra, converted)
    reshaped = {**state, prefix + "post_quant_conv.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"'post_quant_conv.bias' has shape \(3,\); 'post_quant_conv.bias' needs"):
        convert_rq_tokenizer_state_dict(reshaped, converted)
    bigger = {k: v for k, v in state.items() if not re.search(r"codebooks\.[123]\.weight", k)}
    bigger[prefix + "quantizer.codebooks.0.weight"] = torch.zeros(2048, 64)
    with pytest.raises(
        ValueError, match=r"codebooks.0.weight' has shape \(2048, 64\); 'codebook_embedding.weight' needs"
    ):
        convert_rq_tokenizer_state_dict(bigger, converted)
    aliases = {**state, prefix + "quantizer.codebooks.2.weight": state[prefix + "quantizer.codebooks.2.weight"] + 1}
    with pytest.raises(ValueError, match="codebooks.2.weight' differs from quantizer.codebooks.0.weight"):
        convert_rq_tokenizer_state_dict(aliases, converted)
    with pytest.raises(KeyError, match="is this a checkpoint of the official RQVAESigLIP tokenizer"):
        convert_rq_tokenizer_state_dict({"model.embed_tokens.weight": torch.zeros(2, 2)}, converted)


def test_each_depth_explains_more_of_the_features(converted, official):
    features = converted.features(official["images_6"])
    codes = converted.quantize(features)
    errors = [(features - converted.embed_codes(codes[..., :d])).pow(2).mean().item() for d in range(1, 5)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors  # strictly falling
    # the first d codes are what a depth-d quantiser chooses: depth is a prefix, not a different code
    assert torch.equal(converted.quantize(features, depth=2), codes[..., :2])
    # decoding the first d depths: d = 4 is the official reconstruction, fewer depths give a different picture
    pixels = [converted.decode(codes[..., :d]) for d in (1, 4)]
    assert not torch.allclose(pixels[0], pixels[1])


def test_bad_codes_and_images_are_named():
    tokenizer = UniForkRQImageTokenizer(DEFAULT_RQ_CONFIG)
    with pytest.raises(ValueError, match=r"depth dimension of 1..4, got shape \(2, 16, 5\)"):
        tokenizer.decode(torch.zeros(2, 16, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in 0..255 \(the RQ codebook\), got values in 0..256"):
        tokenizer.embed_codes(torch.tensor([[0, 256]]))
    with pytest.raises(TypeError, match="integer code ids"):
        tokenizer.embed_codes(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"multiples of 8 \(the patch\), got \(1, 3, 30, 32\)"):
        tokenizer.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="15 image positions do not form a square grid"):
        tokenizer.decode(torch.zeros(1, 15, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"up_block_types \(4\) and block_out_channels \(3\)"):
        UniForkRQImageTokenizer({**DEFAULT_RQ_CONFIG, "block_out_channels": [32, 32, 64]})
    three_levels = {"block_out_channels": [32, 32, 64], "up_block_types": ["UpDecoderBlock2D"] * 3}
    with pytest.raises(ValueError, match="decoder upsamples x4 .* patches are 8 px"):
        UniForkRQImageTokenizer({**DEFAULT_RQ_CONFIG, **three_levels})


def test_the_paper_geometry_converts_every_official_key():
    """The 1131 keys (and shapes) of the official tower built from UniFork's configs/config.json, read off the
    official code by scripts/official_reference (tests/fixtures/official_vision_tower_keys.tsv), on the meta device."""
    from unifork_hf.modeling.rq_unifork import UNIFORK_BASE_RQ_CONFIG

    state = {}
    with open(os.path.join(HERE, "fixtures", "official_vision_tower_keys.tsv")) as f:
        for line in f:
            key, shape, _ = line.rstrip("\n").split("\t")
            if not key.startswith("rqtransformer.") and not key.startswith("rqvaesiglip.quantizer.codebooks.1"):
                state[key] = torch.empty(eval(shape), device="meta")  # noqa: S307  (a shape tuple we wrote)
    for depth in (2, 3):  # the shared codebook saved once (the aliases are checked for equality when present)
        state = {k: v for k, v in state.items() if not k.startswith(f"rqvaesiglip.quantizer.codebooks.{depth}")}
    with torch.device("meta"):
        tokenizer = UniForkRQImageTokenizer(UNIFORK_BASE_RQ_CONFIG)
    converted = convert_rq_tokenizer_state_dict(state, tokenizer)
    assert converted.keys() == tokenizer.state_dict().keys()
    assert converted["codebook_embedding.weight"].shape == (16384, 1024)
    sizes = {name: sum(p.numel() for p in module.parameters()) for name, module in tokenizer.named_children()}
    assert sizes == {
        # the official vision_model (315,956,224) less its last layer (12,596,224) and pooling head (12,595,200)
        "encoder": 315_956_224 - 12_596_224 - 12_595_200,
        "codebook_embedding": 16384 * 1024,
        "post_quant_conv": 262_400,
        "decoder": 42_449_795,  # the official taming decoder's count: the same blocks
    }, sizes
