"""Shapes: a procedural benchmark for unified models that runs on a CPU.

32x32 images with 1-2 flat-coloured shapes (circle, square, triangle; 6 colours; 2 sizes) in the cells
of a 3x3 grid on a white background, at least 2 px apart (`shapes_dataset(jitter=n)` also moves each
shape by up to n px inside its cell; off by default, see `JITTER`). Each scene has a caption ("a small
red circle at the top left and a large blue square at the bottom right") and questions about colour,
shape, position, size and count. Everything is a function of the seed.

Splits (a quarter of the scenes of every split have one shape, the rest two):

- `train` / `test`: scenes of the colour+shape pairs outside `HELDOUT_PAIRS`. A scene's content
  (its shapes' colour, shape, size and cell) is either for training or for evaluation
  (`EVALUATION_SHARE`, half), by a seeded hash: no test scene is ever trained on. Only 270 one-shape
  contents exist, so training repeats its ~135 (about 45 times each at 25,000 scenes) to keep one-shape
  scenes at a quarter. With a quarter of the contents for evaluation and half the scenes one-shape,
  the model spent half its drawing on 135 memorised images (83% of them drawn right after 1200 steps,
  15% of the unseen ones).
- `heldout`: every scene uses a colour+shape pair that never occurs in `train`/`test` (compositional
  generalisation). Only 54 one-shape held-out scenes exist: the rest of its one-shape quarter has two.
- `paraphrase`: the `test` scenes, captioned only in phrasings that training never uses.

Captions come in phrasings (`STYLES`): the size word as is, as a synonym ("little"/"big", with
"middle" for "center") or left out; "at the" or "in the"; objects in reading order or reversed; and
"two red circles at the top and the left" for two shapes of the same colour and shape. `train`
uses `TRAIN_STYLES`, `test` and `heldout` the canonical one, `paraphrase` only `PARAPHRASE_STYLES`:
a synonym or no size word together with "in the", which training never says (it says "in the" only
with the plain size words, and the synonyms or no size word only with "at the"). The `asked` column holds what a
caption asks for: an attribute the caption leaves out is None.

Example:

```python
>>> from unifork_hf.data.shapes import shapes_dataset
>>> data = shapes_dataset(num_train=1000, num_test=200, num_heldout=200, seed=0)
>>> data["test"][0]["caption"]
'a small red square at the top right and a large red square at the right'

```
"""

import hashlib
import random
import re

import PIL.Image
import PIL.ImageDraw
from datasets import Dataset, DatasetDict, Features, Image, List, Value

IMAGE_SIZE = 32
BACKGROUND = (255, 255, 255)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 180),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 6, "large": 9}  # bounding-box side in pixels
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELL_CENTRES = (5, 16, 27)  # pixel centre of each grid column (x) and row (y): 2 px between large shapes
# Pixels a shape may move in x and y inside its cell (`shapes_dataset(jitter=...)`). Off by default: each
# offset is another pattern of 4-px codes, and with 1 px the demo model drew 10% of test captions right
# after 1000 steps instead of 87%.
JITTER = 0
MIN_GAP = 2  # pixels of background kept between shapes, so a slight blur cannot join two of them
ONE_SHAPE_SHARE = 0.25  # of the scenes of every split (so train and test count alike)
EVALUATION_SHARE = 0.5  # of the scene contents: only these may be in test (the rest only in train)
# Colour+shape pairs that never occur in train/test: the held-out split is made of scenes using them.
HELDOUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
QUESTION_TYPES = ("colour", "shape", "position", "size", "count")
NUMBERS = {1: "one", 2: "two"}
ATTRIBUTES = ("colour", "shape", "size", "position")

# Phrasings: (size words, preposition, order). "synonym" also says "middle" for "center".
SIZE_SYNONYMS = {"small": "little", "large": "big"}
STYLES = tuple(
    (size, preposition, order)
    for size in ("plain", "synonym", "omitted")
    for preposition in ("at", "in")
    for order in ("reading", "reversed")
)
CANONICAL_STYLE = ("plain", "at", "reading")
# Held out by size words and preposition only: a one-shape caption reads the same in either order.
PARAPHRASE_STYLES = tuple(style for style in STYLES if style[:2] in (("synonym", "in"), ("omitted", "in")))
TRAIN_STYLES = tuple(style for style in STYLES if style not in PARAPHRASE_STYLES)

