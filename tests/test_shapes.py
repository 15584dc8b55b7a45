import collections
import itertools

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import pytest

from unifork_hf.data.shapes import (
    CANONICAL_STYLE,
    COLOURS,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    MIN_GAP,
    PARAPHRASE_STYLES,
    POSITIONS,
    QUESTION_TYPES,
    SIZE_SYNONYMS,
    TRAIN_STYLES,
    _gap,
    bounding_box,
    caption,
    render,
    scene_content,
    shapes_dataset,
    to_generation,
    to_understanding,
)
from unifork_hf.evaluation import detect, score_answers, score_image, score_images
from unifork_hf.evaluation.shapes_judge import answer_baselines


@pytest.fixture(scope="module")
def data():
    return shapes_dataset(num_train=3000, num_test=300, num_heldout=300, seed=0)


def scene_keys(split):
    return {scene_content(objects) for objects in split["objects"]}


def one_shape_share(split):
    return sum(len(objects) == 1 for objects in split["objects"]) / len(split)


def test_same_seed_same_data_other_seed_other_data(data):
    again = shapes_dataset(num_train=3000, num_test=300, num_heldout=300, seed=0)
    other = shapes_dataset(num_train=3000, num_test=300, num_heldout=300, seed=1)
    for split in ("train", "test", "heldout", "paraphrase"):
        assert again[split]["caption"] == data[split]["caption"]
        assert again[split]["questions"] == data[split]["questions"]
        assert all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(again[split]["image"][:50], data[split]["image"][:50])
        )
    assert other["train"]["caption"] != data["train"]["caption"]
    # the evaluation splits do not depend on how many training scenes were drawn
    evaluation_only = shapes_dataset(num_train=0, num_test=300, num_heldout=300, seed=0)
    for split in ("test", "heldout", "paraphrase"):
        assert evaluation_only[split]["caption"] == data[split]["caption"]


def test_no_scene_content_in_two_splits_and_heldout_pairs_never_train(data):
    train, test, heldout = (scene_keys(data[s]) for s in ("train", "test", "heldout"))
    # not even shifted by a pixel: the split is by content (colours, shapes, sizes, cells)
    assert not train & test and not train & heldout and not test & heldout
    for split in ("train", "test"):
        pairs = {(o["colour"], o["shape"]) for objs in data[split]["objects"] for o in objs}
        assert not pairs & set(HELDOUT_PAIRS), split
    assert all(any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in objs) for objs in data["heldout"]["objects"])
    for split in ("test", "heldout"):  # evaluation scenes are distinct images
        images = {np.asarray(image).tobytes() for image in data[split]["image"]}
        assert len(images) == len(data[split]), split


def test_train_count_distribution_matches_test_without_a_handful_of_scenes_repeated():
    data = shapes_dataset(num_train=25000, num_test=500, num_heldout=500, seed=0)
    train, test = one_shape_share(data["train"]), one_shape_share(data["test"])
    assert abs(train - test) <= 0.05 and 0.2 <= test <= 0.3, (train, test)
    one_shape = collections.Counter(scene_content(objs) for objs in data["train"]["objects"] if len(objs) == 1)
    assert len(one_shape) >= 120 and max(one_shape.values()) <= 100  # not 75 scenes x 100s
    answers = collections.Counter(qas[-1]["answer"] for qas in data["test"]["questions"])
    assert set(answers) == {"one", "two"} and answers["one"] >= 0.2 * len(data["test"])


