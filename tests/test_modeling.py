import json

import pytest
import torch
from conftest import tiny_config, tiny_model
from safetensors.torch import load_file, save_file

from unifork_hf import GENERATION, UNDERSTANDING, UniForkForConditionalGeneration
from unifork_hf.modeling.vq_unifork import image_tokenizer_from_checkpoint

IMG = 500  # image placeholder id of tiny_config
N = 16  # image tokens of tiny_config


def image_sequence(prefix_len=5, suffix_len=2, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 400, (batch, prefix_len), generator=g)
    suffix = torch.randint(0, 400, (batch, suffix_len), generator=g)
    return torch.cat(
        [prefix, torch.full((batch, 1), 501), torch.full((batch, N), IMG), torch.full((batch, 1), 502), suffix], 1
    )


def test_mixed_batch_equals_single_task_batches():
    model = tiny_model()
    ids = image_sequence(batch=4)
    image_ids = torch.randint(0, 64, (4, N))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on one understanding and one generation row
    mask[2, :3] = 0
    labels = ids.clone()
    task = torch.tensor([UNDERSTANDING, GENERATION, UNDERSTANDING, GENERATION])
    mixed = model(input_ids=ids, image_ids=image_ids, attention_mask=mask, task=task, labels=labels)
    und = model(input_ids=ids[[0, 2]], image_ids=image_ids[[0, 2]], attention_mask=mask[[0, 2]], labels=labels[[0, 2]])
    gen = model(
        input_ids=ids[[1, 3]],
        image_ids=image_ids[[1, 3]],
        attention_mask=mask[[1, 3]],
        labels=labels[[1, 3]],
        task="generation",
    )
    torch.testing.assert_close(mixed.logits, und.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.image_logits, gen.image_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.loss_understanding, und.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.loss_generation, gen.loss, atol=1e-5, rtol=0)
    # The mixed loss is the token mean over both tasks.
    n_und = (labels[[0, 2], 1:] != -100).sum()
    n_gen = 2 * (N - 1 + 1)  # image positions 1..N-1 predicted from the previous image token, plus the first from <boi>
    expected = (und.loss * n_und + gen.loss * n_gen) / (n_und + n_gen)
    torch.testing.assert_close(mixed.loss, expected, atol=1e-5, rtol=0)


def test_each_sample_runs_through_one_branch_only():
    model = tiny_model()
    seen = {"understanding": [], "generation": [], "shared": []}
    for name, layers in [
        ("understanding", model.model.understanding_layers),
        ("generation", model.model.generation_layers),
        ("shared", model.model.shared_layers),
    ]:
        layers[0].register_forward_hook(lambda m, args, out, name=name: seen[name].append(args[0].shape[0]))
    model(input_ids=torch.randint(0, 400, (5, 7)), task=[0, 1, 1, 0, 1])
    assert seen == {"shared": [5], "understanding": [2], "generation": [3]}


def test_default_task_is_understanding_and_matches_explicit():
    model = tiny_model()
    ids = torch.randint(0, 400, (2, 6))
    out = model(input_ids=ids)
    assert out.image_logits is None and out.logits.shape == (2, 6, 512)
    torch.testing.assert_close(out.logits, model(input_ids=ids, task="understanding").logits)
    # The branches hold different weights after init, so the generation path must differ.
    assert not torch.allclose(model(input_ids=ids, task="generation").image_logits[..., :64], out.logits[..., :64])


