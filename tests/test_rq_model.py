"""UniFork with the paper's image side: the RQ tokenizer (depth codes per position) and the depth head, wired into
the model, its loss, `generate_image`, saving, the processor and training."""

import pytest
import torch
from torch import nn
from transformers import CompileConfig

from unifork_hf import UniForkConfig, UniForkForConditionalGeneration, UniForkProcessor
from unifork_hf.data.tiny import tiny_llm, tiny_tokenizer
from unifork_hf.modeling import generation_unifork, packing_unifork
from unifork_hf.modeling.rq_unifork import DEFAULT_RQ_CONFIG, UniForkRQImageTokenizer
from unifork_hf.training import (
    UniForkDataCollator,
    UniForkTrainer,
    UniForkTrainingArguments,
    colour_dataset,
    mix_tasks,
    prepare_generation,
    prepare_understanding,
    pretokenize_images,
)

DEPTH, POSITIONS = DEFAULT_RQ_CONFIG["depth"], 16  # 32 px images, 8 px patches: 4x4 positions x 4 codes


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tokenizer = UniForkRQImageTokenizer(DEFAULT_RQ_CONFIG)
    with torch.no_grad():  # a codebook of distinct, well-spread vectors, as a trained one has
        tokenizer.codebook_embedding.weight.normal_()
    model = UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), tokenizer, tokenizer=tiny_tokenizer())
    with torch.no_grad():  # larger than init so that logits differ clearly between codes and depths
        for p in model.generation_head.parameters():
            p.mul_(3)
    return model.eval()


def generation_sequence(model, prompt: str, codes: torch.Tensor) -> dict:
    """The training layout of one generation sample: prompt, BOI, the image's positions, EOI."""
    text = model.processor.image_generation_sequence(prompt)
    input_ids = model.processor.tokenizer([text], return_tensors="pt", add_special_tokens=False).input_ids
    return {"input_ids": input_ids, "image_ids": codes, "task": "generation"}


def image_positions(model, input_ids):
    return (input_ids[0] == model.config.image_token_id).nonzero().squeeze(1)


def test_config_of_the_rq_side():
    config = UniForkConfig.from_preset("unifork-tiny-rq")
    assert (config.image_size, config.num_image_tokens, config.image_depth, config.codebook_size) == (32, 16, 4, 256)
    assert config.vq_config is None and config.code_dim == 64
    assert config.depth_head_config == {"width": 64, "attention_width": 64, "num_heads": 4, "num_layers": 2}
    assert UniForkConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    tiny = UniForkConfig.from_preset("unifork-tiny")
    for overrides, message in [
        ({"vq_config": tiny.vq_config}, "either vq_config .* or rq_config"),
        ({"learn_image_code_embeddings": True}, "learn_image_code_embeddings is for a VQ"),
        ({"vq_tile_size": 8}, "vq_tile_size tiles a VQModel"),
        ({"depth_head_config": {"width": 64, "layers": 3}}, r"unknown keys \['layers'\]"),
        ({"depth_head_config": {"attention_width": 60, "num_heads": 8}}, "attention_width a multiple of num_heads"),
        ({"image_size": 36}, "multiple of the RQ encoder's patch size 8, got 36"),
        ({"rq_config": {**DEFAULT_RQ_CONFIG, "up_block_types": ["UpDecoderBlock2D"] * 3}}, "must upsample x8"),
    ]:
        with pytest.raises(ValueError, match=message):
            UniForkConfig.from_preset("unifork-tiny-rq", **overrides)
    with pytest.raises(ValueError, match="depth_head_config is for the RQ image tokenizer"):
        UniForkConfig.from_preset("unifork-tiny", depth_head_config={"num_layers": 1})
    with pytest.raises(ValueError, match="image_depth_loss_weights is for the RQ image tokenizer"):
        UniForkConfig.from_preset("unifork-tiny", image_depth_loss_weights=[1.0])
    for weights in ([1, 1, 1], [1, -1, 1, 1], [0, 0, 0, 0]):
        with pytest.raises(ValueError, match=r"image_depth_loss_weights must be 4 non-negative numbers .* got"):
            UniForkConfig.from_preset("unifork-tiny-rq", image_depth_loss_weights=weights)
    weighted = UniForkConfig.from_preset("unifork-tiny-rq", image_depth_loss_weights=[3, 1, 1, 1])
    assert UniForkConfig.from_dict(weighted.to_dict()).image_depth_loss_weights == [3.0, 1.0, 1.0, 1.0]


