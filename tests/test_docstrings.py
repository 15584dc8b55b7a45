"""Every docstring example runs and prints what it shows (examples that need the Hub say `+SKIP`)."""

import doctest
import importlib
import pkgutil

import pytest

import unifork_hf

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(unifork_hf.__path__, "unifork_hf.")
    if not info.name.endswith("__main__")
)


def test_the_modules_with_examples_are_all_collected():
    assert {
        "unifork_hf.modeling.modeling_unifork",
        "unifork_hf.training.trainer",
        "unifork_hf.evaluation.alignment",
    } <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here, never into the checkout
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (printed above)"
