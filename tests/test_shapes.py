import numpy as np
import pytest

from unifork_hf.data.shapes import (
    HELDOUT_PAIRS,
    QUESTION_TYPES,
    render,
    shapes_dataset,
    to_generation,
    to_understanding,
)
from unifork_hf.evaluation import detect, score_answers, score_image, score_images


@pytest.fixture(scope="module")
def data():
    return shapes_dataset(num_train=1500, num_test=300, num_heldout=300, seed=0)


def scene_keys(split):
    return {tuple((o["colour"], o["shape"], o["size"], o["position"]) for o in objs) for objs in split["objects"]}


def test_same_seed_same_data_other_seed_other_data(data):
    again = shapes_dataset(num_train=1500, num_test=300, num_heldout=300, seed=0)
    other = shapes_dataset(num_train=1500, num_test=300, num_heldout=300, seed=1)
    for split in ("train", "test", "heldout"):
        assert again[split]["caption"] == data[split]["caption"]
        assert again[split]["questions"] == data[split]["questions"]
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(again[split]["image"][:50], data[split]["image"][:50]))  # fmt: skip
    assert other["train"]["caption"] != data["train"]["caption"]
    # the evaluation splits do not depend on how many training scenes were drawn
    evaluation_only = shapes_dataset(num_train=0, num_test=300, num_heldout=300, seed=0)
    assert evaluation_only["test"]["caption"] == data["test"]["caption"]
    assert evaluation_only["heldout"]["caption"] == data["heldout"]["caption"]


def test_splits_are_disjoint_and_heldout_pairs_never_train(data):
    train, test, heldout = (scene_keys(data[s]) for s in ("train", "test", "heldout"))
    assert len(train) == 1500 and len(test) == 300 and len(heldout) == 300
    assert not train & test and not train & heldout and not test & heldout
    for split in ("train", "test"):
        pairs = {(o["colour"], o["shape"]) for objs in data[split]["objects"] for o in objs}
        assert not pairs & set(HELDOUT_PAIRS), split
    assert all(any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in objs) for objs in data["heldout"]["objects"])


def test_scene_contents(data):
    row = data["train"][0]
    objects = row["objects"]
    assert 1 <= len(objects) <= 2 and len({o["position"] for o in objects}) == len(objects)
    assert row["caption"] == " and ".join(
        f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}" for o in objects
    )
    assert [q["type"] for q in row["questions"]] == list(QUESTION_TYPES)
    assert row["questions"][-1]["answer"] == {1: "one", 2: "two"}[len(objects)]
    assert row["image"].size == (32, 32)
    und = to_understanding(data["test"].select(range(4)))
    assert len(und) == 20 and und[0]["messages"][1]["content"][0]["text"] == und[0]["answer"]
    assert to_generation(data["test"]).column_names == ["image", "caption"]


def test_conversations_hold_every_question_once_and_never_leak_an_answer(data):
    scenes = data["train"].select(range(200))
    rows = to_understanding(scenes, conversation=True, seed=0)
    assert rows["messages"] == to_understanding(scenes, conversation=True, seed=0)["messages"]
    asked, row = [], 0
    for scene in scenes:
        pairs = []
        while row < len(rows) and rows[row]["images"][0].tobytes() == scene["image"].tobytes():
            turns = rows[row]["messages"]
            assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
            assert turns[0]["content"][0]["type"] == "image"  # the image comes once, in the first turn
            assert all(c["type"] == "text" for t in turns[1:] for c in t["content"])
            qas = [(turns[i]["content"][-1]["text"], turns[i + 1]["content"][0]["text"]) for i in range(0, len(turns), 2)]
            for question, _ in qas:  # no question in a row names another question's answer
                assert not any(f" {answer}" in f" {question.rstrip('?')} " for q, answer in qas if q != question)
            pairs += qas
            row += 1
        assert sorted(pairs) == sorted((q["question"], q["answer"]) for q in scene["questions"])
        asked.append(len(pairs))
    assert row == len(rows) and set(asked) == {5}
    assert len({len(m) for m in rows["messages"]}) > 1  # the grouping varies with the drawn order


def test_the_judge_scores_ground_truth_perfectly(data):
    for split in ("train", "test", "heldout"):
        scores = score_images(data[split]["image"], data[split]["objects"])
        assert scores == {"colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "count": 1.0, "all": 1.0}


def test_the_judge_catches_each_kind_of_error():
    expected = [{"colour": "red", "shape": "circle", "size": "large", "position": "top left"},
                {"colour": "blue", "shape": "square", "size": "small", "position": "bottom right"}]  # fmt: skip
    for attribute, wrong in (("colour", "green"), ("shape", "triangle"), ("size", "small"), ("position", "center")):
        drawn = [dict(expected[0], **{attribute: wrong}), expected[1]]
        scores = score_image(expected, detect(render(drawn)))
        assert scores[attribute] == 0.5 and scores["all"] == 0.0, attribute
        assert all(scores[a] == 1.0 for a in ("colour", "shape", "size", "position") if a != attribute)
    missing = score_image(expected, detect(render(expected[:1])))
    assert missing["count"] == 0.0 and missing["all"] == 0.0
    assert detect(render([])) == []
    with pytest.raises(ValueError, match="32x32"):
        detect(np.zeros((16, 16, 3), dtype=np.uint8))


def test_exact_match_per_question_type():
    scores = score_answers(["Red ", "circle", "top", "one"], ["red", "square", "top", "one"],
                           ["colour", "shape", "position", "count"])  # fmt: skip
    assert scores == {"colour": 1.0, "count": 1.0, "position": 1.0, "shape": 0.0, "all": 0.75}