def test_teacher_forced_logits_and_loss_position_by_position(model):
    """Position t's depth slot d is the head on hidden t and the vectors of codes 0..d-1 of position t+1; the
    generation loss is the mean over a position's depths, then over positions."""
    codes = torch.randint(0, 256, (1, POSITIONS, DEPTH), generator=torch.Generator().manual_seed(1))
    inputs = generation_sequence(model, "a red circle", codes)
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"], output_hidden_states=True)
        hidden = model.model.generation_norm(out.hidden_states[-1])
    places = image_positions(model, inputs["input_ids"])
    codebook = model.model.image_tokenizer.codebook
    losses = []
    for i, place in enumerate(places.tolist()):
        head = model.generation_head(hidden[0, place - 1], codebook[codes[0, i, : DEPTH - 1]])
        torch.testing.assert_close(out.image_logits[0, place - 1], head, atol=1e-5, rtol=1e-5)
        losses.append(nn.functional.cross_entropy(head, codes[0, i]))  # mean over the 4 depths
    torch.testing.assert_close(out.loss_generation, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)
    # weighted depths: each position's codes weighed [3, 0, 1, 0] / 4, independently of the mean above
    per_depth = torch.stack(
        [
            torch.stack(
                [nn.functional.cross_entropy(out.image_logits[0, place - 1, d], codes[0, i, d]) for d in range(DEPTH)]
            )
            for i, place in enumerate(places.tolist())
        ]
    )
    try:
        model.config.image_depth_loss_weights = [3.0, 0.0, 1.0, 0.0]
        with torch.no_grad():
            weighted = model(**inputs, labels=inputs["input_ids"]).loss_generation
    finally:
        model.config.image_depth_loss_weights = None
    expected = (per_depth[:, 0] * 0.75 + per_depth[:, 2] * 0.25).mean()
    torch.testing.assert_close(weighted, expected, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(weighted, out.loss_generation, rtol=1e-3)
    assert out.image_logits.shape == (1, inputs["input_ids"].shape[1], DEPTH, 256)
    # places that predict no image position (text, the image's last place) get no logits, and no loss
    predicts_image = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.bool)
    predicts_image[places - 1] = True
    assert not out.image_logits[0, ~predicts_image].any()
    assert out.image_logits[0, predicts_image].abs().amin(-1).gt(0).all()


def test_greedy_codes_are_the_argmax_at_every_depth(model):
    codes = model.generate_image("a red circle", guidance_scale=1.0, top_k=1, output_type="tokens", progress_bar=False)
    assert codes.shape == (1, POSITIONS, DEPTH)
    inputs = generation_sequence(model, "a red circle", codes)
    with torch.no_grad():
        logits = model(**inputs).image_logits[0, image_positions(model, inputs["input_ids"]) - 1]
    assert torch.equal(logits.argmax(-1), codes[0])
    assert len(codes.unique()) > 8  # not one code everywhere: the test can tell depths and positions apart


def test_guidance_at_every_depth_with_the_conditional_draw_in_both_rows(model):
    """CFG on the depth head's logits at every depth, the unconditional sequence fed the conditional codes: greedy
    codes are the argmax of uncond + g (cond - uncond), both teacher-forced on those same codes."""
    g = 3.0
    codes = model.generate_image(
        "a red circle", negative_prompt="blue", guidance_scale=g, top_k=1, output_type="tokens", progress_bar=False
    )
    logits = {}
    for prompt in ("a red circle", "blue"):
        inputs = generation_sequence(model, prompt, codes)
        with torch.no_grad():
            logits[prompt] = model(**inputs).image_logits[0, image_positions(model, inputs["input_ids"]) - 1]
    mixed = logits["blue"] + g * (logits["a red circle"] - logits["blue"])
    assert torch.equal(mixed.argmax(-1), codes[0])
    assert not torch.equal(logits["a red circle"].argmax(-1), codes[0])  # guidance changed some codes