OBJECT_FEATURES = {
    "colour": Value("string"),
    "shape": Value("string"),
    "size": Value("string"),
    "position": Value("string"),
    "dx": Value("int8"),
    "dy": Value("int8"),
}
ASKED_FEATURES = {
    "colour": Value("string"),
    "shape": Value("string"),
    "size": Value("string"),
    "position": Value("string"),
}
FEATURES = Features(
    {
        "image": Image(),
        "caption": Value("string"),
        "objects": List(OBJECT_FEATURES),
        "asked": List(ASKED_FEATURES),
        "questions": List({"type": Value("string"), "question": Value("string"), "answer": Value("string")}),
    }
)


def cell_centre(position: str) -> tuple[int, int]:
    """Pixel centre (x, y) of a grid cell."""
    row, column = divmod(POSITIONS.index(position), 3)
    return CELL_CENTRES[column], CELL_CENTRES[row]


def bounding_box(obj: dict) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom), inclusive, of an object: centred in its cell, moved by its
    offset (`dx`, `dy`, default 0)."""
    x, y = cell_centre(obj["position"])
    side = SIZES[obj["size"]]
    left, top = x - side // 2 + obj.get("dx", 0), y - side // 2 + obj.get("dy", 0)
    return left, top, left + side - 1, top + side - 1


def draw_shape(draw: PIL.ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw one flat shape filling the inclusive pixel box (the judge draws its templates the same way)."""
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif shape == "triangle":
        draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}.")


def render(objects: list[dict]) -> PIL.Image.Image:
    """Draw a scene: each object {colour, shape, size, position[, dx, dy]} in its cell."""
    image = PIL.Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    for obj in objects:
        draw_shape(draw, obj["shape"], bounding_box(obj), COLOURS[obj["colour"]])
    return image


def _gap(a: tuple, b: tuple) -> int:
    """Background pixels between two inclusive boxes (along the axis where they are furthest apart)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) - 1


def caption(objects: list[dict], style: tuple = CANONICAL_STYLE) -> tuple[str, list[dict]]:
    """A scene's caption in a phrasing (`STYLES`), and the objects it asks for (a left-out size is None)."""
    size_words, preposition, order = style
    objects = sorted(objects, key=lambda obj: POSITIONS.index(obj["position"]), reverse=order == "reversed")

    def size_word(size):
        return {"plain": size, "synonym": SIZE_SYNONYMS[size], "omitted": None}[size_words]

    def place(position):
        return "middle" if size_words == "synonym" and position == "center" else position

    def words(*parts):
        return " ".join(part for part in parts if part)

    asked = [
        {key: obj[key] for key in ATTRIBUTES} | ({"size": None} if size_words == "omitted" else {}) for obj in objects
    ]
    same = len(objects) == 2 and all(asked[0][key] == asked[1][key] for key in ("colour", "shape", "size"))
    if same:  # "two big red circles in the top and the left"
        first, second = (place(obj["position"]) for obj in objects)
        text = words(
            "two",
            size_word(objects[0]["size"]),
            objects[0]["colour"],
            objects[0]["shape"] + "s",
            preposition,
            "the",
            first,
            "and the",
            second,
        )
    else:
        text = " and ".join(
            words("a", size_word(obj["size"]), obj["colour"], obj["shape"], preposition, "the", place(obj["position"]))
            for obj in objects
        )
    return text, asked


def questions(objects: list[dict], rng: random.Random) -> list[dict]:
    """One question of each type about the scene, answerable without ambiguity."""
    target = rng.choice(objects)
    where = f"at the {target['position']}"
    return [
        {"type": "colour", "question": f"What colour is the shape {where}?", "answer": target["colour"]},
        {"type": "shape", "question": f"What shape is {where}?", "answer": target["shape"]},
        {
            "type": "position",
            "question": f"Where is the {target['colour']} {target['shape']}?",
            "answer": target["position"],
        },
        {"type": "size", "question": f"How big is the shape {where}?", "answer": target["size"]},
        {"type": "count", "question": "How many shapes are there?", "answer": NUMBERS[len(objects)]},
    ]


