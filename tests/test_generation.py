import numpy as np
import pytest
import torch
from conftest import swap_head_rows
from PIL import Image
from transformers import CompileConfig

from unifork_hf import DEFAULT_IMAGE_GENERATION, UniForkForConditionalGeneration
from unifork_hf.modeling.generation_unifork import _draw_device, _uniform, _verify_drafts


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
    chunked = built_model.generate_image(
        prompts, generator=seeds(0, 1, 2), output_type="tokens", max_batch_size=2, progress_bar=False
    )
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
    codes = model.generate_image(
        "a red circle", guidance_scale=scale, top_k=1, output_type="tokens", progress_bar=False
    )
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
    images = built_model.generate_image(
        ["a red circle", "two blue squares"], num_images_per_prompt=2, generator=seeds(0, 1, 2, 3), progress_bar=False
    )
    assert len(images) == 4 and all(isinstance(i, Image.Image) and i.size == (32, 32) for i in images)
    pixels = built_model.generate_image(
        ["a red circle", "two blue squares"],
        num_images_per_prompt=2,
        generator=seeds(0, 1, 2, 3),
        output_type="pt",
        progress_bar=False,
    )
    assert pixels.shape == (4, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    assert torch.equal(torch.from_numpy(np.array(images[3])).float(), (pixels[3] * 255).round().permute(1, 2, 0))


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
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            built_model.generate_image("x", guidance_scale=bad)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        built_model.generate_image("x", temperature=0)
    with pytest.raises(ValueError, match=r"top_k must be None or an int >= 0"):
        built_model.generate_image("x", top_k=-1)
    with pytest.raises(ValueError, match=r"top_p must be None or in \(0, 1\]"):
        built_model.generate_image("x", top_p=1.5)
    with pytest.raises(ValueError, match="generator is a list of 1, but 2 images"):
        built_model.generate_image("x", num_images_per_prompt=2, generator=seeds(0))
    with pytest.raises(TypeError, match="compile must be a bool or a transformers CompileConfig, got 'max-autotune'"):
        built_model.generate_image("x", compile="max-autotune")
    for bad in (0, [0]):  # a seed is not a generator
        with pytest.raises(TypeError, match=r"generator must be None, a torch.Generator or a list of them .*got \[?0"):
            built_model.generate_image("x", generator=bad)
    for bad in (-1, 0, 2.5):
        with pytest.raises(ValueError, match=rf"max_batch_size must be None or a positive int, got {bad}"):
            built_model.generate_image("x", max_batch_size=bad)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        built_model.generate_image("a very long prompt " * 60, progress_bar=False)
    bare = UniForkForConditionalGeneration.from_pretrained(built_dir)
    bare.processor = None
    with pytest.raises(ValueError, match="needs a processor.*model.processor = UniForkProcessor.from_pretrained"):
        bare.generate_image("a red circle")


def test_sampling_defaults_come_from_the_checkpoints_generation_config(built_model, tmp_path):
    def tokens(model, **kwargs):
        return model.generate_image(
            ["a red circle", "a blue square"], generator=seeds(0, 1), output_type="tokens", progress_bar=False, **kwargs
        )

    # a fresh model: the library defaults (guidance 5, temperature 1)
    assert built_model.image_generation_settings() == DEFAULT_IMAGE_GENERATION
    assert torch.equal(tokens(built_model), tokens(built_model, guidance_scale=5.0, temperature=1.0))
    built_model.generation_config.image_generation = {"guidance_scale": 1.0, "temperature": 0.5, "top_k": 8}
    built_model.save_pretrained(tmp_path)
    built_model.generation_config.image_generation = None  # back to the library defaults
    saved = UniForkForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert saved.generation_config.image_generation == {"guidance_scale": 1.0, "temperature": 0.5, "top_k": 8}
    unguided = tokens(saved)
    assert torch.equal(unguided, tokens(saved, guidance_scale=1.0, temperature=0.5, top_k=8))
    assert not torch.equal(unguided, tokens(saved, guidance_scale=5.0, temperature=0.5, top_k=8))
    assert not torch.equal(unguided, tokens(built_model, guidance_scale=5.0, temperature=1.0))
    # explicit arguments win over the checkpoint; 0 / 1.0 turn its top-k / top-p off
    assert torch.equal(tokens(saved, temperature=1.0, top_k=0), tokens(built_model, guidance_scale=1.0))
    assert saved.image_generation_settings(top_p=0.9) == {
        "guidance_scale": 1.0,
        "temperature": 0.5,
        "top_k": 8,
        "top_p": 0.9,
    }
    # text generation ignores them (greedy answers stay greedy)
    assert saved.generation_config.temperature is None and not saved.generation_config.do_sample
    saved.generation_config.image_generation = {"guidance_scale": 0.5}
    with pytest.raises(
        ValueError, match=r"guidance_scale must be a finite number >= 1.*generation_config.image_generation"
    ):
        saved.generate_image("x")
    saved.generation_config.image_generation = {"guidance": 2.0}
    with pytest.raises(ValueError, match="must be a dict with keys from"):
        saved.generate_image("x")


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


class FixedLogits(torch.nn.Module):
    """A generation head whose distribution ignores the context: exact reference for the sampler."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.calls = 0

    def forward(self, hidden):
        self.calls += 1
        return self.logits.expand(*hidden.shape[:-1], -1)


def test_speculative_jacobi_decoding_is_exact_for_greedy_and_uses_fewer_forwards(built_model):
    prompts = ["a red circle", "two blue squares at the bottom right and a green triangle", "cat"]  # left padding
    kwargs = dict(guidance_scale=3.0, top_k=1, output_type="tokens", progress_bar=False)
    plain = built_model.generate_image(prompts, **kwargs)
    for window in (2, 5, 100):
        assert torch.equal(built_model.generate_image(prompts, jacobi_window=window, **kwargs), plain), window
    # a context-free head: every draft (drawn from the last distribution seen) is accepted
    head = FixedLogits(torch.randn(built_model.config.codebook_size))
    built_model.generation_head = head
    codes = built_model.generate_image(prompts, jacobi_window=16, **kwargs)
    assert (codes == head.logits.argmax()).all()
    assert head.calls == 1 + 4  # the prefill (1 code), then 15 drafts + 1 code a forward


def test_compiled_decoding_equals_eager_reuses_its_compilation_and_follows_weight_changes(built_dir):
    model = UniForkForConditionalGeneration.from_pretrained(built_dir).eval()
    assert model._decoding_compile_config(True).options is None  # on CPU: no freezing (test_packing.py tests it)
    # inductor with frozen weights and without the slow GEMM autotuning; no graph break allowed
    config = CompileConfig(fullgraph=True, dynamic=False, mode=None, options={"freezing": True})
    kwargs = dict(guidance_scale=3.0, top_k=1, output_type="tokens", progress_bar=False)
    prompts = ["a red circle", "two blue squares at the bottom right and a green triangle"]  # left padding
    eager = model.generate_image(prompts, **kwargs)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(model.generate_image(prompts, compile=config, **kwargs), eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    compiled_step = model._decoding_state["forward"]

    other = ["cat", "a green triangle"]  # another prompt length: the same compiled step and cache
    assert torch.equal(model.generate_image(other, compile=config, **kwargs), model.generate_image(other, **kwargs))
    assert model._decoding_state["forward"] is compiled_step
    assert torch.equal(model.generate_image(prompts, compile=config, jacobi_window=4, **kwargs), eager)

    fingerprint = model._decoding_state["fingerprint"]
    swap_head_rows(model, eager)  # behind autograd's back; each tensor's sum stays the same
    changed = model.generate_image(prompts, **kwargs)
    assert not torch.equal(changed, eager)
    # The compiled step holds a frozen copy of the weights (where its speed comes from): had the change gone
    # unnoticed, its steps would still decode with the old weights (only the eager prefill sees the new ones)...
    model._decoding_state["fingerprint"] = model._weights_fingerprint()
    assert not torch.equal(model.generate_image(prompts, compile=config, **kwargs), changed)
    assert model._decoding_state["forward"] is compiled_step
    # ...so the fingerprint makes it compile again.
    model._decoding_state["fingerprint"] = fingerprint
    assert torch.equal(model.generate_image(prompts, compile=config, **kwargs), changed)
    assert model._decoding_state["forward"] is not compiled_step


def test_weights_fingerprint_sees_content_changes_a_sum_misses(built_model):
    before = built_model._weights_fingerprint()
    assert torch.equal(built_model._weights_fingerprint(), before)  # deterministic
    weight = built_model.generation_head.weight.data
    saved = weight.clone()
    for change in (
        lambda w: w.index_copy_(0, torch.tensor([0, 1]), w[[1, 0]].clone()),  # rows swapped
        lambda w: w.copy_(w.flip(1).clone()),  # columns reversed
        lambda w: w[3, 5].add_(1e-3),
    ):
        try:
            change(weight)
            assert torch.isclose(weight.sum(), saved.sum(), rtol=0, atol=1.1e-3)
            assert not torch.equal(built_model._weights_fingerprint(), before)
        finally:
            weight.copy_(saved)
    assert torch.equal(built_model._weights_fingerprint(), before)


def test_verified_drafts_are_distributed_as_the_model():
    # Speculative sampling's guarantee, per place: a draft drawn from q, kept with probability
    # min(1, p/q) and otherwise replaced by a draw from max(0, p - q), is distributed as p.
    torch.manual_seed(0)
    size, images = 8, 20000
    p = (2 * torch.randn(2, size)).softmax(-1).expand(images, 2, size)  # the drafted place and the next
    q = (2 * torch.randn(size)).softmax(-1).expand(images, 1, size)
    drafts = torch.multinomial(q[:, 0], 1)
    accepted, codes = _verify_drafts(p, drafts, q, torch.Generator().manual_seed(0))
    assert accepted == 0  # the batch advances by the fewest accepted: some image rejected its draft
    kept = codes == drafts[:, 0]
    assert 0 < kept.float().mean() < 1
    assert total_variation(codes, p[0, 0]) < 0.015
    # drafts drawn from p itself are all accepted, and the place after is a free draw from its p
    drafts = torch.multinomial(p[:, 0], 1)
    accepted, codes = _verify_drafts(p, drafts, p[:, :1], torch.Generator().manual_seed(1))
    assert accepted == 1 and total_variation(codes, p[0, 1]) < 0.015


def total_variation(codes, probs):
    return 0.5 * (torch.bincount(codes, minlength=probs.numel()) / codes.numel() - probs).abs().sum()


def test_temperature_and_top_p_sample_the_distribution_they_define(built_model):
    logits = torch.full((built_model.config.codebook_size,), -30.0)
    logits[:5] = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    built_model.generation_head = FixedLogits(logits)
    for temperature, top_p in ((0.5, None), (2.0, None), (1.0, 0.8), (2.0, 0.5)):
        expected = (logits / temperature).softmax(-1)
        if top_p is not None:  # the most likely codes until their mass reaches top_p, renormalised
            ordered, order = expected.sort(descending=True)
            keep = order[(ordered.cumsum(0) - ordered) < top_p]
            expected = torch.zeros_like(expected).index_fill(0, keep, 1.0) * expected
            expected /= expected.sum()
        codes = built_model.generate_image(
            ["a red circle"] * 40,
            guidance_scale=1.0,
            temperature=temperature,
            top_p=top_p,
            output_type="tokens",
            generator=torch.Generator().manual_seed(0),
            progress_bar=False,
        ).flatten()
        assert total_variation(codes, expected) < 0.04, (temperature, top_p)
        assert expected[codes].min() > 0  # nothing outside the nucleus


def test_speculative_jacobi_decoding_samples_the_model_distribution(built_model):
    # end to end with a context-free head: the loop's bookkeeping keeps every code distributed as p
    torch.manual_seed(0)
    logits = 2 * torch.randn(built_model.config.codebook_size)
    built_model.generation_head = head = FixedLogits(logits)
    codes = built_model.generate_image(
        ["a red circle"] * 64,
        guidance_scale=1.0,
        jacobi_window=8,
        output_type="tokens",
        generator=torch.Generator().manual_seed(0),
        progress_bar=False,
    )
    assert total_variation(codes.flatten(), logits.softmax(-1)) < 0.06
    assert head.calls < 64 / 4  # fewer forwards than codes
    with pytest.raises(ValueError, match="jacobi_window must be None or a positive int, got 0"):
        built_model.generate_image("x", jacobi_window=0)
    built_model.model.layer_types[-1] = "sliding_attention"  # as in a Qwen2 with use_sliding_window
    with pytest.raises(NotImplementedError, match="jacobi_window needs full-attention layers"):
        built_model.generate_image("x", jacobi_window=2)


@pytest.mark.parametrize("question_first", [False, True, None])  # None: the default, question first
def test_benchmark_answers_put_the_question_where_asked(built_model, monkeypatch, question_first):
    from unifork_hf.evaluation.answers import answer_questions

    processor = built_model.processor
    prompts, fed = [], []
    render = processor.apply_chat_template
    monkeypatch.setattr(
        processor, "apply_chat_template", lambda *a, **k: prompts.append(render(*a, **k)) or prompts[-1]
    )
    generate = built_model.generate
    monkeypatch.setattr(built_model, "generate", lambda **k: fed.append(k["input_ids"]) or generate(**k))
    images = [Image.new("RGB", (32, 32), (200, 30, 30))] * 2
    questions = ["What colour is the shape?", "How many shapes are there?"]
    order = {} if question_first is None else {"question_first": question_first}
    answers = answer_questions(built_model, images, questions, progress_bar=False, **order)
    question_first = question_first is not False
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    for prompt, question in zip(prompts, questions):
        assert (prompt.index(question) < prompt.index(processor.image_token)) == question_first, prompt
    # the model is fed those prompts: the first question token comes after the image tokens only if asked so
    image_id = built_model.config.image_token_id
    question_id = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.tokenize("What")[0])
    row = fed[0][0].tolist()
    assert (row.index(question_id) < row.index(image_id)) == question_first


def test_draws_happen_on_the_generators_device_and_land_on_the_models():
    # (the meta device stands in for a GPU here: a CPU generator cannot draw there, only be moved there)
    meta = torch.device("meta")
    assert _draw_device(torch.Generator(), meta).type == "cpu"
    assert _draw_device(seeds(0, 1), meta).type == "cpu"
    assert _draw_device(None, meta).type == "meta"
    assert _uniform((2, 3), seeds(0, 1), meta).device.type == "meta"
    assert _uniform((2, 3), torch.Generator().manual_seed(0), meta).shape == (2, 3)
    # on the CPU: row i is generator i's own draw
    assert torch.equal(_uniform((2, 3), seeds(4, 5), torch.device("cpu"))[1], torch.rand(3, generator=seeds(5)[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("jacobi_window", [None, 4])
def test_cpu_generators_draw_the_same_images_on_the_gpu(built_dir, jacobi_window):
    # diffusers' convention: a CPU generator seeds a model on the GPU, and the same seed draws the same images there
    prompts = ["a red circle", "two blue squares at the bottom right", "cat"]
    kwargs = dict(output_type="tokens", progress_bar=False, jacobi_window=jacobi_window)
    cpu = UniForkForConditionalGeneration.from_pretrained(built_dir).eval()
    gpu = UniForkForConditionalGeneration.from_pretrained(built_dir).to("cuda").eval()
    on_cpu = cpu.generate_image(prompts, generator=seeds(0, 1, 2), **kwargs)
    on_gpu = gpu.generate_image(prompts, generator=seeds(0, 1, 2), **kwargs).cpu()
    # float32 matmuls differ in the last bits between devices, which may move a draw sitting on a boundary
    assert (on_cpu == on_gpu).float().mean() > 0.95
    # one generator for the batch (Jacobi decoding accepts drafts batch-wide, so compare batch with batch)
    one_on_cpu = cpu.generate_image(prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    one_on_gpu = gpu.generate_image(prompts, generator=torch.Generator().manual_seed(0), **kwargs).cpu()
    assert (one_on_cpu == one_on_gpu).float().mean() > 0.95
