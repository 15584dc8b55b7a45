import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from unifork_hf import UniForkConfig, UniForkForConditionalGeneration, UniForkImageProcessorPil, UniForkProcessor
from unifork_hf.cli import main


def test_auto_classes_load_the_checkpoint(built_dir):
    assert isinstance(AutoConfig.from_pretrained(built_dir), UniForkConfig)
    for auto in (AutoModel, AutoModelForImageTextToText, AutoModelForMultimodalLM):
        model = auto.from_pretrained(built_dir)
        assert type(model) is UniForkForConditionalGeneration
        assert isinstance(model.processor, UniForkProcessor)
    assert isinstance(AutoProcessor.from_pretrained(built_dir), UniForkProcessor)
    assert isinstance(AutoImageProcessor.from_pretrained(built_dir), UniForkImageProcessorPil)
    config = json.load(open(os.path.join(built_dir, "config.json")))
    assert set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageTextToText",
        "AutoModelForMultimodalLM",
    }
    for name in (
        "modeling_unifork.py",
        "configuration_unifork.py",
        "vq_unifork.py",
        "processing_unifork.py",
        "image_processing_unifork.py",
    ):
        assert os.path.exists(os.path.join(built_dir, name)), name


def test_remote_code_loads_without_the_package(built_dir, tmp_path):
    expected = UniForkForConditionalGeneration.from_pretrained(built_dir).generate_image(
        "a red circle", generator=torch.Generator().manual_seed(0), output_type="tokens", progress_bar=False
    )
    script = f"""
import sys, torch
sys.modules["unifork_hf"] = None  # the package is not importable here
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained({built_dir!r}, trust_remote_code=True)
processor = AutoProcessor.from_pretrained({built_dir!r}, trust_remote_code=True)
assert "transformers_modules" in type(model).__module__, type(model).__module__
assert type(processor).__name__ == "UniForkProcessor" and model.processor is not None
tokens = model.generate_image("a red circle", generator=torch.Generator().manual_seed(0), output_type="tokens",
                              progress_bar=False)
print("TOKENS", tokens.tolist())
"""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("TOKENS"))
    assert json.loads(line.removeprefix("TOKENS ")) == expected.tolist()


def test_build_then_generate_images_and_text(tiny_parts, tmp_path, capsys):
    """The acceptance path: `unifork build`, then the Auto classes generate images and text."""
    llm_dir, vq_dir = tiny_parts
    out = str(tmp_path / "model")
    main(["build", "--llm", llm_dir, "--vq", vq_dir, "--num-shared-layers", "1", "--out", out])
    assert "K=1 shared + 2 x 3 branch layers" in capsys.readouterr().out
    model = AutoModel.from_pretrained(out)
    images = model.generate_image(["a red circle", "two blue squares"], num_images_per_prompt=2, progress_bar=False)
    assert len(images) == 4 and all(image.size == (32, 32) for image in images)
    processor = AutoProcessor.from_pretrained(out)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=Image.new("RGB", (32, 32), "red"), text=text, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == inputs.input_ids.shape[1] + 5
    assert isinstance(processor.decode(output[0, inputs.input_ids.shape[1] :]), str)


@pytest.mark.parametrize("image_first", [False, True])
def test_cli_generate_image_and_answer(built_dir, tmp_path, capsys, image_first):
    png = tmp_path / "grid.png"
    main(
        [
            "generate-image",
            "--model",
            built_dir,
            "--prompt",
            "a red circle",
            "--prompt",
            "two blue squares",
            "--num-images-per-prompt",
            "3",
            "--out",
            str(png),
        ]
    )
    grid = Image.open(png)
    assert grid.size == (3 * 128, 2 * (128 + 16))
    # each cell is the image generate_image draws with that image's generator (seed 0, 1, ...), upscaled
    model = UniForkForConditionalGeneration.from_pretrained(built_dir)
    images = model.generate_image(
        ["a red circle", "a red circle", "a red circle", "two blue squares", "two blue squares", "two blue squares"],
        generator=[torch.Generator().manual_seed(i) for i in range(6)],
        progress_bar=False,
    )
    for index, image in enumerate(images):
        row, column = divmod(index, 3)
        cell = grid.crop((column * 128, row * 144 + 16, column * 128 + 128, row * 144 + 144))
        assert np.array_equal(np.asarray(cell.convert("RGB")), np.asarray(image.resize((128, 128), Image.NEAREST)))
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    capsys.readouterr()
    main(
        ["answer", "--model", built_dir, "--image", str(image), "--question", "What colour?", "--max-new-tokens", "4"]
        + (["--image-first"] if image_first else [])
    )
    # independently: greedy decoding by hand, a full forward per token (no generate, no cache)
    model = UniForkForConditionalGeneration.from_pretrained(built_dir).eval()
    processor = model.processor
    content = [{"type": "text", "text": "What colour?"}, {"type": "image"}]  # the question first, by default
    text = processor.apply_chat_template(
        [{"role": "user", "content": content[::-1] if image_first else content}], add_generation_prompt=True
    )
    inputs = processor(images=Image.open(image), text=text, return_tensors="pt")
    ids, new = inputs.input_ids, []
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=ids, pixel_values=inputs.pixel_values, use_cache=False).logits[0, -1]
            logits[model.config.image_token_id] = -float("inf")  # (the model's generation_config suppresses it)
            token = int(logits.argmax())
            if token == processor.tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    expected = processor.decode(new, skip_special_tokens=True).strip()
    assert expected and capsys.readouterr().out.strip() == expected


def test_cli_samples_with_the_checkpoints_settings_unless_told(built_dir, tmp_path):
    model = UniForkForConditionalGeneration.from_pretrained(built_dir)
    model.generation_config.image_generation = {"guidance_scale": 1.0, "temperature": 0.3}
    model.save_pretrained(tmp_path / "model")

    def grid(*flags):
        out = tmp_path / f"grid{len(flags)}-{'-'.join(flags)}.png"
        main(
            [
                "generate-image",
                "--model",
                str(tmp_path / "model"),
                "--prompt",
                "a red circle",
                "--out",
                str(out),
                *flags,
            ]
        )
        return np.asarray(Image.open(out))

    default = grid()
    assert np.array_equal(default, grid("--guidance-scale", "1", "--temperature", "0.3"))
    assert not np.array_equal(default, grid("--guidance-scale", "5", "--temperature", "0.3"))


def test_cli_reports_bad_input_without_a_traceback(built_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "generate-image",
                "--model",
                built_dir,
                "--prompt",
                "x",
                "--guidance-scale",
                "0.1",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
    assert exit_info.value.code == 2
    assert "guidance_scale must be a finite number >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--model", "M", "-n", "0"], "argument -n: expected an integer >= 1, got 0"),
        (["evaluate", "--model", "M", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        (
            ["generate-image", "--model", "M", "--prompt", "x", "--out", "x.png", "--num-images-per-prompt", "-1"],
            "argument --num-images-per-prompt: expected an integer >= 1, got -1",
        ),
        (["analyze-alignment", "--model", "M", "-k", "0"], "argument -k: expected an integer >= 1, got 0"),
    ],
)
def test_cli_rejects_bad_numbers_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)  # (the model "M" is never loaded)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_names_a_missing_model_directory(tmp_path, capsys):
    missing = str(tmp_path / "nonexistent")
    with pytest.raises(SystemExit):
        main(["answer", "--model", missing, "--image", "x.png", "--question", "?"])
    assert f"--model {missing}: no such directory" in capsys.readouterr().err  # not "Repo id must use ..."
