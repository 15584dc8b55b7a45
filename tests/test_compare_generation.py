"""examples/shapes/compare_generation.py: the paired difference and its standard error over scenes.

The generation and the judge are replaced by a table of outcomes, so the arithmetic is checked against values
worked out by hand. One scene's images share its caption, so the standard error must treat the scene, not the
image, as the unit: averaged over seeds first, then over scenes.
"""

import importlib.util
import os
import sys

import pytest

spec = importlib.util.spec_from_file_location(
    "compare_generation", os.path.join(os.path.dirname(__file__), "..", "examples", "shapes", "compare_generation.py")
)
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

# all-correct per checkpoint, generator seed and scene
OUTCOMES = {
    "first": {0: [0, 1, 1, 1], 1: [1, 1, 1, 1]},
    "second": {0: [1, 0, 1, 1], 1: [1, 0, 0, 1]},
}


class Checkpoint:
    def __init__(self, path):
        self.path = path

    def eval(self):
        return self


def test_difference_and_standard_error_are_over_scenes(monkeypatch, capsys):
    scenes = {"caption": [f"caption {i}" for i in range(4)], "asked": list(range(4))}
    monkeypatch.setattr(compare, "shapes_dataset", lambda **kwargs: {"test": scenes})
    monkeypatch.setattr(compare.UniForkForConditionalGeneration, "from_pretrained", Checkpoint)
    # an "image" is where it came from; the judge reads its outcome from the table
    monkeypatch.setattr(
        compare,
        "generate_for_captions",
        lambda model, captions, seed: [(model.path, seed // 10**6, i) for i in range(len(captions))],
    )
    monkeypatch.setattr(compare, "detect", lambda image: image)
    monkeypatch.setattr(compare, "score_image", lambda asked, image: {"all": OUTCOMES[image[0]][image[1]][asked]})
    monkeypatch.setattr(
        sys, "argv", ["compare_generation.py", "first", "second", "--num-scenes", "4", "--seeds", "0", "1"]
    )
    compare.main()

    result = capsys.readouterr().out.strip().splitlines()[-1]
    # first: 7 of 8 right; second: 5 of 8. Per scene, second minus first averaged over the two seeds:
    # [0.5, -1, -0.5, 0], mean -0.25, sample sd sqrt(1.25 / 3), SE sd / sqrt(4) = 0.3227 (over the 8 images as if
    # independent it would be 0.25)
    assert result == "RESULT all_correct_0=87.5 all_correct_1=62.5 difference_1=-25.0 difference_se_1=32.27"


def test_one_scene_cannot_give_a_standard_error(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compare_generation.py", "a", "b", "--num-scenes", "1"])
    with pytest.raises(SystemExit, match="--num-scenes must be at least 2"):
        compare.main()
