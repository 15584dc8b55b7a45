"""transformers-native generation: `generate(..., generation_mode="image")`, `decode_image_tokens`, the Auto
class behind `pipeline("any-to-any")`, and the pipeline itself."""

import json

import pytest
import torch
import transformers.pipelines.any_to_any as any_to_any
from transformers import AutoModelForMultimodalLM, pipeline

import unifork_hf
from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.evaluation import detect

PROMPT = "a large red circle at the top left"


@pytest.fixture(scope="module")
def demo():
    return UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT)


def test_generate_in_image_mode_is_generate_image(demo):
    inputs = demo.processor(text=[PROMPT, "a small blue square at the center"], return_tensors="pt", padding=True)
    codes = demo.generate(**inputs, generation_mode="image", generator=torch.Generator().manual_seed(0))
    expected = demo.generate_image(
        [PROMPT, "a small blue square at the center"], output_type="tokens", generator=torch.Generator().manual_seed(0)
    )
    assert codes.shape == (2, demo.config.num_image_tokens) and torch.equal(codes, expected)
    pixels = demo.decode_image_tokens(codes)
    assert pixels.shape == (2, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    assert detect(demo.processor.decode_image_tokens(codes)[0]) == [
        {"colour": "red", "shape": "circle", "size": "large", "position": "top left"}
    ]
    # num_return_sequences: images per prompt; sampling settings pass through
    many = demo.generate(**inputs, generation_mode="image", num_return_sequences=2, top_k=1, progress_bar=False)
    assert many.shape == (4, 64) and torch.equal(many[0], many[1])  # top_k=1: greedy, the same twice


def test_generate_rejects_unknown_modes_and_keeps_text_generation(demo):
    with pytest.raises(ValueError, match="generation_mode must be 'text' or 'image', got 'audio'"):
        demo.generate(input_ids=torch.ones(1, 3, dtype=torch.long), generation_mode="audio")
    with pytest.raises(ValueError, match="needs `input_ids` of shape"):
        demo.generate(generation_mode="image")
    text = demo.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "What colour is the circle?"}, {"type": "image"}]}],
        add_generation_prompt=True,
    )
    image = demo.generate_image(PROMPT, generator=torch.Generator().manual_seed(0))[0]
    inputs = demo.processor(images=[image], text=[text], return_tensors="pt")
    output = demo.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = demo.processor.batch_decode(output[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)[0]
    assert answer.strip() == "red"


def test_multimodal_auto_class_and_remote_code_map(demo, tmp_path):
    assert type(AutoModelForMultimodalLM.from_pretrained(unifork_hf.DEMO_CHECKPOINT)) is UniForkForConditionalGeneration
    demo.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForMultimodalLM"] == "modeling_unifork.UniForkForConditionalGeneration"


def test_any_to_any_pipeline_draws_and_answers(monkeypatch):
    # transformers' any-to-any pipeline demands torchvision for models that read images, though with this
    # processor it never calls it; no CPU build of torchvision matching torch 2.13 can be installed here, so
    # the check alone is lifted (users install torchvision, as transformers says)
    monkeypatch.setattr(any_to_any, "requires_backends", lambda *args, **kwargs: None)
    pipe = pipeline("any-to-any", model=unifork_hf.DEMO_CHECKPOINT)
    out = pipe(PROMPT, generation_mode="image", generate_kwargs={"generator": torch.Generator().manual_seed(0)})
    assert detect(out[0]["generated_image"]) == [
        {"colour": "red", "shape": "circle", "size": "large", "position": "top left"}
    ]
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What colour is the circle?"},
                {"type": "image", "image": out[0]["generated_image"]},
            ],
        }
    ]
    reply = pipe(text=chat, max_new_tokens=4)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip() == "red"


def test_diffusers_pipeline_is_generate_image(demo, tmp_path):
    from unifork_hf import UniForkPipeline

    pipe = UniForkPipeline.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
    pipe.set_progress_bar_config(disable=True)
    expected = demo.generate_image(PROMPT, output_type="pt", generator=torch.Generator().manual_seed(0))
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(out.images, expected)
    codes = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", return_dict=False)[0]
    assert torch.equal(
        codes, demo.generate_image(PROMPT, output_type="tokens", generator=torch.Generator().manual_seed(0))
    )
    array = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert array.shape == (1, 32, 32, 3) and torch.equal(torch.from_numpy(array).permute(0, 3, 1, 2), expected)
    assert detect(pipe(PROMPT, generator=torch.Generator().manual_seed(0)).images[0])[0]["colour"] == "red"
    # saved the diffusers way and loaded back: the same images
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "model_index.json").exists() and (tmp_path / "model" / "model.safetensors").exists()
    again = UniForkPipeline.from_pretrained(tmp_path)
    assert torch.equal(again(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt").images, expected)
    with pytest.raises(ValueError, match="output_type must be"):
        pipe(PROMPT, output_type="latents")


def test_diffusers_pipeline_callbacks_and_offload():
    from unifork_hf import UniForkPipeline

    pipe = UniForkPipeline.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
    seen = []
    pipe(PROMPT, callback_on_step_end=lambda p, step, t, kwargs: seen.append(kwargs["codes"].clone()) or {})
    assert [c.shape[1] for c in seen] == list(range(1, 65))
    assert all(torch.equal(seen[-1][:, : c.shape[1]], c) for c in seen)  # codes once sampled stay

    def stop_at_ten(p, step, t, kwargs):
        p._interrupt = step >= 10
        return {}

    with pytest.raises(RuntimeError, match="interrupted by callback_on_step_end at step 10"):
        pipe(PROMPT, callback_on_step_end=stop_at_ten)
    # model CPU offload (here onto the CPU itself: no accelerator): hooks installed, the same images
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(1), output_type="pt").images
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.model, "_hf_hook")
    assert torch.equal(pipe(PROMPT, generator=torch.Generator().manual_seed(1), output_type="pt").images, expected)


