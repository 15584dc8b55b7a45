"""The house rules of docs/architecture.md, checked: the layering, one table of the Y's parts, short functions."""

import ast
import pathlib
import re

import pytest
import torch

from unifork_hf import UniForkConfig, UniForkForConditionalGeneration
from unifork_hf.modeling.configuration_unifork import Y_PARTS
from unifork_hf.modeling.forking_unifork import llm_state_dict_to_y
from unifork_hf.training import FREEZING_POLICIES, apply_freezing, lora_config

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
    for role, name in Y_PARTS.items():
        for parameter_name, _ in model.get_submodule(name).named_parameters(prefix=name, remove_duplicate=False):
            owners.setdefault(parameter_name, []).append(role)
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    assert set(owners) == names
    assert all(len(roles) == 1 for roles in owners.values())


def test_freezing_lora_and_forking_follow_the_table(monkeypatch):
    # A renamed part (here: the generation head under another name) is followed by every consumer of the table.
    model = UniForkForConditionalGeneration(UniForkConfig.from_preset("unifork-tiny"))
    model.output_head = model.generation_head
    del model.generation_head
    monkeypatch.setitem(Y_PARTS, "generation_head", "output_head")
    trainable = apply_freezing(model, "generation_branch")
    assert "output_head.weight" in trainable and not any(name.startswith("generation_head") for name in trainable)
    assert all(name.startswith(("output_head", "model.generation_")) for name in trainable)
    assert set(FREEZING_POLICIES["generation_branch"]) <= set(Y_PARTS)
    assert "output_head" in lora_config(branch="generation", train_head=True).modules_to_save
    monkeypatch.setitem(Y_PARTS, "generation_layers", "model.image_layers")
    target = lora_config(branch="generation").target_modules
    assert re.fullmatch(target, "base_model.model.model.image_layers.0.self_attn.q_proj")
    assert not re.fullmatch(target, "base_model.model.model.generation_layers.0.self_attn.q_proj")
    state = llm_state_dict_to_y(
        {"model.layers.3.mlp.up_proj.weight": torch.zeros(1), "lm_head.weight": torch.ones(1)}, 2
    )
    assert set(state) == {
        "model.understanding_layers.1.mlp.up_proj.weight",
        "model.image_layers.1.mlp.up_proj.weight",  # the renamed branch
        "lm_head.weight",
    }