def _random_scene(rng: random.Random, heldout: bool, count: int, jitter: int = JITTER) -> list[dict]:
    positions = rng.sample(POSITIONS, count)
    objects = []
    for index, position in enumerate(positions):
        while True:
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
            is_heldout = (colour, shape) in HELDOUT_PAIRS
            # a held-out scene's first object uses a held-out pair; every other object must not, in train/test
            if (heldout and index == 0) == is_heldout or (heldout and index > 0):
                break
        objects.append({"colour": colour, "shape": shape, "size": rng.choice(sorted(SIZES)), "position": position})
    for _ in range(20):  # offsets that keep MIN_GAP between shapes (no offsets always do)
        for obj in objects:  # (a large shape in the last row or column has no room to move out)
            left, top, right, bottom = bounding_box({**obj, "dx": 0, "dy": 0})
            obj["dx"] = rng.randint(max(-jitter, -left), min(jitter, IMAGE_SIZE - 1 - right))
            obj["dy"] = rng.randint(max(-jitter, -top), min(jitter, IMAGE_SIZE - 1 - bottom))
        if len(objects) < 2 or _gap(bounding_box(objects[0]), bounding_box(objects[1])) >= MIN_GAP:
            break
    else:
        for obj in objects:
            obj["dx"] = obj["dy"] = 0
    return sorted(objects, key=lambda obj: POSITIONS.index(obj["position"]))


def scene_content(objects: list[dict]) -> tuple:
    """What a scene shows, ignoring the pixel offsets: the key that keeps training and evaluation apart."""
    return tuple((o["colour"], o["shape"], o["size"], o["position"]) for o in objects)


def _scene_key(objects: list[dict]) -> tuple:
    return tuple((*content, o.get("dx", 0), o.get("dy", 0)) for content, o in zip(scene_content(objects), objects))


