"""The house rules of docs/architecture.md, checked: the layering, one table of the Y's parts, short functions."""

import ast
import io
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import tokenize

import pytest

from unifork_hf import UniForkConfig, UniForkForConditionalGeneration
from unifork_hf.training import FREEZING_POLICIES

SRC = pathlib.Path(__file__).parent.parent / "src" / "unifork_hf"


def modules():
    return {path: ast.parse(path.read_text()) for path in SRC.rglob("*.py")}


def imported(tree) -> set[str]:
    """Package-relative modules a file imports (`from ..training import x` -> "training")."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            names.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unifork_hf."):
            names.add(node.module.split(".")[1])
    return names


def test_modeling_imports_nothing_above_it():
    for path, tree in modules().items():
        if path.parent.name == "modeling":
            assert not imported(tree) & {"training", "data", "evaluation", "cli"}, path


def test_no_private_name_is_imported_across_modules():
    for path, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("unifork_hf")):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.relative_to(SRC)} imports {private} from {node.module}"


def test_functions_fit_on_a_screen_and_modeling_stays_small():
    long = []
    for path, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body  # docstrings do not count
                if body and body[-1].end_lineno - body[0].lineno + 1 > 60:
                    long.append(f"{path.relative_to(SRC)}:{node.name}")
    assert not long
    assert len((SRC / "modeling" / "modeling_unifork.py").read_text().splitlines()) < 500


@pytest.fixture(scope="module")
def model():
    return UniForkForConditionalGeneration(UniForkConfig.from_preset("unifork-tiny"))


def test_the_parts_of_the_y_cover_every_parameter_once(model):
    owners = {}
    for role, name in model.y_part_names().items():
        for parameter_name, _ in model.get_submodule(name).named_parameters(prefix=name, remove_duplicate=False):
            owners.setdefault(parameter_name, []).append(role)
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    assert set(owners) == names
    assert all(len(roles) == 1 for roles in owners.values())
    assert model.y_part_names()["generation_layers"] == "model.generation_layers"
    assert all(set(parts) <= set(model.y_parts()) for parts in FREEZING_POLICIES.values())


def rename_attributes(source: str, renames: dict) -> str:
    """What an IDE's rename does: every `.old` attribute access in code becomes `.new`; strings are untouched."""
    lines = source.splitlines(keepends=True)
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    accesses = [
        token
        for previous, token in zip(tokens, tokens[1:])
        if token.type == tokenize.NAME and token.string in renames and previous.string == "."
    ]
    for token in reversed(accesses):
        (row, col), line = token.start, lines[token.start[0] - 1]
        lines[row - 1] = line[:col] + renames[token.string] + line[col + len(token.string) :]
    return "".join(lines)


RENAMED_MODEL_CHECK = """
import re, tempfile
import torch
from transformers import AutoProcessor
from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.tiny import tiny_llm, tiny_tokenizer, tiny_vq
from unifork_hf.training import apply_freezing, lora_config

model = UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer())
names = set(model.state_dict())
assert "output_head.weight" in names and "model.image_layers.0.mlp.up_proj.weight" in names, sorted(names)[:5]
assert not any("generation_head" in name or "generation_layers" in name for name in names)
trainable = apply_freezing(model, "generation_branch")
assert "output_head.weight" in trainable, trainable
assert all(name.startswith(("output_head.", "model.image_layers.", "model.generation_norm.")) for name in trainable)
config = lora_config(branch="generation", train_head=True)
assert re.fullmatch(config.target_modules, "base_model.model.model.image_layers.0.self_attn.q_proj")
assert not re.fullmatch(config.target_modules, "base_model.model.model.generation_layers.0.self_attn.q_proj")
assert "output_head" in config.modules_to_save
with tempfile.TemporaryDirectory() as directory:
    model.save_pretrained(directory)
    card = open(directory + "/README.md").read()
    assert "output_head" in card and "generation_head" not in card
    loaded = UniForkForConditionalGeneration.from_pretrained(directory)
    assert torch.equal(loaded.output_head.weight, model.output_head.weight)
    assert AutoProcessor.from_pretrained(directory).image_tokenizer is not None  # the VQ, read out of the weights
print("renamed model OK")
"""


def test_renaming_a_part_of_the_y_is_one_edit(tmp_path):
    # Rename two modules as an IDE would (attribute accesses only, no string edited anywhere) in a copy of the
    # package: forking an LLM, freezing, LoRA, saving, loading and the model card all follow.
    shutil.copytree(SRC, tmp_path / "unifork_hf", ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
    renames = {"generation_head": "output_head", "generation_layers": "image_layers"}
    for path in (tmp_path / "unifork_hf").rglob("*.py"):
        path.write_text(rename_attributes(path.read_text(), renames))
    renamed = (tmp_path / "unifork_hf" / "modeling" / "modeling_unifork.py").read_text()
    assert "self.output_head = nn.Linear" in renamed and "self.image_layers = nn.ModuleList" in renamed
    env = dict(os.environ, PYTHONPATH=str(tmp_path), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RENAMED_MODEL_CHECK)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "renamed model OK" in result.stdout
