import pytest
import torch
from diffusers import VQModel

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.tiny import tiny_llm, tiny_tokenizer, tiny_vq


@pytest.mark.parametrize(
    "architecture, config",
    [
        ("qwen2", {}),
        ("llama", {}),
        ("llama", {"rms_norm_eps": 1e-2}),  # a norm that dropped the LLM's eps would differ by ~0.5
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),  # layers 1-3 look 4 back
    ],
)
def test_understanding_path_reproduces_the_source_llm(architecture, config, tmp_path):
    llm = tiny_llm(architecture, **config)
    with torch.no_grad():  # norm weights other than ones, so that eps and every norm's weight matter
        for name, parameter in llm.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    if config.get("use_sliding_window"):
        assert llm.config.layer_types == ["full_attention"] + ["sliding_attention"] * 3
    llm.save_pretrained(tmp_path / "llm")
    tiny_tokenizer().save_pretrained(tmp_path / "llm")
    tiny_vq().save_pretrained(tmp_path / "vq")
    model = UniForkForConditionalGeneration.from_pretrained_llm(str(tmp_path / "llm"), str(tmp_path / "vq")).eval()
    assert type(model.config.text_config).__name__ == type(llm.config).__name__
    ids = torch.randint(0, 384, (2, 12))
    with torch.no_grad():
        expected = llm(ids).logits
        got = model(input_ids=ids).logits
    vocab = expected.shape[-1]
    assert got.shape[-1] == vocab >= len(model.processor.tokenizer)  # the new tokens fit in the LLM's spare rows
    torch.testing.assert_close(got[..., :vocab], expected, atol=1e-5, rtol=0)
    greedy = dict(max_new_tokens=6, do_sample=False, suppress_tokens=None, pad_token_id=1)
    torch.testing.assert_close(model.generate(ids, **greedy), llm.generate(ids, **greedy))


def test_the_y_is_initialised_from_the_llm():
    llm = tiny_llm("qwen2", num_hidden_layers=6)
    model = UniForkForConditionalGeneration.from_pretrained_llm(
        llm, tiny_vq(), tokenizer=tiny_tokenizer(), num_shared_layers=2
    )
    source = llm.model.layers
    inner = model.model
    assert len(inner.shared_layers) == 2 and len(inner.generation_layers) == 4
    for i, layer in enumerate(inner.shared_layers):
        assert torch.equal(layer.self_attn.q_proj.weight, source[i].self_attn.q_proj.weight)
    for i, (und, gen) in enumerate(zip(inner.understanding_layers, inner.generation_layers)):
        assert torch.equal(und.mlp.down_proj.weight, source[2 + i].mlp.down_proj.weight)
        assert torch.equal(gen.mlp.down_proj.weight, source[2 + i].mlp.down_proj.weight)
        assert gen.mlp.down_proj.weight.data_ptr() != und.mlp.down_proj.weight.data_ptr()  # a copy, not a tie
        assert gen.self_attn.layer_idx == und.self_attn.layer_idx == 2 + i
    assert torch.equal(inner.generation_norm.weight, llm.model.norm.weight)


def test_builder_adds_tokens_and_keeps_the_vq():
    vq, tokenizer = tiny_vq(seed=3), tiny_tokenizer()
    model = UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), vq, tokenizer=tokenizer)
    config = model.config
    assert tokenizer.convert_tokens_to_ids(["<image>", "<begin_of_image>", "<end_of_image>"]) == [
        config.image_token_id,
        config.boi_token_id,
        config.eoi_token_id,
    ]
    assert model.processor.tokenizer.padding_side == "left"
    # post_init must not have re-initialised the pretrained VQ
    for name, tensor in vq.state_dict().items():
        assert torch.equal(model.model.image_tokenizer.vq.state_dict()[name], tensor), name
    assert config.image_size == 32 and config.num_image_tokens == 64 and config.codebook_size == 64


def test_embeddings_grow_when_the_new_tokens_do_not_fit():
    tokenizer = tiny_tokenizer()
    llm = tiny_llm(vocab_size=len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (1, 8))
    with torch.no_grad():
        expected = llm(ids).logits
    model = UniForkForConditionalGeneration.from_pretrained_llm(llm, tiny_vq(), tokenizer=tokenizer).eval()
    assert model.config.text_config.vocab_size == len(tokenizer) == expected.shape[-1] + 3
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, atol=1e-5, rtol=0)


def test_builder_bad_inputs():
    with pytest.raises(TypeError, match="llm must be a transformers causal LM"):
        UniForkForConditionalGeneration.from_pretrained_llm(object(), tiny_vq(), tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="Pass the LLM's `tokenizer`"):
        UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), tiny_vq())
    with pytest.raises(TypeError, match="vq_model must be a diffusers VQModel"):
        UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), object(), tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="num_shared_layers must be in 0..4"):
        UniForkForConditionalGeneration.from_pretrained_llm(
            tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer(), num_shared_layers=9
        )
    assert isinstance(tiny_vq(), VQModel)


def test_learned_code_embeddings_start_at_zero_and_train(tmp_path):
    model = UniForkForConditionalGeneration.from_pretrained_llm(
        tiny_llm(), tiny_vq(seed=1), tokenizer=tiny_tokenizer(), learn_image_code_embeddings=True
    )
    inner = model.model
    table = inner.image_projector.code_embeddings
    assert table.shape == (64, model.config.text_config.hidden_size) and not table.any()
    codes = torch.randint(0, 64, (2, 64))
    paper_way = inner.image_projector.linear_2(
        inner.image_projector.act(inner.image_projector.linear_1(inner.image_tokenizer.embed_codes(codes)))
    )
    torch.testing.assert_close(inner.embed_image_codes(codes), paper_way)  # starts as the paper's projector

    # trained by the align and joint stages (it sits in the projector), and added per code
    from unifork_hf.training import apply_freezing

    for policy in ("joint", "align"):
        assert "model.image_projector.code_embeddings" in apply_freezing(model, policy)
    inner.embed_image_codes(codes).sum().backward()
    assert table.grad[codes.unique()].abs().sum(-1).gt(0).all()
    with torch.no_grad():
        table[codes[0, 0]] += 1.0
    torch.testing.assert_close(inner.embed_image_codes(codes[:1, :1]), paper_way[:1, :1] + 1.0)
    with pytest.raises(ValueError, match="image token ids must be in 0..63"):
        inner.embed_image_codes(torch.tensor([[64]]))

    model.save_pretrained(tmp_path / "m")
    reloaded = UniForkForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert reloaded.config.learn_image_code_embeddings
    assert torch.equal(reloaded.model.image_projector.code_embeddings, table)
    assert (
        UniForkForConditionalGeneration.from_pretrained_llm(
            tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer()
        ).model.image_projector.code_embeddings
        is None
    )
