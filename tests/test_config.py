import pytest
import torch
from transformers import GPT2Config, LlamaConfig, T5Config

from unifork_hf import UniForkConfig, UniForkForConditionalGeneration


def test_tiny_preset_derives_image_geometry_from_vq():
    config = UniForkConfig.from_preset("unifork-tiny")
    assert config.image_size == 32 and config.image_grid_size == 8 and config.num_image_tokens == 64
    assert config.codebook_size == 64 and config.num_shared_layers == 2 and config.num_branch_layers == 2
    assert config.projector_hidden_size == config.text_config.hidden_size


def test_base_preset_is_the_paper_geometry():
    config = UniForkConfig.from_preset("unifork-base")
    text = config.text_config
    assert type(text).__name__ == "Qwen2Config"
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (24, 896, 4864)
    assert (text.num_attention_heads, text.num_key_value_heads) == (14, 2)
    assert config.num_shared_layers == 12
    # the official code runs VILA-U's tokenizer at 384 px: 24 x 24 positions x 4 residual codes of 16,384
    assert (config.image_size, config.image_grid_size, config.image_depth, config.codebook_size) == (384, 24, 4, 16384)
    assert config.rq_config["vision_config"]["num_hidden_layers"] == 23 and config.code_dim == 1024
    assert config.depth_head_config == {"width": 896, "attention_width": 3584, "num_heads": 32, "num_layers": 6}
    assert config.tie_word_embeddings and config.vq_config is None


def depth_head_parameters(hidden, code_dim, codebook, depth, width, attention_width, num_heads, num_layers) -> int:
    """The official rqtransformer's parameters, from its layer list (docs/official/layout.md section 2.1)."""
    linear = lambda i, o: i * o + o  # noqa: E731
    block = (
        4 * width  # ln_1, ln_2
        + linear(width, attention_width)  # attn_in_proj
        + 4 * linear(attention_width, attention_width)  # query, key, value, proj
        + linear(attention_width, width)  # attn_out_proj
        + linear(width, 4 * width)
        + linear(4 * width, width)  # mlp
    )
    return (
        linear(hidden, width)
        + linear(code_dim, width)
        + depth * width
        + num_layers * block
        + 2 * width
        + linear(width, codebook)
    )


def test_base_preset_parameter_count_on_meta_device():
    """The paper's model, part by part (the README's table)."""
    config = UniForkConfig.from_preset("unifork-base")
    with torch.device("meta"):
        model = UniForkForConditionalGeneration(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    inner = model.model
    tokenizer = inner.image_tokenizer
    parts = {
        "embeddings (tied LM head)": count(inner.embed_tokens),
        "shared": count(inner.shared_layers),
        "understanding": count(inner.understanding_layers) + count(inner.understanding_norm),
        "generation": count(inner.generation_layers) + count(inner.generation_norm),
        "generation_head": count(model.generation_head),
        "projector": count(inner.image_projector),
        "tokenizer": count(tokenizer),
    }
    layer = 14_912_384  # one Qwen2.5-0.5B decoder layer
    assert parts["shared"] == 12 * layer
    assert parts["understanding"] == parts["generation"] == 12 * layer + 896
    assert parts["embeddings (tied LM head)"] == 151936 * 896
    assert parts["generation_head"] == depth_head_parameters(896, 1024, 16384, 4, 896, 3584, 32, 6) == 401_936_896
    assert parts["projector"] == (1024 * 896 + 896) + (896 * 896 + 896)  # the official mm_projector
    # SigLIP-large's 23 layers run, the shared codebook, post_quant_conv, the decoder (the official counts)
    assert (count(tokenizer.encoder), count(tokenizer.codebook_embedding)) == (290_764_800, 16_777_216)
    assert (count(tokenizer.post_quant_conv), count(tokenizer.decoder)) == (262_400, 42_449_795)
    assert model.lm_head.weight is inner.embed_tokens.weight
    assert model.num_parameters() == sum(parts.values()) == 1_426_895_491
    print({k: f"{v / 1e6:.1f}M" for k, v in parts.items()}, f"total {model.num_parameters() / 1e6:.1f}M")


def test_config_round_trip(tmp_path):
    config = UniForkConfig(
        text_config=LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2),
        num_shared_layers=1,
    )
    config.save_pretrained(tmp_path)
    loaded = UniForkConfig.from_pretrained(tmp_path)
    assert type(loaded.text_config) is LlamaConfig
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize("value", [-1, 5])
def test_fork_point_outside_the_llm_raises(value):
    with pytest.raises(ValueError, match=r"num_shared_layers must be in 0\.\.4.*got " + str(value)):
        UniForkConfig.from_preset("unifork-tiny", num_shared_layers=value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"image_grid_size": 7}, "image_grid_size"),
        ({"codebook_size": 10}, "codebook_size"),
        ({"image_size": 30}, "image_size"),
        ({"image_token_id": 10_000}, "image_token_id"),
        ({"vq_config": {"sample_size": 32}}, "vq_config"),
    ],
)
def test_invalid_fields_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        UniForkConfig.from_preset("unifork-tiny", **overrides)


def vq_with(**changes):
    return {**UniForkConfig.from_preset("unifork-tiny").vq_config, **changes}


@pytest.mark.parametrize(
    "overrides, message",
    [  # each used to fail inside a forward, in torch or diffusers
        (
            {"vq_config": vq_with(norm_num_groups=3)},
            r"block_out_channels entry \[.*\] must be a multiple of norm_num_groups \(3\)",
        ),
        ({"vq_config": vq_with(num_vq_embeddings=0)}, r"num_vq_embeddings and vq_embed_dim must be positive, got 0"),
        ({"vq_config": vq_with(act_fn="swishy")}, r"vq_config act_fn 'swishy' is not an activation"),
        ({"projector_hidden_act": "relu7"}, r"projector_hidden_act 'relu7' is not an activation"),
    ],
)
def test_configs_that_cannot_build_a_model_raise_naming_the_field(overrides, message):
    if overrides.get("vq_config", {}).get("num_vq_embeddings") == 0:
        overrides = {**overrides, "codebook_size": 0}
    with pytest.raises(ValueError, match=message):
        UniForkConfig.from_preset("unifork-tiny", **overrides)


def test_kv_heads_must_divide_heads():
    text = {**UniForkConfig.from_preset("unifork-tiny").text_config.to_dict(), "num_key_value_heads": 3}
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        UniForkConfig.from_preset("unifork-tiny", text_config=text)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unifork-tiny"):
        UniForkConfig.from_preset("unifork-huge")


def test_llms_that_cannot_be_forked():
    with pytest.raises(ValueError, match="text_config: cannot fork a 'qwen2' config without a positive"):
        UniForkConfig(text_config={"model_type": "qwen2", "num_hidden_layers": 0})
    with pytest.raises(ValueError, match="text_config.*encoder-decoder"):
        UniForkConfig(text_config=T5Config())
    config = UniForkConfig(text_config=GPT2Config(n_layer=2, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="cannot fork a 'gpt2' LLM"):
        UniForkForConditionalGeneration(config)