def test_shapes_stay_in_their_cell_apart_and_inside_the_image():
    for jitter in (0, 1):
        data = shapes_dataset(num_train=2000, num_test=100, num_heldout=100, seed=0, jitter=jitter)
        offsets = collections.Counter()
        for objects in list(data["train"]["objects"]) + list(data["test"]["objects"]):
            boxes = [bounding_box(o) for o in objects]
            for o, (left, top, right, bottom) in zip(objects, boxes):
                assert 0 <= left and right < IMAGE_SIZE and 0 <= top and bottom < IMAGE_SIZE
                cy, cx = (top + bottom) / 2, (left + right) / 2
                assert POSITIONS[int(cy // (IMAGE_SIZE / 3)) * 3 + int(cx // (IMAGE_SIZE / 3))] == o["position"]
                offsets[(o["dx"], o["dy"])] += 1
            if len(boxes) == 2:
                assert _gap(*boxes) >= MIN_GAP
        assert len(offsets) == (1 if jitter == 0 else 9)  # every offset in -1..1 x -1..1 occurs with jitter=1
        assert score_images(data["test"]["image"], data["test"]["asked"])["all"] == 1.0


def test_scene_contents_and_questions(data):
    row = data["test"][0]
    objects = row["objects"]
    assert 1 <= len(objects) <= 2 and len({o["position"] for o in objects}) == len(objects)
    assert row["caption"] == caption(objects)[0]
    assert [q["type"] for q in row["questions"]] == list(QUESTION_TYPES)
    assert row["questions"][-1]["answer"] == {1: "one", 2: "two"}[len(objects)]
    assert row["image"].size == (32, 32)
    und = to_understanding(data["test"].select(range(4)))
    assert len(und) == 20 and und[0]["messages"][1]["content"][0]["text"] == und[0]["answer"]
    assert und[0]["messages"][0]["content"] == [
        {"type": "text", "text": und[0]["question"]},
        {"type": "image", "text": None},
    ]
    image_first = to_understanding(data["test"].select(range(4)), question_first=False)
    assert [item["type"] for item in image_first[0]["messages"][0]["content"]] == ["image", "text"]
    assert to_generation(data["test"]).column_names == ["image", "caption"]


def conversation_turns(row):
    texts = [next(item["text"] for item in turn["content"] if item["type"] == "text") for turn in row["messages"]]
    return list(zip(texts[::2], texts[1::2]))


def test_conversation_rows_ask_each_question_once_without_giving_answers_away(data):
    scenes = data["train"].select(range(60))
    rows = to_understanding(scenes, conversation=True, seed=3)
    asked = collections.Counter(qa for row in rows for qa in conversation_turns(row))
    expected = collections.Counter((q["question"], q["answer"]) for qs in scenes["questions"] for q in qs)
    assert asked == expected  # (repeated one-shape scenes repeat their questions)
    for row in rows:
        # one image, in the first user turn, after its question (the image tokens can attend to what is asked)
        assert [item["type"] for item in row["messages"][0]["content"]] == ["text", "image"]
        assert all(item["type"] == "text" for turn in row["messages"][1:] for item in turn["content"])
        for (question, _), (_, answer) in itertools.permutations(conversation_turns(row), 2):
            assert f" {answer}" not in f" {question}".replace("?", " "), (question, answer)


def test_ask_every_position_asks_where_the_other_shape_is_in_a_row_of_its_own(data):
    scenes = data["train"].select(range(200))
    plain = to_understanding(scenes, conversation=True, seed=3)
    every = to_understanding(scenes, conversation=True, seed=3, ask_every_position=True)
    plain_rows = collections.Counter(tuple(conversation_turns(row)) for row in plain)
    every_rows = collections.Counter(tuple(conversation_turns(row)) for row in every)
    assert every_rows >= plain_rows  # the plain rows are all still there, unchanged
    expected = collections.Counter()
    for objects, questions in zip(scenes["objects"], scenes["questions"]):
        target = next(q["answer"] for q in questions if q["type"] == "position")
        looks = [(o["colour"], o["shape"]) for o in objects]
        if len(objects) == 2 and looks[0] != looks[1]:  # "Where is the red circle?" with two red circles: no answer
            other = next(o for o in objects if o["position"] != target)
            expected[((f"Where is the {other['colour']} {other['shape']}?", other["position"]),)] += 1
    assert every_rows - plain_rows == expected and expected.total() > 80  # each in a row of its own


def test_phrasings():
    red = {"colour": "red", "shape": "circle", "size": "large", "position": "center"}
    blue = {"colour": "blue", "shape": "square", "size": "small", "position": "top left"}
    assert caption([blue, red]) == (
        "a small blue square at the top left and a large red circle at the center",
        [{k: blue[k] for k in ("colour", "shape", "size", "position")}, red],
    )
    text, asked = caption([red, blue], ("synonym", "in", "reversed"))
    assert text == "a big red circle in the middle and a little blue square in the top left"
    assert asked[0]["position"] == "center"  # the caption says "middle"; the object is in the center cell
    text, asked = caption([red, blue], ("omitted", "at", "reading"))
    assert text == "a blue square at the top left and a red circle at the center"
    assert [a["size"] for a in asked] == [None, None]
    twin = dict(red, position="bottom right")
    assert caption([red, twin])[0] == "two large red circles at the center and the bottom right"
    assert caption([red, dict(twin, size="small")], ("omitted", "in", "reversed"))[0] == (
        "two red circles in the bottom right and the center"  # same colour and shape, sizes left open
    )
    assert CANONICAL_STYLE in TRAIN_STYLES and not set(PARAPHRASE_STYLES) & set(TRAIN_STYLES)
    # every single choice of a paraphrase phrasing is trained, never together
    for style in PARAPHRASE_STYLES:
        for i, choice in enumerate(style):
            assert any(trained[i] == choice for trained in TRAIN_STYLES)


def test_splits_use_their_phrasings(data):
    def styles_of(text, asked):  # the phrasings that could have written this caption
        found = set()
        for style in (*TRAIN_STYLES, *PARAPHRASE_STYLES):
            for sizes in itertools.product(("small", "large"), repeat=len(asked)):
                objects = [dict(a, size=a["size"] or size) for a, size in zip(asked, sizes)]
                if caption(objects, style)[0] == text:
                    found.add(style)
        assert found, text
        return found

    train = [styles_of(t, a) for t, a in zip(data["train"]["caption"], data["train"]["asked"])]
    assert all(found <= set(TRAIN_STYLES) for found in train)
    assert set().union(*train) == set(TRAIN_STYLES)
    paraphrase = [styles_of(t, a) for t, a in zip(data["paraphrase"]["caption"], data["paraphrase"]["asked"])]
    assert all(found <= set(PARAPHRASE_STYLES) for found in paraphrase)  # no training phrasing writes them
    assert set().union(*paraphrase) == set(PARAPHRASE_STYLES)
    test = [styles_of(t, a) for t, a in zip(data["test"]["caption"], data["test"]["asked"])]
    assert all(CANONICAL_STYLE in found for found in test)
    assert data["paraphrase"]["objects"] == data["test"]["objects"]  # the same scenes, said otherwise
    words = {w for text in data["train"]["caption"] for w in text.split()}
    assert {"little", "big", "middle", "in", "two"} <= words  # paraphrases use only trained words
    for objects, asked in zip(data["train"]["objects"], data["train"]["asked"]):
        for o, a in zip(sorted(objects, key=lambda o: o["position"]), sorted(asked, key=lambda o: o["position"])):
            assert a["size"] in (None, o["size"]) and (a["colour"], a["shape"], a["position"]) == (
                o["colour"],
                o["shape"],
                o["position"],
            )
    assert any(a["size"] is None for asked in data["train"]["asked"] for a in asked)
    assert any(text.startswith("two ") for text in data["train"]["caption"])
    assert set(SIZE_SYNONYMS.values()) <= words


def test_the_judge_scores_ground_truth_and_soft_edges_perfectly(data):
    perfect = {"colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "count": 1.0, "all": 1.0}
    for split in ("test", "heldout", "paraphrase"):
        assert score_images(data[split]["image"], data[split]["asked"]) == perfect, split
    scenes = data["test"].select(range(150))
    for blur in (PIL.ImageFilter.BoxBlur(1), PIL.ImageFilter.GaussianBlur(0.8)):  # a 3x3 box blur and a soft one
        blurred = [image.filter(blur) for image in scenes["image"]]
        assert score_images(blurred, scenes["asked"]) == perfect


# -- adversarial cases: each of these passed the earlier judge (fill-ratio shapes, nearest-palette pixels)

RED = {"colour": "red", "shape": "triangle", "size": "large", "position": "center"}


def _canvas():
    image = PIL.Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    return image, PIL.ImageDraw.Draw(image)


@pytest.mark.parametrize("shape", ["triangle", "square", "circle"])
def test_outlines_strokes_and_junk_are_no_shape(shape):
    asked = [dict(RED, shape=shape)]
    box = bounding_box(asked[0])
    outline, draw = _canvas()
    draw.rectangle(box, outline=COLOURS["red"])  # a hollow square
    stroke, draw = _canvas()
    draw.line((box[0], box[3], box[2], box[1]), fill=COLOURS["red"], width=2)  # a 2-pixel diagonal stroke
    junk, draw = _canvas()
    rng = np.random.default_rng(0)
    for y in range(box[1], box[3] + 1):
        for x in range(box[0], box[2] + 1):
            if (x + y) % 2 == 0 or y > (box[1] + box[3]) / 2:
                draw.point((x, y), fill=list(COLOURS.values())[rng.integers(len(COLOURS))])
    touching = render(asked)  # another red shape touching the asked one: one blob, no shape
    PIL.ImageDraw.Draw(touching).rectangle((box[2] + 1, box[3] - 3, box[2] + 4, box[3]), fill=COLOURS["red"])
    for name, image in (("outline", outline), ("stroke", stroke), ("touching", touching)):
        scores = score_image(asked, detect(image))
        assert scores["all"] == 0.0 and scores["shape"][0] == 0, (name, detect(image))
    scores = score_image(asked, detect(junk))  # pixels of every colour: not an object of the asked one
    assert scores["all"] == 0.0 and scores["colour"][0] == 0 and detect(junk)[0]["colour"] == "mixed"


def test_a_circle_missing_a_pixel_is_still_a_circle():
    for size in ("small", "large"):
        circle = dict(RED, shape="circle", size=size)
        array = np.asarray(render([circle])).copy()
        ys, xs = np.nonzero(array[..., 1] < 200)
        for y, x in ((ys[0], xs[0]), (ys[-1], xs[-1])):  # its top and bottom pixels, one at a time
            damaged = array.copy()
            damaged[y, x] = 255
            assert detect(PIL.Image.fromarray(damaged)) == [
                {k: circle[k] for k in ("colour", "shape", "size", "position")}
            ]


def test_counts_are_exact_and_matching_is_one_to_one():
    blue = {"colour": "blue", "shape": "square", "size": "small", "position": "bottom right"}
    extra = {"colour": "green", "shape": "circle", "size": "small", "position": "top left"}
    scores = score_image([RED, blue], detect(render([RED, blue, extra])))
    assert scores["count"] == 0.0 and scores["all"] == 0.0
    assert scores["colour"] == scores["shape"] == [2, 2]  # the asked objects themselves are right
    # two asked red triangles, one drawn: the drawing matches one of them only
    twin = dict(RED, position="top left")
    scores = score_image([RED, twin], detect(render([RED])))
    assert scores["colour"] == [1, 2] and scores["shape"] == [1, 2] and scores["all"] == 0.0
    # objects drawn in each other's cells: matched one to one, positions wrong
    swapped = score_image(
        [RED, blue], detect(render([dict(RED, position=blue["position"]), dict(blue, position="center")]))
    )
    assert swapped["position"][0] < 2 and swapped["all"] == 0.0
    # an unasked attribute (None) is not judged
    loose = score_image([dict(RED, size=None)], detect(render([dict(RED, size="small")])))
    assert loose["size"] == [0, 0] and loose["all"] == 1.0


def test_the_judge_catches_each_kind_of_error():
    expected = [
        {"colour": "red", "shape": "circle", "size": "large", "position": "top left"},
        {"colour": "blue", "shape": "square", "size": "small", "position": "bottom right"},
    ]
    for attribute, wrong in (("colour", "green"), ("shape", "triangle"), ("size", "small"), ("position", "center")):
        drawn = [dict(expected[0], **{attribute: wrong}), expected[1]]
        scores = score_image(expected, detect(render(drawn)))
        assert scores[attribute] == [1, 2] and scores["all"] == 0.0, attribute
        assert all(scores[a] == [2, 2] for a in ("colour", "shape", "size", "position") if a != attribute)
    missing = score_image(expected, detect(render(expected[:1])))
    assert missing["count"] == 0.0 and missing["all"] == 0.0
    assert detect(render([])) == []
    with pytest.raises(ValueError, match="32x32"):
        detect(np.zeros((16, 16, 3), dtype=np.uint8))


def test_exact_match_per_question_type_and_baselines():
    scores = score_answers(
        ["Red ", "circle", "top", "one"], ["red", "square", "top", "one"], ["colour", "shape", "position", "count"]
    )
    assert scores == {"colour": 1.0, "count": 1.0, "position": 1.0, "shape": 0.0, "all": 0.75}
    baselines = answer_baselines(
        ["two", "two", "one", "red"], ["count", "count", "count", "colour"], {"count": 2, "colour": 6}
    )
    assert baselines["majority"] == {"colour": 1.0, "count": 2 / 3, "all": 0.75}
    assert baselines["chance"] == {"colour": 1 / 6, "count": 0.5, "all": (3 / 2 + 1 / 6) / 4}