def test_attention_is_causal():
    model = tiny_model()
    assert model.config.text_config._attn_implementation == "sdpa"
    ids = torch.randint(0, 400, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 400
    a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("task", ["understanding", "generation"])
def test_cached_step_by_step_equals_uncached(task):
    model = tiny_model()
    ids = image_sequence(batch=2)
    image_ids = torch.randint(0, 64, (2, N))
    full = model(input_ids=ids, image_ids=image_ids, task=task)
    full_logits = full.logits if task == "understanding" else full.image_logits
    prefix = ids.shape[1] - 3  # the eoi token and the text after it, one by one
    out = model(input_ids=ids[:, :prefix], image_ids=image_ids, task=task, use_cache=True)
    steps = [out.logits if task == "understanding" else out.image_logits]
    for t in range(prefix, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], task=task, cache=out.cache, use_cache=True)
        steps.append(out.logits if task == "understanding" else out.image_logits)
    torch.testing.assert_close(torch.cat(steps, 1), full_logits, atol=1e-5, rtol=0)
    assert out.cache.get_seq_length() == ids.shape[1]
    assert len(out.cache.layers) == model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("k", [0, 4])
def test_extreme_fork_points(k):
    model = tiny_model(num_shared_layers=k)
    assert len(model.model.shared_layers) == k
    assert len(model.model.understanding_layers) == len(model.model.generation_layers) == 4 - k
    ids = torch.randint(0, 400, (2, 6))
    mixed = model(input_ids=ids, task=[0, 1])
    torch.testing.assert_close(mixed.logits, model(input_ids=ids[:1]).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.image_logits, model(input_ids=ids[1:], task=1).image_logits, atol=1e-5, rtol=0)
    out = model(input_ids=ids[:, :4], task=1, use_cache=True)
    step = model(input_ids=ids[:, 4:], task=1, cache=out.cache, use_cache=True)
    torch.testing.assert_close(step.image_logits, model(input_ids=ids, task=1).image_logits[:, 4:], atol=1e-5, rtol=0)