def test_unifork_evaluate_scores_a_users_dataset_with_a_users_judge(demo, tmp_path, monkeypatch, capsys):
    from datasets import Dataset

    from unifork_hf.cli import main
    from unifork_hf.evaluation.datasets import evaluate_dataset, load_judge

    (tmp_path / "my_judge.py").write_text(
        "from unifork_hf.evaluation import detect\n"
        "def reds(images, rows):\n"
        "    return {'red': sum(any(d['colour'] == 'red' for d in detect(i)) for i in images) / len(images),\n"
        "            'rows_seen': len(rows)}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    red = demo.generate_image(PROMPT, generator=torch.Generator().manual_seed(0), progress_bar=False)[0]
    rows = Dataset.from_dict(
        {
            "image": [red, red, None, None],
            "question": ["What colour is the circle?", "What shape is it?", None, None],
            "answer": ["red", "square", None, None],  # the second answer is wrong on purpose
            "caption": [None, None, PROMPT, "a small red square at the center"],
        }
    )
    rows.save_to_disk(str(tmp_path / "mine"))
    main(
        ["evaluate", "--model", unifork_hf.DEMO_CHECKPOINT, "--dataset", str(tmp_path / "mine")]
        + ["--judge", "my_judge:reds", "--json", str(tmp_path / "m.json")]
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["understanding"] == {"exact_match": 0.5, "majority_answer": 0.5, "num_questions": 2}
    assert metrics["generation"] == {"num_images": 2, "red": 1.0, "rows_seen": 2}
    with pytest.raises(ValueError, match="'module:function'"):
        load_judge("my_judge.reds")
    with pytest.raises(ValueError, match="has no function 'blue'"):
        load_judge("my_judge:blue")
    with pytest.raises(ValueError, match="neither question rows"):
        evaluate_dataset(demo, Dataset.from_dict({"text": ["x"]}), progress_bar=False)


def test_int8_weight_only_quantisation_through_from_pretrained(demo):
    torchao = pytest.importorskip("torchao", reason="torchao is in the [test] extra")
    from transformers import TorchAoConfig

    config = TorchAoConfig(torchao.quantization.Int8WeightOnlyConfig())
    quantised = UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT, quantization_config=config)

    def linear_bytes(model):  # of the decoder layers (transformers keeps the output heads in full precision)
        total = 0
        for module in model.model.modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight
                parts = [weight.qdata, weight.scale] if hasattr(weight, "qdata") else [weight]
                total += sum(part.numel() * part.element_size() for part in parts)
        return total

    assert linear_bytes(quantised) < 0.3 * linear_bytes(demo)  # int8 weights + per-row scales vs float32
    assert type(quantised.model.shared_layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    codes = quantised.generate_image(
        PROMPT, generator=torch.Generator().manual_seed(0), progress_bar=False, output_type="tokens"
    )
    assert detect(quantised.processor.decode_image_tokens(codes)[0]) == [
        {"colour": "red", "shape": "circle", "size": "large", "position": "top left"}
    ]
    reference = demo.generate_image(PROMPT, generator=torch.Generator().manual_seed(0), output_type="tokens")
    assert (codes == reference).float().mean() > 0.9  # rounding may flip a draw or two, rarely more


def test_disk_offloaded_model_draws_and_answers_as_the_loaded_one(demo, tmp_path):
    from unifork_hf.evaluation import answer_questions

    # a memory budget of 1 MB for the CPU: accelerate puts every weight in offload_folder
    offloaded = UniForkForConditionalGeneration.from_pretrained(
        unifork_hf.DEMO_CHECKPOINT, device_map="auto", max_memory={"cpu": "1MB"}, offload_folder=str(tmp_path)
    )
    assert set(offloaded.hf_device_map.values()) == {"disk"} and offloaded.device == torch.device("cpu")
    assert offloaded.model.image_tokenizer.codebook.device.type == "meta"  # nothing held between calls
    codes = offloaded.generate_image(
        PROMPT, generator=torch.Generator().manual_seed(0), progress_bar=False, output_type="tokens"
    )
    assert torch.equal(
        codes, demo.generate_image(PROMPT, generator=torch.Generator().manual_seed(0), output_type="tokens")
    )
    images = demo.processor.decode_image_tokens(codes)
    question = ["What colour is the circle?"]
    assert answer_questions(offloaded, images, question, progress_bar=False) == ["red"]
    assert offloaded.model.image_tokenizer.codebook.device.type == "meta"  # offloaded again afterwards
