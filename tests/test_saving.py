"""Saving never loses or corrupts what a user saved: a failed save leaves the folder as it was."""

import errno
import json
import os

import pytest
import torch
import transformers.modeling_utils

from unifork_hf import UniForkForConditionalGeneration


def snapshot(directory):
    return {
        name: open(os.path.join(directory, name), "rb").read()
        for name in sorted(os.listdir(directory))
        if os.path.isfile(os.path.join(directory, name))
    }


@pytest.fixture
def saved(built_dir, tmp_path):
    model = UniForkForConditionalGeneration.from_pretrained(built_dir)
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():  # what the next save would write: other weights
        model.generation_head.weight.add_(1.0)
    return model, tmp_path / "model", snapshot(tmp_path / "model")


def test_a_full_disk_while_writing_the_weights_leaves_the_old_model(saved, monkeypatch):
    model, directory, before = saved
    real_save = transformers.modeling_utils.safe_save_file

    def save_half_then_fail(tensors, filename, metadata=None):
        real_save(dict(list(tensors.items())[: len(tensors) // 2]), filename, metadata=metadata)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(directory)
    assert snapshot(directory) == before and sorted(os.listdir(directory)) == list(
        before
    )  # no staging folder left either


def test_a_failure_while_saving_the_processor_leaves_the_old_model(saved, monkeypatch):
    model, directory, before = saved
    model.processor.image_token_id = 373  # (a processor that disagrees with the config, as in the report)

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(model.processor, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.save_pretrained(directory)
    assert snapshot(directory) == before


def test_a_bad_card_data_fails_before_anything_is_written(saved):
    model, directory, before = saved
    model.card_data["licence"] = "mit"  # misspelt key
    with pytest.raises(ValueError, match=r"model.card_data has unknown keys \['licence'\]"):
        model.save_pretrained(directory)
    assert snapshot(directory) == before


def test_resaving_in_the_other_layout_removes_the_old_weight_files(saved):
    model, directory, _ = saved
    model.save_pretrained(directory, max_shard_size="100KB")
    names = os.listdir(directory)
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert sum(name.startswith("model-0") for name in names) > 1
    model.save_pretrained(directory)  # the shards used to stay, and the index won over the new file on reload
    assert not any(name.startswith("model-0") or name.endswith(".index.json") for name in os.listdir(directory))
    loaded = UniForkForConditionalGeneration.from_pretrained(directory)
    assert torch.equal(loaded.generation_head.weight, model.generation_head.weight)


def test_a_successful_save_keeps_other_files_and_a_users_own_card(saved):
    model, directory, _ = saved
    (directory / "notes.txt").write_text("mine")
    (directory / "README.md").write_text("# My model\n\nWritten by hand.\n")
    model.save_pretrained(directory)
    assert (directory / "notes.txt").read_text() == "mine"
    assert (directory / "README.md").read_text() == "# My model\n\nWritten by hand.\n"
    loaded = UniForkForConditionalGeneration.from_pretrained(directory)
    assert torch.equal(loaded.generation_head.weight, model.generation_head.weight)
    assert not [name for name in os.listdir(directory) if name.startswith(".unifork-saving")]


def test_flipped_bytes_in_the_weights_are_caught_on_load(saved):
    model, directory, _ = saved
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])  # 4 KiB flipped
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors does not match its checksum in weights.sha256"):
        UniForkForConditionalGeneration.from_pretrained(directory)  # used to load the damaged weights
    (directory / "weights.sha256").unlink()
    UniForkForConditionalGeneration.from_pretrained(directory)  # the user's way out, as the message says


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("image_token", "<end_of_image>", r"the config says image_token_id (\d+), the processor (?!\1)\d+"),
        ("image_seq_length", 5, r"the config says image tokens per image 64, the processor 5"),
    ],
)
def test_a_processor_that_disagrees_with_the_config_is_refused(saved, field, value, message):
    _, directory, _ = saved
    processor_config = directory / "processor_config.json"
    saved_config = json.loads(processor_config.read_text())
    saved_config[field] = value
    processor_config.write_text(json.dumps(saved_config))
    with pytest.raises(ValueError, match=message):  # used to load, and generate_image returned garbage
        UniForkForConditionalGeneration.from_pretrained(directory)