def test_per_image_generators_make_batch_equal_single(model):
    kwargs = dict(guidance_scale=2.0, temperature=0.9, top_k=50, top_p=0.9, output_type="tokens", progress_bar=False)
    prompts = ["a red circle", "two blue squares at the bottom right"]
    batch = model.generate_image(prompts, generator=[torch.Generator().manual_seed(i) for i in (5, 6)], **kwargs)
    for i, (prompt, seed) in enumerate(zip(prompts, (5, 6))):
        single = model.generate_image(prompt, generator=[torch.Generator().manual_seed(seed)], **kwargs)
        assert torch.equal(batch[i : i + 1], single)
    again = model.generate_image(prompts, generator=[torch.Generator().manual_seed(i) for i in (5, 7)], **kwargs)
    assert torch.equal(again[0], batch[0]) and not torch.equal(again[1], batch[1])
    images = model.generate_image(prompts, output_type="pt", progress_bar=False)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_compiled_decoding_equals_eager_and_jacobi_is_refused(model):
    kwargs = dict(guidance_scale=3.0, top_k=1, output_type="tokens", progress_bar=False)
    prompts = ["a red circle", "blue"]
    eager = model.generate_image(prompts, **kwargs)
    config = CompileConfig(fullgraph=True, dynamic=False, mode=None, options={"freezing": True})
    assert torch.equal(model.generate_image(prompts, compile=config, **kwargs), eager)
    with pytest.raises(NotImplementedError, match="draws 4 residual codes per position"):
        model.generate_image(prompts, jacobi_window=4, **kwargs)


def test_packed_decoding_equals_eager_and_packs_the_depth_head(model, monkeypatch):
    kwargs = dict(guidance_scale=3.0, top_k=1, output_type="tokens", progress_bar=False)
    prompts = ["a red circle", "blue"]
    plain = model.generate_image(prompts, **kwargs)
    monkeypatch.setattr(packing_unifork, "MIN_PACKED_ELEMENTS", 0)
    assert torch.equal(model.generate_image(prompts, **kwargs), plain)
    packed = generation_unifork._PACKED_LINEARS[model].linears
    assert {id(m) for m in model.generation_head.modules() if type(m) is nn.Linear} <= {id(m) for m in packed}


def test_bad_image_ids_name_the_expected_shape(model):
    inputs = generation_sequence(model, "x", torch.zeros(1, POSITIONS, dtype=torch.long))
    with pytest.raises(ValueError, match=r"image_ids must be integer codes of shape \(num_images, 16, 4\)"):
        model(**inputs)
    inputs["image_ids"] = torch.full((1, POSITIONS, DEPTH), 256)
    with pytest.raises(ValueError, match=r"must be in 0..255 \(the RQ codebook\)"):
        model(**inputs)


def test_save_load_and_the_processor_reads_the_rq_tokenizer(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = UniForkForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.image_tokenizer, UniForkRQImageTokenizer)
    kwargs = dict(top_k=20, output_type="tokens", progress_bar=False)
    assert torch.equal(
        loaded.generate_image("x", generator=torch.Generator().manual_seed(0), **kwargs),
        model.generate_image("x", generator=torch.Generator().manual_seed(0), **kwargs),
    )
    processor = UniForkProcessor.from_pretrained(tmp_path)  # the tokenizer out of the model's weights
    assert isinstance(processor.image_tokenizer, UniForkRQImageTokenizer)
    image = torch.rand(2, 3, 32, 32)
    codes = processor.encode_images(list(processor.to_pil(image)))
    assert codes.shape == (2, POSITIONS, DEPTH)
    assert torch.equal(codes, model.processor.encode_images(list(processor.to_pil(image))))
    # the loaded model's own tokenizer too: SigLIP's position ids are a buffer no checkpoint holds
    embeddings = loaded.model.image_tokenizer.encoder.embeddings
    assert torch.equal(embeddings.position_ids, torch.arange(POSITIONS)[None])
    assert embeddings.position_embedding.weight.abs().amin(-1).gt(0).all()  # a table where the ids matter
    assert torch.equal(loaded.processor.encode_images(list(processor.to_pil(image))), codes)
    assert processor.decode_image_tokens(codes[:, :, :2], output_type="pt").shape == (2, 3, 32, 32)


