"""examples/shapes/train_unifork.py's `--data-cache`: rows encoded by one VQ are never served to a run whose VQ
(or tokenizer) differs, even at the same path (a VQ retrained in place)."""

import argparse
import importlib.util
import json
import os

import pytest
from datasets import Dataset

spec = importlib.util.spec_from_file_location(
    "train_unifork", os.path.join(os.path.dirname(__file__), "..", "examples", "shapes", "train_unifork.py")
)
train_unifork = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_unifork)


def folder(path, files):
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "wb") as f:
            f.write(content)
    return str(path)


def test_digest_follows_content_not_path(tmp_path):
    files = {"config.json": b"{}", "sub/diffusion_pytorch_model.safetensors": b"\x00\x01weights"}
    a, b = folder(tmp_path / "a", files), folder(tmp_path / "b", files)
    assert train_unifork.folder_digest(a) == train_unifork.folder_digest(b)
    folder(tmp_path / "b", {"sub/diffusion_pytorch_model.safetensors": b"\x00\x02weights"})
    assert train_unifork.folder_digest(a) != train_unifork.folder_digest(b)
    folder(tmp_path / "c", {"config.json": b"{}", "sub/renamed.safetensors": b"\x00\x01weights"})
    assert train_unifork.folder_digest(a) != train_unifork.folder_digest(str(tmp_path / "c"))


def test_a_vq_retrained_in_place_is_refused_its_old_rows(tmp_path):
    vq = folder(tmp_path / "vq", {"config.json": b"{}", "weights.safetensors": b"old"})
    tokenizer = folder(tmp_path / "tok", {"tokenizer.json": b"{}"})
    args = argparse.Namespace(
        vq=vq, tokenizer=tokenizer, num_train=10, data_seed=0, vq_tile_size=4, jitter=0, question_first=True,
        ask_every_position=False, data_cache=str(tmp_path / "cache"),
    )  # fmt: skip
    os.makedirs(args.data_cache)
    old_key = {name: getattr(args, name) for name in ("num_train", "data_seed", "vq_tile_size", "jitter")}
    old_key.update(question_first=True, ask_every_position=False)
    old_key.update(vq=train_unifork.folder_digest(vq), tokenizer=train_unifork.folder_digest(tokenizer))
    with open(os.path.join(args.data_cache, "key.json"), "w") as f:
        json.dump(old_key, f)
    for task in ("understanding", "generation"):
        Dataset.from_dict({"task": [task]}).save_to_disk(os.path.join(args.data_cache, task))
    served = train_unifork.encoded_training_rows(scenes=None, processor=None, args=args)  # same VQ: served
    assert [rows["task"] for rows in served] == [["understanding"], ["generation"]]
    folder(tmp_path / "vq", {"weights.safetensors": b"new"})  # retrained at the same path
    with pytest.raises(SystemExit, match="holds rows made with"):
        train_unifork.encoded_training_rows(scenes=None, processor=None, args=args)
