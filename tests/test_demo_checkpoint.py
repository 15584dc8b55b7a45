"""The bundled Shapes checkpoint: it loads, reproduces recorded outputs, and `unifork demo` runs."""

import contextlib
import io
import json
import os
import re

import pytest
from transformers import AutoModel

import unifork_hf
from unifork_hf.cli import main
from unifork_hf.evaluation import detect

CAPTION = "a small purple square at the top left and a small orange triangle at the bottom left"
# Greedy generation (top_k=1, no guidance) of CAPTION, recorded when the checkpoint was made.
RECORDED_TOKENS = [
    1794, 1069, 1793, 1793, 1793, 1793, 1793, 1793, 1515, 630, 1793, 1793, 1793, 1793, 1793, 1793,
    1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793,
    1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793, 1793,
    1829, 581, 1793, 1793, 1793, 1793, 1793, 1793, 1414, 1588, 1793, 1793, 1793, 1793, 1793, 1793,
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_model():
    return AutoModel.from_pretrained(unifork_hf.DEMO_CHECKPOINT).eval()


def test_checkpoint_is_bundled_small_and_documented():
    files = os.listdir(unifork_hf.DEMO_CHECKPOINT)
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "README.md"} <= set(files)
    size = sum(os.path.getsize(os.path.join(unifork_hf.DEMO_CHECKPOINT, f)) for f in files)
    assert size <= 25 * 2**20
    metrics = json.load(open(os.path.join(unifork_hf.DEMO_CHECKPOINT, "metrics.json")))["metrics"]
    card = open(os.path.join(unifork_hf.DEMO_CHECKPOINT, "README.md")).read()
    assert f"value: {metrics['test']['generation']['all']}" in card


def test_checkpoint_points_only_at_code_it_holds(demo_model, tmp_path):
    for name in ("config.json", "processor_config.json"):
        config = json.load(open(os.path.join(unifork_hf.DEMO_CHECKPOINT, name)))
        for part in (config, config.get("image_processor", {})):
            for reference in part.get("auto_map", {}).values():  # trust_remote_code would fail on a missing module
                assert os.path.exists(os.path.join(unifork_hf.DEMO_CHECKPOINT, reference.split(".")[0] + ".py")), (
                    reference
                )
    demo_model.save_pretrained(tmp_path)  # the portable copy carries its code
    assert os.path.exists(tmp_path / "modeling_unifork.py") and "auto_map" in json.load(open(tmp_path / "config.json"))


def test_checkpoint_reproduces_recorded_outputs(demo_model):
    config = demo_model.config
    assert (config.num_shared_layers, config.text_config.num_hidden_layers, config.num_image_tokens) == (2, 4, 64)
    assert config.vq_tile_size == 4 and demo_model.model.image_tokenizer.tile_size == 4
    assert config.learn_image_code_embeddings and config.learn_image_position_embeddings
    tokens = demo_model.generate_image(CAPTION, guidance_scale=1.0, top_k=1, output_type="tokens", progress_bar=False)
    assert tokens[0].tolist() == RECORDED_TOKENS
    assert detect(demo_model.processor.decode_image_tokens(tokens)[0]) == [
        {"colour": "purple", "shape": "square", "size": "small", "position": "top left"},
        {"colour": "orange", "shape": "triangle", "size": "small", "position": "bottom left"},
    ]  # both objects drawn as asked


def test_speculative_jacobi_decoding_on_the_checkpoint(demo_model):
    forwards = []
    hook = demo_model.generation_head.register_forward_hook(lambda *_: forwards.append(1))
    tokens = demo_model.generate_image(
        CAPTION, guidance_scale=1.0, top_k=1, output_type="tokens", progress_bar=False, jacobi_window=16
    )
    hook.remove()
    assert tokens[0].tolist() == RECORDED_TOKENS  # greedy: the same codes
    assert len(forwards) <= 64 // 2  # in under half the forwards (12 when recorded)


def test_unifork_demo_runs(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path)])
    report = capsys.readouterr().out
    assert "Text -> image: 16 images of 4 test captions" in report and "exact match:" in report
    assert (tmp_path / "generated.png").exists()


def readme_demo_examples():
    """(code, shown output) of every README example that targets the demo checkpoint: a ```python block
    that loads `DEMO_CHECKPOINT`, followed by a ``` block with what it prints."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    pairs = re.findall(r"```python\n(.*?)```\n+(?:Prints:?\n+)?```(?:text)?\n(.*?)```", readme, re.S)
    return [(code, output) for code, output in pairs if "DEMO_CHECKPOINT" in code]


def test_readme_examples_on_the_demo_checkpoint_print_what_the_readme_shows():
    examples = readme_demo_examples()
    assert examples, "the README has no example on the demo checkpoint"
    for code, shown in examples:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})
        assert printed.getvalue().strip() == shown.strip(), code