def is_evaluation_content(objects: list[dict], seed: int = 0) -> bool:
    """Whether a scene's content belongs to evaluation (test) rather than training: EVALUATION_SHARE of all
    contents, by a hash seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}-{scene_content(objects)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < EVALUATION_SHARE


def shapes_dataset(
    num_train: int = 20000, num_test: int = 500, num_heldout: int = 500, seed: int = 0, jitter: int = JITTER
) -> DatasetDict:
    """The splits `train`, `test`, `heldout`, `paraphrase`, each row `{image, caption, objects, asked, questions}`.

    Each split draws from its own random stream (seeded by `seed` and its name), so a split does not
    depend on the sizes of the others: the test split of `num_train=0` is the one a model trained with
    any `num_train` never saw. Scenes are distinct within `test` and `heldout`; `train` repeats some
    one-shape scenes (there are too few to keep them at a third otherwise). `paraphrase` holds the `test`
    scenes with captions in `PARAPHRASE_STYLES`.
    """
    splits = {}
    for name, size in (("heldout", num_heldout), ("test", num_test), ("train", num_train)):
        rng = random.Random(f"shapes-{seed}-{name}")
        rows = {"image": [], "caption": [], "objects": [], "asked": [], "questions": []}
        seen, exhausted = set(), set()
        while len(rows["caption"]) < size:
            count = 1 if rng.random() < ONE_SHAPE_SHARE else 2
            for _ in range(2000):  # a new scene of this count (so rejecting repeats keeps the share)
                count = 2 if count in exhausted else count
                objects = _random_scene(rng, heldout=name == "heldout", count=count, jitter=jitter)
                in_split = name == "heldout" or is_evaluation_content(objects, seed) == (name == "test")
                if in_split and (name == "train" or _scene_key(objects) not in seen):  # evaluation scenes are distinct
                    break
            else:
                if count in exhausted:
                    raise ValueError(f"Cannot draw {size} distinct {name} scenes (only {len(rows['caption'])} exist).")
                exhausted.add(count)  # e.g. held-out one-shape scenes: 54 exist
                continue
            seen.add(_scene_key(objects))
            style = rng.choice(TRAIN_STYLES) if name == "train" else CANONICAL_STYLE
            text, asked = caption(objects, style)
            rows["image"].append(render(objects))
            rows["caption"].append(text)
            rows["objects"].append(objects)
            rows["asked"].append(asked)
            rows["questions"].append(questions(objects, rng))
        splits[name] = Dataset.from_dict(rows, features=FEATURES)
    rng = random.Random(f"shapes-{seed}-paraphrase")
    paraphrased = [caption(objects, rng.choice(PARAPHRASE_STYLES)) for objects in splits["test"]["objects"]]
    splits["paraphrase"] = splits["test"].map(
        lambda row, index: dict(zip(("caption", "asked"), paraphrased[index])), with_indices=True, features=FEATURES
    )
    return DatasetDict({name: splits[name] for name in ("train", "test", "heldout", "paraphrase")})


def to_generation(dataset: Dataset) -> Dataset:
    """Caption -> image rows (`image`, `caption`) for `prepare_generation`."""
    return dataset.select_columns(["image", "caption"])


def to_understanding(
    dataset: Dataset,
    conversation: bool = False,
    seed: int = 0,
    ask_every_position: bool = False,
    question_first: bool = True,
) -> Dataset:
    """Chat rows (`images`, `messages`) for `prepare_understanding`.

    `question_first=True` (default): the first user turn says its question, then shows the image. The
    decoder is causal, so only then can the image tokens' hidden states depend on what is asked; image
    first, a small model trained from scratch never learned which of two shapes a position question names
    (46.5% on two-shape scenes, chance 50%; question first 92.2%: docs/shapes-demo/experiments.md). Ask a
    model the way it was trained (`answer_questions(question_first=...)`).

    Default: one row per question, with its `question`, `type` and `answer` (what the benchmark asks).
    `conversation=True`: a scene's questions as multi-turn rows (seeded random order), grouped so that no
    question in a row gives away another's answer ("Where is the red circle?" names the colour and shape
    of "What colour is the shape at the top left?"): usually two rows per scene. For training: the 64
    image tokens are paid for once per row instead of once per question.

    `ask_every_position=True` (with `conversation`): a two-shape scene is also asked where its *other*
    shape is, in a row of its own (unless both shapes look alike). For training: with one position
    question per scene, the answer "where one of the shapes is" is right half the time whichever shape
    is named; the same image asked about both shapes is what makes the named colour and shape matter.
    A row of its own, since a row that already placed one shape gives the other's place away.
    """
    rng = random.Random(seed)

    def explode(batch):
        out = (
            {"images": [], "messages": []}
            if conversation
            else {"images": [], "messages": [], "question": [], "type": [], "answer": []}
        )
        for image, qas, objects in zip(batch["image"], batch["questions"], batch["objects"]):
            if not conversation:
                for qa in qas:
                    out["images"].append([image])
                    out["messages"].append(_chat([qa], question_first))
                    for key in ("question", "type", "answer"):
                        out[key].append(qa[key])
                continue
            groups = _leak_free_groups(qas, rng)
            if ask_every_position:
                groups += [[qa] for qa in _other_position_questions(objects, qas)]
            for group in groups:
                out["images"].append([image])
                out["messages"].append(_chat(group, question_first))
        return out

    return dataset.map(explode, batched=True, remove_columns=dataset.column_names)


def _chat(qas: list[dict], question_first: bool) -> list[dict]:
    """The chat turns asking `qas` in order about one image, shown in the first user turn."""
    turns = []
    for i, qa in enumerate(qas):
        content = [{"type": "text", "text": qa["question"]}]
        if i == 0:
            image = [{"type": "image", "text": None}]
            content = content + image if question_first else image + content
        turns += [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": qa["answer"]}]},
        ]
    return turns


def _reveals(text: str, answer: str) -> bool:
    return re.search(rf"\b{re.escape(answer)}\b", text) is not None


def _leak_free_groups(qas: list[dict], rng: random.Random) -> list[list[dict]]:
    """The questions in a random order, grouped so that no question of a group gives another's answer away."""
    groups = []
    for qa in rng.sample(qas, len(qas)):
        for group in groups:
            if not any(
                _reveals(other["question"], qa["answer"]) or _reveals(qa["question"], other["answer"])
                for other in group
            ):
                group.append(qa)
                break
        else:
            groups.append([qa])
    return groups


def _other_position_questions(objects: list[dict], qas: list[dict]) -> list[dict]:
    """Where is the shape the scene's position question did not ask about (unless both look alike)."""
    asked = next(qa["answer"] for qa in qas if qa["type"] == "position")
    return [
        {"type": "position", "question": f"Where is the {obj['colour']} {obj['shape']}?", "answer": obj["position"]}
        for obj in objects
        if obj["position"] != asked
        and not any((o["colour"], o["shape"]) == (obj["colour"], obj["shape"]) for o in objects if o is not obj)
    ]
