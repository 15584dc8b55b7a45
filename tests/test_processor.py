import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from unifork_hf import UniForkImageProcessorPil, UniForkProcessor
from unifork_hf.data.tiny import tiny_tokenizer
from unifork_hf.modeling.vq_unifork import float32_convolutions


def make_processor(image_seq_length=64):
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<image>", "<begin_of_image>", "<end_of_image>"], special_tokens=True)
    return UniForkProcessor(
        UniForkImageProcessorPil(size={"height": 32, "width": 32}), tokenizer, image_seq_length=image_seq_length
    )


def test_chat_template_expands_each_image_to_boi_n_tokens_eoi():
    processor = make_processor()
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the square?"},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == (
        "<|user|>\n<image>What colour is the circle?\n<|assistant|>\nred<|endoftext|>\n"
        "<|user|>\nAnd the square?\n<|assistant|>\n"
    )
    ids = processor(images=Image.new("RGB", (50, 40)), text=text, return_tensors="pt").input_ids[0].tolist()
    start = ids.index(processor.boi_token_id)
    assert ids[start + 1 : start + 65] == [processor.image_token_id] * 64
    assert ids[start + 65] == processor.eoi_token_id
    assert ids.count(processor.image_token_id) == 64


def test_tokenized_chat_template_returns_pixels():
    processor = make_processor()
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (8, 8), "blue")},
                {"type": "text", "text": "Describe the image."},
            ],
        }
    ]
    out = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(out["pixel_values"][0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    assert (out["input_ids"] == processor.image_token_id).sum() == 64


def test_placeholders_must_match_images():
    processor = make_processor()
    with pytest.raises(ValueError, match="number of <image> tokens"):
        processor(images=[Image.new("RGB", (8, 8))] * 2, text="<image> one placeholder")
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text="<image> no image")


def test_image_modes_are_converted_and_bad_types_rejected():
    processor = make_processor()
    gray = processor.image_processor(Image.new("L", (20, 10), 255), return_tensors="pt").pixel_values
    rgba = processor.image_processor(Image.new("RGBA", (20, 10), (0, 0, 0, 0)), return_tensors="pt").pixel_values
    array = processor.image_processor(np.zeros((10, 20, 3), dtype=np.uint8), return_tensors="pt").pixel_values
    assert gray.shape == rgba.shape == array.shape == (1, 3, 32, 32)
    torch.testing.assert_close(gray, torch.ones_like(gray))  # white stays white
    torch.testing.assert_close(rgba, torch.ones_like(rgba))  # transparency composited on white
    torch.testing.assert_close(array, -torch.ones_like(array))
    with pytest.raises(TypeError, match="images must be PIL images, numpy arrays, torch tensors.*got int"):
        processor(images=3, text="<image>")
    with pytest.raises(TypeError, match="got dict"):
        processor.image_processor([{"not": "an image"}])
    for empty, size in ((Image.new("RGB", (0, 0)), r"\(0, 0\)"), (np.zeros((0, 5, 3), dtype=np.uint8), r"\(0, 5, 3\)")):
        with pytest.raises(ValueError, match=rf"images\[1\] has no pixels \(size {size}\)"):  # was a blank image
            processor.image_processor([Image.new("RGB", (4, 4)), empty])
    # found by tests/test_fuzz.py: each used to fail inside transformers or return an empty batch
    with pytest.raises(
        ValueError,
        match=r"images\[0\] is an array of shape \(8, 8\): expected one image as \(height, width, channels\)",
    ):
        processor.image_processor(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="images is empty: pass at least one image, or images=None"):
        processor(images=[], text="x")
    with pytest.raises(ValueError, match=r"images\[0\] is the string 'no/such/file.png', which is neither a file"):
        processor(images="no/such/file.png", text="<image>")


def test_generation_prompts_are_left_padded_and_end_with_boi():
    processor = make_processor()
    batch = processor.image_generation_inputs(["a red circle", "two blue squares at the bottom right", ""])
    assert (batch.input_ids[:, -1] == processor.boi_token_id).all()
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[:, -1].all()
    assert processor.image_generation_prompt("cat") == "<|user|>\ncat\n<|assistant|>\n<begin_of_image>"


def test_generation_prompt_passes_image_generation_only_to_a_template_that_reads_it():
    processor = make_processor()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_warning()  # conftest quiets transformers to errors
    try:
        with CaptureLogger(logging.get_logger("transformers.processing_utils")) as log:
            processor.image_generation_prompt("cat")  # the default template ignores the flag: no warning per prompt
            turn = [{"role": "user", "content": [{"type": "text", "text": "cat"}]}]
            processor.apply_chat_template(turn, tokenize=False, unused_flag=True)  # the capture does see such a warning
    finally:
        logging.set_verbosity(verbosity)
    assert log.out.count("processor_kwargs") == 1
    processor.chat_template = "{{ 'IMG ' if image_generation else 'TXT ' }}{{ messages[0]['content'][0]['text'] }}"
    assert processor.image_generation_prompt("cat") == "IMG cat<begin_of_image>"


def test_tokenizer_without_image_tokens_is_rejected():
    with pytest.raises(ValueError, match="lacks the special tokens"):
        UniForkProcessor(UniForkImageProcessorPil(), tiny_tokenizer())


def test_tokenizer_that_cannot_spell_the_chat_template_is_rejected():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<image>", "<begin_of_image>", "<end_of_image>", "</s>", "red", "circle"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    # "<|user|>" and "<|assistant|>" would both become <unk>: every prompt would lose its roles, silently
    with pytest.raises(ValueError, match=r"turns the chat template's \['<\|assistant\|>', '<\|user\|>'\] into '<unk>'"):
        UniForkProcessor(UniForkImageProcessorPil(), tokenizer)
    tokenizer.add_tokens(["<|user|>", "<|assistant|>"], special_tokens=True)
    processor = UniForkProcessor(UniForkImageProcessorPil(), tokenizer)
    ids = processor.tokenizer(processor.image_generation_prompt("red circle"), add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids


def test_the_vq_encoder_runs_its_convolutions_in_float32(built_model, monkeypatch):
    # cuDNN's default TF32 convolutions swap near-duplicate codebook entries (the Shapes demo: 87.5% of its test
    # codes, questions 98.4% -> 83.6%); the precision flag is what cuDNN reads, so check it as each conv runs
    precision = torch.backends.cudnn.conv
    seen, conv2d = [], torch.nn.functional.conv2d

    def spy(*args, **kwargs):
        seen.append(precision.fp32_precision)
        return conv2d(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    before = precision.fp32_precision
    codes = built_model.processor.encode_images([Image.new("RGB", (32, 32), "red")])
    assert codes.shape == (1, 64) and seen and set(seen) == {"ieee"} and before != "ieee"
    assert precision.fp32_precision == before  # restored, also when what runs inside fails
    with pytest.raises(RuntimeError), float32_convolutions():
        raise RuntimeError
    assert precision.fp32_precision == before


def test_save_load_round_trip(tmp_path):
    processor = make_processor(image_seq_length=16)
    processor.save_pretrained(tmp_path)
    loaded = UniForkProcessor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == 16 and loaded.image_token_id == processor.image_token_id
    assert loaded.chat_template == processor.chat_template
    assert loaded.image_processor.size == processor.image_processor.size
    text = "<|user|>\n<image>hi\n"
    image = Image.new("RGB", (8, 8), "green")
    a, b = processor(images=image, text=text, return_tensors="pt"), loaded(images=image, text=text, return_tensors="pt")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)


def test_images_to_tokens_and_back_through_the_attached_vq(built_model):
    processor = built_model.processor
    assert processor.image_tokenizer is built_model.model.image_tokenizer
    images = [Image.new("RGB", (32, 32), "red"), Image.new("LA", (64, 64))]
    codes = processor.encode_images(images)
    assert codes.shape == (2, 64) and codes.max() < 64
    decoded = processor.decode_image_tokens(codes)
    assert [d.size for d in decoded] == [(32, 32), (32, 32)] and decoded[0].mode == "RGB"
    # the codes by hand: the encoder's latents, each position's nearest codebook vector (raster order)
    vq = built_model.model.image_tokenizer.vq
    pixels = processor.image_processor(images, return_tensors="pt").pixel_values  # (tested above)
    with torch.no_grad():
        latents = vq.encode(pixels).latents.permute(0, 2, 3, 1).flatten(1, 2)  # (B, h*w, dim)
    nearest = torch.cdist(latents, vq.quantize.embedding.weight[None].expand(2, -1, -1)).argmin(-1)
    assert torch.equal(codes, nearest)
    bare = copy.copy(processor)
    bare.image_tokenizer = None
    with pytest.raises(ValueError, match="needs the image tokenizer"):
        bare.encode_images(images)


@pytest.mark.parametrize("max_shard_size", [None, "100KB"])
def test_processor_alone_reads_the_vq_out_of_the_model_weights(built_model, tmp_path, max_shard_size):
    built_model.save_pretrained(tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    assert any(name.endswith(".safetensors") for name in os.listdir(tmp_path))
    assert not any("diffusion_pytorch_model" in name for name in os.listdir(tmp_path))  # stored once, in the model
    processor = UniForkProcessor.from_pretrained(tmp_path)
    assert processor.image_tokenizer is not None
    image = Image.new("RGB", (32, 32), "red")
    assert torch.equal(processor.encode_images([image]), built_model.processor.encode_images([image]))
    # a processor-only directory has no VQ to read
    processor.save_pretrained(tmp_path / "processor_only")
    alone = UniForkProcessor.from_pretrained(tmp_path / "processor_only")
    assert alone.image_tokenizer is None
    # attached to a model, a processor uses the model's VQ (one copy), whatever it had before
    model = copy.deepcopy(built_model)
    model.processor = alone
    assert model.processor is alone and alone.image_tokenizer is model.model.image_tokenizer
    model.processor = processor
    assert processor.image_tokenizer is model.model.image_tokenizer