def test_generation_labels_target_the_image_codes():
    model = tiny_model()
    ids = image_sequence()
    image_ids = torch.randint(0, 64, (1, N))
    labels = ids.clone()
    out = model(input_ids=ids, image_ids=image_ids, labels=labels, task="generation")
    first = ids[0].tolist().index(IMG)
    # position p predicts the code at p+1: <boi> predicts code 0, image token i predicts code i+1
    logits = out.image_logits[0, first - 1 : first - 1 + N]
    expected = torch.nn.functional.cross_entropy(logits, image_ids[0])
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.loss_generation, expected)
    assert out.loss_understanding is None
    # -100 removes positions from the loss
    labels[0, first : first + N // 2] = -100
    half = model(input_ids=ids, image_ids=image_ids, labels=labels, task="generation").loss
    torch.testing.assert_close(half, torch.nn.functional.cross_entropy(logits[N // 2 :], image_ids[0, N // 2 :]))


def test_pixel_values_go_through_the_vq():
    model = tiny_model()
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    codes = model.model.image_tokenizer.encode(pixels)
    assert codes.shape == (1, N) and codes.dtype == torch.long
    ids = image_sequence()
    a = model(input_ids=ids, pixel_values=pixels)
    b = model(input_ids=ids, image_ids=codes)
    torch.testing.assert_close(a.logits, b.logits)
    assert torch.equal(a.image_ids, codes)


def test_tiled_vq_codes_depend_on_their_own_tile_only(tmp_path):
    # 16 px images, 8 px tiles, VQ factor 4: each tile is a 2x2 block of the 4x4 code grid
    model = tiny_model(image_size=16, vq_tile_size=8)
    vq = model.model.image_tokenizer
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = vq.encode(pixels).reshape(2, 4, 4)
    tile = vq.vq.quantize(vq.vq.encode(pixels[1:2, :, 8:16, 0:8]).latents)[2][2].reshape(2, 2)
    assert torch.equal(codes[1, 2:4, 0:2], tile)  # bottom-left tile -> rows 2-3, columns 0-1
    changed = pixels.clone()
    changed[:, :, 0:8, 8:16] = -pixels[:, :, 0:8, 8:16]  # top-right tile only
    new_codes = vq.encode(changed).reshape(2, 4, 4)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0:2, 2:4] = False
    assert torch.equal(new_codes[:, keep], codes[:, keep])
    entries = vq.vq.quantize.get_codebook_entry(tile.flatten(), (1, 2, 2, vq.codebook.shape[1]))
    one = vq.vq.decode(entries, force_not_quantize=True).sample.clamp(-1, 1)
    torch.testing.assert_close(vq.decode(codes.reshape(2, -1))[1:2, :, 8:16, 0:8], one)
    # the tile size survives save/load, for the model and for the processor-side loader
    model.save_pretrained(tmp_path)
    assert UniForkForConditionalGeneration.from_pretrained(tmp_path).model.image_tokenizer.tile_size == 8
    assert image_tokenizer_from_checkpoint(tmp_path).tile_size == 8
    with pytest.raises(ValueError, match="vq_tile_size must be a positive multiple"):
        tiny_config(image_size=16, vq_tile_size=6)
    with pytest.raises(ValueError, match="multiples of the VQ tile size 8"):
        vq.encode(torch.zeros(1, 3, 16, 18))


def test_vq_is_frozen_and_the_rest_trains():
    model = tiny_model().train()
    assert not any(p.requires_grad for p in model.model.image_tokenizer.parameters())
    out = model(
        input_ids=image_sequence(batch=2),
        image_ids=torch.randint(0, 64, (2, N)),
        task=[0, 1],
        labels=image_sequence(batch=2),
    )
    out.loss.backward()
    assert model.model.understanding_layers[0].mlp.up_proj.weight.grad is not None
    assert model.model.generation_layers[0].mlp.up_proj.weight.grad is not None
    assert model.model.image_projector.linear_1.weight.grad is not None


def test_activation_checkpointing_gives_the_same_gradients():
    ids, labels = image_sequence(batch=2), image_sequence(batch=2)
    image_ids = torch.randint(0, 64, (2, N))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.shared_layers[0].gradient_checkpointing
        model(input_ids=ids, image_ids=image_ids, task=[0, 1], labels=labels).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = UniForkForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, image_ids = image_sequence(batch=2), torch.randint(0, 64, (2, N))
    for task in ("understanding", "generation"):
        a = model(input_ids=ids, image_ids=image_ids, task=task)
        b = loaded(input_ids=ids, image_ids=image_ids, task=task)
        assert torch.equal(
            a.logits if a.logits is not None else a.image_logits, b.logits if b.logits is not None else b.image_logits
        )
    assert torch.equal(model.model.image_tokenizer.codebook, loaded.model.image_tokenizer.codebook)
    assert loaded.processor is None


def test_checkpoint_without_vq_weights_raises(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "image_tokenizer" not in k},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    (tmp_path / "weights.sha256").unlink()  # (a checkpoint saved by other code: no checksums to check)
    with pytest.raises(ValueError, match="lacks the image tokenizer weights"):
        UniForkForConditionalGeneration.from_pretrained(tmp_path)


def test_checkpoint_that_does_not_match_its_config_raises(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("generation_head")},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    (tmp_path / "weights.sha256").unlink()  # (a checkpoint saved by other code: no checksums to check)
    with pytest.raises(ValueError, match=r"1 weights missing \(e.g. \['generation_head.weight'\]\), 0 unused"):
        UniForkForConditionalGeneration.from_pretrained(tmp_path)  # used to load with a random head, warning only
    model = UniForkForConditionalGeneration.from_pretrained(tmp_path, allow_missing_weights=True)
    assert model.generation_head.weight.shape == weights["generation_head.weight"].shape
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_shared_layers"] += 1  # the weights of one branch layer per branch now have no place
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weights missing .* unused .*\(num_shared_layers"):
        UniForkForConditionalGeneration.from_pretrained(tmp_path)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    ids = image_sequence()
    with pytest.raises(ValueError, match="image placeholders must match the number of images"):
        model(input_ids=ids, image_ids=torch.randint(0, 64, (2, N)))
    with pytest.raises(ValueError, match=r"in 0\.\.63 \(the VQ codebook\)"):
        model(input_ids=ids, image_ids=torch.full((1, N), 64))
    with pytest.raises(ValueError, match=r"image_ids must be integer codes of shape \(num_images, 16\)"):
        model(input_ids=ids, image_ids=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="no pixel_values or image_ids"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="task must be 'understanding' or 'generation'"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long), task="captioning")
    with pytest.raises(ValueError, match="one entry per sample"):
        model(input_ids=torch.zeros(3, 3, dtype=torch.long), task=[0, 1])
    with pytest.raises(ValueError, match="use_cache needs a batch of a single task"):
        model(input_ids=torch.zeros(2, 3, dtype=torch.long), task=[0, 1], use_cache=True)
    with pytest.raises(ValueError, match=r"input_ids must be in 0\.\.511, got values from 0 to 512"):
        model(input_ids=torch.tensor([[0, 512, 3]]))
    with pytest.raises(ValueError, match=r"input_ids must be in 0\.\.511, got values from -2 to 3"):
        model(input_ids=torch.tensor([[-2, 3]]))
    for bad in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 3), torch.zeros(3, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"input_ids must be a non-empty \(batch, length\) tensor of integer"):
            model(input_ids=bad)
    pixels = torch.zeros(1, 3, 32, 32)
    for bad, shown in (
        (pixels + 255, "from 255.0 to 255.0"),
        (pixels.index_fill(1, torch.tensor([0]), float("nan")), "nan"),
    ):
        with pytest.raises(ValueError, match=rf"pixel_values must be finite numbers in \[-1, 1\].*{shown}"):
            model(input_ids=ids, pixel_values=bad)
    with pytest.raises(
        ValueError, match=r"attention_mask must have shape \(batch, cached \+ new tokens\) = \(1, 25\), got \(1, 26\)"
    ):
        model(input_ids=ids, image_ids=torch.zeros(1, N, dtype=torch.long), attention_mask=torch.ones(1, 26))
    with pytest.raises(ValueError, match="labels must have the shape of the input"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    out = model(input_ids=torch.zeros(1, 3, dtype=torch.long), task="understanding", use_cache=True)
    with pytest.raises(ValueError, match="other branch"):
        model(input_ids=torch.zeros(1, 1, dtype=torch.long), task="generation", cache=out.cache)


def test_a_preset_model_without_image_tokens_runs_text_and_says_why_it_cannot_take_images():
    from unifork_hf import UniForkConfig

    torch.manual_seed(0)
    model = UniForkForConditionalGeneration(UniForkConfig.from_preset("unifork-tiny")).eval()
    assert model.config.image_token_id is None
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    # used to raise AttributeError: 'bool' object has no attribute 'any'
    for task, head, size in (
        ("understanding", "logits", model.config.text_config.vocab_size),
        ("generation", "image_logits", model.config.codebook_size),
    ):
        logits = getattr(model(input_ids=ids, task=task), head)
        assert logits.shape == (1, 5, size) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="config.image_token_id is None"):
        model(input_ids=ids, image_ids=torch.zeros(1, model.config.num_image_tokens, dtype=torch.long))


def test_hidden_states_follow_each_sample_along_its_path():
    model = tiny_model()
    ids = torch.randint(0, 400, (3, 6))
    mixed = model(input_ids=ids, task=[0, 1, 0], output_hidden_states=True).hidden_states
    und = model(input_ids=ids[[0, 2]], output_hidden_states=True).hidden_states
    gen = model(input_ids=ids[[1]], task=1, output_hidden_states=True).hidden_states
    assert len(mixed) == len(und) == len(gen) == 1 + 4  # embeddings + K shared + L-K branch layers
    for depth in range(5):
        torch.testing.assert_close(mixed[depth][[0, 2]], und[depth], atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[depth][[1]], gen[depth], atol=1e-5, rtol=0)
    # the shared part is the same for both tasks, the branches differ
    torch.testing.assert_close(
        und[2][1], model(input_ids=ids[[2]], task=1, output_hidden_states=True).hidden_states[2][0]
    )
    assert not torch.allclose(
        und[4][1], model(input_ids=ids[[2]], task=1, output_hidden_states=True).hidden_states[4][0]
    )
