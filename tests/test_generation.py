import numpy as np
import pytest
import torch
from PIL import Image

from unifork_hf import UniForkForConditionalGeneration


def seeds(*values):
    return [torch.Generator().manual_seed(v) for v in values]


def test_same_seed_same_images_different_seed_different(built_model):
    kwargs = dict(output_type="tokens", progress_bar=False)
    a = built_model.generate_image("a red circle", generator=torch.Generator().manual_seed(0), **kwargs)
    b = built_model.generate_image("a red circle", generator=torch.Generator().manual_seed(0), **kwargs)
    c = built_model.generate_image("a red circle", generator=torch.Generator().manual_seed(1), **kwargs)
    assert a.shape == (1, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_of_different_lengths_equals_each_alone(built_model):
    prompts = ["a red circle", "two blue squares at the bottom right and a green triangle", "cat"]
    batched = built_model.generate_image(prompts, generator=seeds(0, 1, 2), output_type="tokens", progress_bar=False)
    for i, prompt in enumerate(prompts):
        alone = built_model.generate_image(prompt, generator=seeds(i), output_type="tokens", progress_bar=False)
        assert torch.equal(batched[i], alone[0]), prompt
    chunked = built_model.generate_image(prompts, generator=seeds(0, 1, 2), output_type="tokens", max_batch_size=2,
                                         progress_bar=False)  # fmt: skip
    assert torch.equal(chunked, batched)


def test_sampling_follows_the_guided_logits_of_an_uncached_forward(built_model):
    assert_sampling_follows_uncached_forward(built_model)


def test_learned_image_position_embeddings_are_added_by_place_in_training_and_sampling(tiny_parts, tmp_path):
    model = UniForkForConditionalGeneration.from_pretrained_llm(*tiny_parts, learn_image_position_embeddings=True)
    table = model.model.image_projector.position_embeddings
    assert table.shape == (64, model.config.text_config.hidden_size) and not table.any()  # starts as the paper's
    with torch.no_grad():
        table.normal_()
    codes = torch.randint(0, 64, (1, 64))
    inner = model.model
    without = inner.embed_image_codes(codes)
    torch.testing.assert_close(inner.embed_image_codes(codes, torch.arange(64)), without + table)
    model.save_pretrained(tmp_path / "m")
    model = UniForkForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(model.model.image_projector.position_embeddings, table)
    # the cached sampling loop adds each drawn code's place exactly as a full forward over the image does
    assert_sampling_follows_uncached_forward(model)


def assert_sampling_follows_uncached_forward(model):
    """top_k=1 makes sampling argmax; replay the codes through full forwards and check every step."""
    processor = model.processor
    scale = 3.0
    codes = model.generate_image("a red circle", guidance_scale=scale, top_k=1, output_type="tokens", progress_bar=False)
    n = model.config.num_image_tokens
    logits = []
    for prompt in ("a red circle", ""):
        ids = processor.image_generation_inputs([prompt]).input_ids
        ids = torch.cat([ids, torch.full((1, n), model.config.image_token_id)], 1)
        with torch.no_grad():
            out = model(input_ids=ids, image_ids=codes, task="generation")
        logits.append(out.image_logits[0, -n - 1 : -1])
    cond, uncond = logits
    guided = uncond.log_softmax(-1) + scale * (cond.log_softmax(-1) - uncond.log_softmax(-1))
    assert torch.equal(guided.argmax(-1), codes[0])


def test_output_types_and_images_per_prompt(built_model):
    images = built_model.generate_image(["a red circle", "two blue squares"], num_images_per_prompt=2,
                                        generator=seeds(0, 1, 2, 3), progress_bar=False)  # fmt: skip
    assert len(images) == 4 and all(isinstance(i, Image.Image) and i.size == (32, 32) for i in images)
    pixels = built_model.generate_image(["a red circle", "two blue squares"], num_images_per_prompt=2,
                                        generator=seeds(0, 1, 2, 3), output_type="pt", progress_bar=False)  # fmt: skip
    assert pixels.shape == (4, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    assert torch.equal(torch.from_numpy(np.array(images[3])).float(),
                       (pixels[3] * 255).round().permute(1, 2, 0))  # fmt: skip
    # guidance 1 runs no unconditional sequence, and top_p / temperature / negative prompts are accepted
    tokens = built_model.generate_image("x", guidance_scale=1.0, temperature=0.7, top_p=0.9, negative_prompt="blur",
                                        output_type="tokens", progress_bar=False)  # fmt: skip
    assert tokens.shape == (1, 64)


def test_negative_prompt_changes_the_unconditional_branch(built_model):
    kwargs = dict(top_k=1, output_type="tokens", progress_bar=False)
    plain = built_model.generate_image("a red circle", **kwargs)
    negative = built_model.generate_image("a red circle", negative_prompt="two blue squares", **kwargs)
    assert not torch.equal(plain, negative)


def test_generate_image_errors(built_model, built_dir):
    with pytest.raises(TypeError, match="prompt must be a str"):
        built_model.generate_image(3)
    with pytest.raises(ValueError, match="output_type"):
        built_model.generate_image("x", output_type="np")
    with pytest.raises(ValueError, match="guidance_scale"):
        built_model.generate_image("x", guidance_scale=0.5)
    with pytest.raises(ValueError, match="generator is a list of 1, but 2 images"):
        built_model.generate_image("x", num_images_per_prompt=2, generator=seeds(0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        built_model.generate_image("a very long prompt " * 60, progress_bar=False)
    bare = UniForkForConditionalGeneration.from_pretrained(built_dir)
    bare.processor = None
    with pytest.raises(ValueError, match="needs a processor.*model.processor = UniForkProcessor.from_pretrained"):
        bare.generate_image("a red circle")


def test_text_generation_with_an_image_uses_the_cache_correctly(built_model):
    processor = built_model.processor
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (40, 40), "red"), text=text, return_tensors="pt")
    cached = built_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    uncached = built_model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    static = built_model.generate(**inputs, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert cached.shape == (1, inputs.input_ids.shape[1] + 8)
    assert torch.equal(cached, uncached) and torch.equal(cached, static)
    assert built_model.config.image_token_id not in cached[0, inputs.input_ids.shape[1] :].tolist()
    assert isinstance(processor.decode(cached[0, inputs.input_ids.shape[1] :]), str)


def test_batched_text_generation_with_left_padding_equals_single(built_model):
    processor = built_model.processor
    texts = ["<|user|>\nhi\n<|assistant|>\n", "<|user|>\nWhat shape is at the bottom right?\n<|assistant|>\n"]
    batch = processor(text=texts, padding=True, return_tensors="pt")
    assert batch.attention_mask[0, 0] == 0  # left padded
    out = built_model.generate(**batch, max_new_tokens=6, do_sample=False)
    for i, text in enumerate(texts):
        single = processor(text=[text], return_tensors="pt")
        alone = built_model.generate(**single, max_new_tokens=6, do_sample=False)
        assert torch.equal(out[i, -6:], alone[0, -6:])
