"""Own data, as library calls: train the VQ image tokenizer, build or adopt a text tokenizer, fork an LLM that
takes its image geometry from the VQ."""

import logging

import pytest
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.tiny import tiny_llm, tiny_tokenizer, tiny_vq
from unifork_hf.evaluation import copy_report
from unifork_hf.modeling.rq_unifork import UniForkRQImageTokenizer
from unifork_hf.modeling.vq_unifork import UniForkVQImageTokenizer
from unifork_hf.training import (
    build_text_tokenizer,
    prepare_text_tokenizer,
    reconstruction_metrics,
    small_vq,
    train_vq_tokenizer,
)

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]


def quadrant_images(n: int, seed: int = 0) -> list:
    """16x16 images, each 8x8 quadrant one flat colour: a tile-trained VQ can reconstruct them exactly."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n):
        image = Image.new("RGB", (16, 16))
        draw = ImageDraw.Draw(image)
        for q, colour in enumerate(torch.randint(0, len(COLOURS), (4,), generator=generator).tolist()):
            x, y = (q % 2) * 8, (q // 2) * 8
            draw.rectangle([x, y, x + 7, y + 7], fill=COLOURS[colour])
        images.append(image)
    return images


@pytest.fixture(scope="module")
def trained_vq():
    images = quadrant_images(64)
    vq, metrics = train_vq_tokenizer(
        images,
        tile_size=8,
        codebook_size=64,
        max_steps=200,
        batch_size=32,
        reseed_every=50,
        eval_images=quadrant_images(16, seed=1),
        progress=False,
    )
    return vq, metrics


def test_train_vq_tokenizer_learns_to_reconstruct(trained_vq):
    vq, metrics = trained_vq
    # independent baseline: the same architecture untrained, on the same held-out images
    untrained = UniForkVQImageTokenizer(vq_model=small_vq(8, 64), tile_size=8)
    from unifork_hf.training.image_tokenizer import UniForkImageProcessorPil, images_to_tensor

    pixels = images_to_tensor(quadrant_images(16, seed=1), UniForkImageProcessorPil(size={"height": 16, "width": 16}))
    before = reconstruction_metrics(untrained, pixels)
    assert metrics["mse"] < before["mse"] / 10, (metrics, before)
    assert metrics["psnr"] > 15
    assert metrics["dead_codes_reseeded"] > 0  # 64 codes for 6 colours: most go unused and get re-seeded
    assert 2 <= metrics["codes_used"] <= metrics["codebook_size"] == 64
    assert vq.config["_unifork_image_size"] == 16 and vq.config["_unifork_tile_size"] == 8
    assert not any(p.requires_grad for p in vq.parameters()) and not vq.training
    # flat colours encode alike: a vector drawn for two codes would give one tile two ids, which rounding swaps
    book = vq.quantize.embedding.weight
    nearest = torch.cdist(book, book).fill_diagonal_(float("inf")).min(1).values
    assert nearest.min() > 1e-3 * book.abs().max(), nearest.min()


def test_reseeding_draws_distinct_vectors_that_are_not_codes_yet():
    from unifork_hf.training.image_tokenizer import _distinct_draw

    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    flat = torch.tensor([[3.0, 3.0]]).expand(50, 2)  # a flat region: one vector, many times
    twin = torch.tensor([[3.0, 3.0 + 1e-6]])  # the same up to rounding
    near_far = torch.tensor([[-2.0, 0.0], [0.0, -2.0]])
    candidates = torch.cat([flat, twin, codebook, near_far, codebook])  # codebook rows: already codes
    drawn = _distinct_draw(candidates, codebook, 10, torch.Generator().manual_seed(0))
    assert len(drawn) == 3  # (3, 3) once, the two far ones; never a code, never twice
    assert {tuple(round(v, 4) for v in row.tolist()) for row in drawn} == {(3.0, 3.0), (-2.0, 0.0), (0.0, -2.0)}
    assert len(_distinct_draw(candidates, codebook, 1, torch.Generator().manual_seed(0))) == 1
    assert len(_distinct_draw(codebook, codebook, 4, torch.Generator().manual_seed(0))) == 0


def test_tiles_make_codes_local(trained_vq):
    vq, _ = trained_vq
    tokenizer = UniForkVQImageTokenizer(vq_model=vq, tile_size=8)
    pixels = torch.full((1, 3, 16, 16), -1.0)
    changed = pixels.clone()
    changed[:, :, :8, :8] = 1  # the top-left tile only
    a, b = tokenizer.encode(pixels).reshape(4, 4), tokenizer.encode(changed).reshape(4, 4)
    assert not torch.equal(a[:2, :2], b[:2, :2])
    assert torch.equal(a[2:], b[2:]) and torch.equal(a[:, 2:], b[:, 2:])


def test_the_vq_records_its_geometry_and_the_fork_uses_it(trained_vq, tmp_path, caplog):
    vq, _ = trained_vq
    vq.save_pretrained(tmp_path / "vq")  # the geometry survives save/load without diffusers' unknown-key warning
    with caplog.at_level(logging.WARNING):
        hf_logging.enable_propagation()
        try:
            model = UniForkForConditionalGeneration.from_pretrained_llm(
                tiny_llm(), str(tmp_path / "vq"), tokenizer=tiny_tokenizer()
            )
        finally:
            hf_logging.disable_propagation()
    assert (model.config.image_size, model.config.vq_tile_size, model.config.num_image_tokens) == (16, 8, 16)
    assert "image_size=16, vq_tile_size=8 (as the VQ was trained" in caplog.text
    assert "16 tokens" in caplog.text and "not expected and will be ignored" not in caplog.text
    image = model.generate_image("red", generator=torch.Generator().manual_seed(0))[0]
    assert image.size == (16, 16)
    # the caller's choice wins; a VQ without a record falls back to its sample_size, and says so
    explicit = UniForkForConditionalGeneration.from_pretrained_llm(
        tiny_llm(), vq, tokenizer=tiny_tokenizer(), image_size=32, vq_tile_size=None
    )
    assert (explicit.config.image_size, explicit.config.vq_tile_size) == (32, None)
    with caplog.at_level(logging.WARNING):
        hf_logging.enable_propagation()
        try:
            plain = UniForkForConditionalGeneration.from_pretrained_llm(
                tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer()
            )
        finally:
            hf_logging.disable_propagation()
    assert plain.config.image_size == 32 and "the VQ records no image size" in caplog.text


def test_train_vq_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="images is empty"):
        train_vq_tokenizer([], progress=False)
    with pytest.raises(ValueError, match="image_size 12 must be a multiple"):
        train_vq_tokenizer(quadrant_images(2), image_size=12, tile_size=8, max_steps=1, progress=False)
    with pytest.raises(ValueError, match="power of 2"):
        small_vq(8, downsampling_factor=3)


def test_word_level_tokenizer_spells_the_domain_and_the_template():
    texts = ["a red circle at the top left", "What colour is the circle?", "red"]
    tokenizer = build_text_tokenizer(texts)
    assert tokenizer.tokenize("<|user|>\n<image>What colour is the circle?") == [
        "<|user|>",
        "<image>",
        "What",
        "colour",
        "is",
        "the",
        "circle",
        "?",
    ]
    ids = tokenizer("a red circle").input_ids
    assert tokenizer.decode(ids) == "a red circle"
    assert tokenizer.convert_ids_to_tokens(tokenizer("a purple circle").input_ids)[1] == "<unk>"  # closed vocabulary
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|endoftext|>"
    # every special token is one token, never split
    for token in ["<|user|>", "<|assistant|>", "<image>", "<begin_of_image>", "<end_of_image>"]:
        assert tokenizer.tokenize(token) == [token]
    with pytest.raises(ValueError, match="non-empty list of strings"):
        build_text_tokenizer([])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        build_text_tokenizer(["ok", 3])


def test_bpe_tokenizer_spells_any_text():
    tokenizer = build_text_tokenizer(["a red circle", "What colour is it?"] * 20, vocab_size=300)
    assert 256 < len(tokenizer) <= 300 + 8
    text = "a zebra, unseen: ünïcode"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.tokenize("<begin_of_image>") == ["<begin_of_image>"]


def test_prepare_text_tokenizer_adopts_an_llm_tokenizer_and_refuses_what_it_cannot_use():
    tokenizer = tiny_tokenizer()
    assert "<|user|>" not in tokenizer.get_vocab()
    before = len(tokenizer)
    prepare_text_tokenizer(tokenizer)
    assert len(tokenizer) == before + 5  # two role markers, three image tokens
    assert tokenizer.tokenize("<|assistant|>") == ["<|assistant|>"]
    prepare_text_tokenizer(tokenizer)
    assert len(tokenizer) == before + 5  # idempotent

    word = Tokenizer(models.WordLevel({"hello": 0, "<unk>": 1}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    no_eos = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>")
    with pytest.raises(ValueError, match="no eos_token"):
        prepare_text_tokenizer(no_eos)
    with pytest.raises(TypeError, match="must be a transformers tokenizer"):
        prepare_text_tokenizer("gpt2")
    # a custom template whose markers the tokenizer cannot spell
    unk_only = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>", eos_token="hello")
    template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="turns the chat template's .* into '<unk>'"):
        prepare_text_tokenizer(unk_only, chat_template=template)


def test_the_own_data_example_runs_end_to_end(tmp_path):
    # the README's "Train on your own images" example, in its CI configuration
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "own_data", "train_digits.py")
    result = subprocess.run(
        [sys.executable, script, "--out", str(tmp_path), "--ci"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps_trained"] <= 8 and metrics["best_eval_loss"] > 0
    assert metrics["understanding"]["parity"]["chance"] == 0.5 and metrics["understanding"]["digit"]["chance"] == 0.1
    assert 0.9 < metrics["generation"]["classifier_ceiling"] <= 1  # the independent judge reads real digits
    assert set(metrics["generation"]["copies"]) >= {"copy_share", "copy_threshold", "generated_median"}
    assert {"mse", "psnr", "codes_used"} <= set(metrics["vq"])
    assert os.path.exists(tmp_path / "samples.png") and os.path.exists(tmp_path / "model.safetensors")
    reloaded = UniForkForConditionalGeneration.from_pretrained(tmp_path)
    assert (reloaded.config.image_size, reloaded.config.vq_tile_size) == (16, 4)  # read from the VQ


def noise_images(n: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 8, 8, 3), generator=generator, dtype=torch.uint8).numpy()
    return [Image.fromarray(array) for array in pixels]


def test_copy_report_flags_copies_and_not_new_images():
    train = noise_images(40, seed=0)
    held_out = noise_images(40, seed=1)
    with pytest.warns(UserWarning, match="near-copies of training images"):
        copied = copy_report(train[:10], train, held_out)
    assert copied["copy_share"] == 1.0 and copied["generated_median"] < 1e-3
    fresh = copy_report(noise_images(40, seed=2), train, held_out, warn=False)
    assert fresh["copy_share"] <= 0.25  # new draws from the same distribution: about `quantile` of them
    with pytest.raises(ValueError, match="quantile"):
        copy_report(train[:2], train, held_out, quantile=0.7)


def test_train_rq_tokenizer_learns_codes_that_refine_with_depth_and_stay_local():
    from unifork_hf.training import small_rq_config, train_rq_tokenizer
    from unifork_hf.training.image_tokenizer import UniForkImageProcessorPil, images_to_tensor

    config = small_rq_config(16, codebook_size=32, depth=3, patch_size=4)
    tokenizer, metrics = train_rq_tokenizer(
        quadrant_images(64), config, max_steps=150, batch_size=16, reseed_every=50,
        eval_images=quadrant_images(16, seed=1), progress=False,
    )  # fmt: skip
    untrained = UniForkRQImageTokenizer(config)
    pixels = images_to_tensor(quadrant_images(16, seed=1), UniForkImageProcessorPil(size={"height": 16, "width": 16}))
    assert metrics["mse"] < reconstruction_metrics(untrained, pixels)["mse"] / 5
    assert metrics["mse_by_depth"][-1] == pytest.approx(metrics["mse"])
    assert metrics["mse_by_depth"][-1] < metrics["mse_by_depth"][0]  # later codes refine the first
    assert metrics["dead_codes_reseeded"] > 0 and 2 <= metrics["codes_used"] <= 32
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())
    # a layer-less encoder with its zero position table: a position's codes depend on its own patch only
    assert not tokenizer.encoder.embeddings.position_embedding.weight.any()
    changed = pixels.clone()
    changed[:, :, :4, :4] = -changed[:, :, :4, :4]  # the top-left patch
    a, b = tokenizer.encode(pixels), tokenizer.encode(changed)
    assert torch.equal(a[:, 1:], b[:, 1:])