def test_rq_tokenizer_saved_alone_builds_a_model(tmp_path):
    torch.manual_seed(0)
    tokenizer = UniForkRQImageTokenizer(DEFAULT_RQ_CONFIG)
    tokenizer.save_pretrained(tmp_path / "rq")
    tiny_llm().save_pretrained(tmp_path / "llm")
    tiny_tokenizer().save_pretrained(tmp_path / "llm")
    model = UniForkForConditionalGeneration.from_pretrained_llm(str(tmp_path / "llm"), str(tmp_path / "rq"))
    assert model.config.rq_config == tokenizer.rq_config
    for name, tensor in tokenizer.state_dict().items():
        assert torch.equal(model.model.image_tokenizer.state_dict()[name], tensor), name


def test_training_lowers_both_losses_and_trains_the_depth_head_not_the_tokenizer(model, tmp_path):
    torch.manual_seed(0)
    model = UniForkForConditionalGeneration.from_pretrained_llm(
        tiny_llm(), UniForkRQImageTokenizer(DEFAULT_RQ_CONFIG), tokenizer=tiny_tokenizer()
    )
    parts = colour_dataset(8, seed=0)
    processor = model.processor
    train = mix_tasks(
        prepare_understanding(parts["understanding"], processor),
        prepare_generation(parts["generation"], processor),
        0.5,
    )
    train = pretokenize_images(train, processor)
    assert torch.tensor(train[0]["image_ids"]).shape[1:] == (POSITIONS, DEPTH)
    args = UniForkTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=30, learning_rate=3e-3, logging_steps=1,
        save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True, seed=0, freeze="none", cfg_dropout=0.0,
    )  # fmt: skip
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = UniForkTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=UniForkDataCollator(processor),
        processing_class=processor,
    )
    trainer.train()
    logs = trainer.state.log_history
    for key in ("loss_understanding", "loss_generation"):
        values = [log[key] for log in logs if key in log]
        assert values[-1] < 0.8 * values[0], (key, values[0], values[-1])
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {n for n in changed if n.startswith("generation_head.")} == {
        n for n in before if n.startswith("generation_head.")
    }
    assert not any(n.startswith("model.image_tokenizer.") for n in changed)


def test_lora_on_the_generation_branch_trains_the_depth_head_copy_that_sampling_uses():
    """peft wraps the depth head (`modules_to_save`); `generate_image` must sample with the adapter's copy."""
    from peft import get_peft_model

    from unifork_hf.training import lora_config

    torch.manual_seed(0)
    model = UniForkForConditionalGeneration.from_pretrained_llm(
        tiny_llm(), UniForkRQImageTokenizer(DEFAULT_RQ_CONFIG), tokenizer=tiny_tokenizer()
    ).eval()
    kwargs = dict(output_type="tokens", top_k=1, guidance_scale=1.0, progress_bar=False)
    before = model.generate_image("a red circle", **kwargs)
    peft_model = get_peft_model(model, lora_config(branch="generation", train_head=True))
    head = peft_model.base_model.model.generation_head
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {
        "modules_to_save.default." + n for n, _ in model.generation_head.original_module.named_parameters()
    }
    with torch.no_grad():  # as if trained: only the adapter's copy changes
        head.modules_to_save["default"].classifier.bias.add_(
            torch.randn(256, generator=torch.Generator().manual_seed(0)) * 5
        )
    adapted = peft_model.generate_image("a red circle", **kwargs)
    assert not torch.equal(adapted, before)
    assert torch.equal(peft_model.merge_and_unload().generate_image("a red circle", **kwargs), adapted)
