"""A GenEval-style automatic judge for Shapes images, and exact-match scoring of answers.

`detect(image)` finds the objects of an image:

1. Each pixel is read as a blend of the white background and one palette colour (the colour whose
   white-to-colour line passes nearest to it); it is foreground when it is at least half that colour.
   So a soft (blurred or anti-aliased) edge counts by how much of the shape covers it, instead of
   snapping to whichever palette colour happens to be nearest (a pink edge of a red shape is nearer
   to orange than to red or white).
2. Foreground pixels are split into 4-connected components; components under `MIN_AREA` pixels are
   noise. A component's colour is the colour most of its solid pixels have, or "mixed" when fewer
   than `MIN_COLOUR_PURITY` of them agree (a blob of several colours is not an object of one).
3. Its shape is the template (circle, square, triangle, drawn into the component's bounding box exactly
   as `render` draws it) it overlaps best, by intersection over union, if that is at least
   `MIN_SHAPE_IOU`; else "unknown" (outlines, strokes and blobs are no shape).
4. Its size comes from its bounding box, its position from the grid cell of its centroid.

`score_image` matches asked and detected objects one to one (the assignment with the most correct
attributes), so one drawing can not count for two asked objects, and counts are exact.

Example:

```python
>>> from unifork_hf.data.shapes import render
>>> detect(render([{"colour": "red", "shape": "circle", "size": "large", "position": "top left"}]))
[{'colour': 'red', 'shape': 'circle', 'size': 'large', 'position': 'top left'}]

```
"""

import functools
import itertools
from collections import defaultdict

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter

from ..data.shapes import ATTRIBUTES, BACKGROUND, COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, draw_shape

MIN_AREA = 8  # smaller components are noise (the smallest shape, a small triangle, covers ~20 pixels)
MIN_COLOUR_PURITY = 0.8  # share of a component's solid pixels that must have its colour
MIN_SHAPE_IOU = 0.75  # overlap with the best shape template (an outline of a square scores 0.4-0.6)
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2  # on the bounding box's longer side
_WHITE = np.array(BACKGROUND, dtype=np.float32)
_COLOUR_NAMES = list(COLOURS)
_TOWARDS = _WHITE - np.array(list(COLOURS.values()), dtype=np.float32)  # white -> each colour, (C, 3)


def _coverage(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette colour it is a blend of (index, or -1 when it is no white-colour blend) and how
    much of that colour it holds (0 = white, 1 = the pure colour)."""
    away = _WHITE - array  # (H, W, 3)
    amount = np.clip((away @ _TOWARDS.T) / (_TOWARDS**2).sum(1), 0, 1)  # (H, W, C): blend factor per colour
    residual = np.linalg.norm(away[..., None, :] - amount[..., None] * _TOWARDS, axis=-1)  # off the line, (H, W, C)
    best = residual.argmin(-1)
    amount = np.take_along_axis(amount, best[..., None], -1)[..., 0]
    off_palette = np.take_along_axis(residual, best[..., None], -1)[..., 0] > 48
    return np.where(off_palette, -1, best), amount


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) pixel coordinates."""
    seen = np.zeros_like(mask)
    components = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, pixels = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            pixels.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        components.append(np.array(pixels))
    return components


@functools.lru_cache(maxsize=8192)
def _template(shape: str, box: tuple[int, int, int, int], soft: bool) -> np.ndarray:
    """Coverage (0..1) of a shape drawn into `box` on an empty image as `render` draws it; `soft`: box-blurred."""
    image = PIL.Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw_shape(PIL.ImageDraw.Draw(image), shape, box, 255)
    if soft:
        image = image.filter(PIL.ImageFilter.BoxBlur(1))
    return np.asarray(image, dtype=np.float32) / 255


def classify_shape(coverage: np.ndarray, box: tuple[int, int, int, int]) -> tuple[str, tuple]:
    """The shape whose template best matches a component's coverage map `(H, W)` (0..1), and its box.

    Templates are drawn sharp and box-blurred into every square box within a pixel of the component's
    bounding box `box` (left, top, right, bottom); the match is the soft intersection over union
    (sum of minima / sum of maxima). Below MIN_SHAPE_IOU the shape is "unknown".
    """
    left, top, right, bottom = box
    window = (slice(max(top - 3, 0), bottom + 4), slice(max(left - 3, 0), right + 4))  # every candidate fits
    coverage = coverage[window]
    best, best_box, best_iou = "unknown", box, 0.0
    # the detected box first: a clean drawing matches there, and the search over nearby boxes is skipped
    for delta in [(0, 0, 0, 0), *itertools.product((-1, 0, 1), repeat=4)]:
        candidate = tuple(value + d for value, d in zip(box, delta))
        if candidate[2] - candidate[0] < 1 or candidate[2] - candidate[0] != candidate[3] - candidate[1]:
            continue  # every shape is drawn into a square box: a wide blob is no square
        for shape in SHAPES:
            for soft in (False, True):
                template = _template(shape, candidate, soft)[window]
                iou = np.minimum(coverage, template).sum() / np.maximum(coverage, template).sum()
                if iou > best_iou:
                    best, best_box, best_iou = shape, candidate, iou
        if best_iou > 0.95:
            break
    return (best, best_box) if best_iou >= MIN_SHAPE_IOU else ("unknown", box)


def detect(image) -> list[dict]:
    """The objects of a Shapes image (PIL or `(H, W, 3)` array), sorted by grid position."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"Shapes images are {IMAGE_SIZE}x{IMAGE_SIZE} RGB, got an array of shape {array.shape}.")
    colour, amount = _coverage(array)
    components = [pixels for pixels in _components(amount >= 0.5) if len(pixels) >= MIN_AREA]
    owner = np.full(amount.shape, -1)
    for index, pixels in enumerate(components):
        owner[pixels[:, 0], pixels[:, 1]] = index
    cell = IMAGE_SIZE / 3
    objects = []
    for index, pixels in enumerate(components):
        ys, xs = pixels[:, 0], pixels[:, 1]
        solid = colour[ys, xs][amount[ys, xs] >= 0.75]
        solid = solid if len(solid) else colour[ys, xs]
        values, counts = np.unique(solid, return_counts=True)
        main = values[counts.argmax()]
        pure = counts.max() >= MIN_COLOUR_PURITY * len(solid) and main >= 0
        # the component's coverage with its soft rim (a pixel around it that no other component owns)
        near = np.zeros(amount.shape, dtype=bool)
        near[ys, xs] = True
        near = PIL.Image.fromarray(near).filter(PIL.ImageFilter.MaxFilter(3))
        near = np.asarray(near, dtype=bool) & ((owner == index) | (owner == -1))
        box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        shape, box = classify_shape(np.where(near, amount, 0), box)
        cy, cx = pixels.mean(0)
        row, column = min(int(cy // cell), 2), min(int(cx // cell), 2)
        objects.append(
            {
                "colour": _COLOUR_NAMES[main] if pure else "mixed",
                "shape": shape,
                "size": "large" if max(box[2] - box[0], box[3] - box[1]) + 1 > SIZE_THRESHOLD else "small",
                "position": POSITIONS[row * 3 + column],
            }
        )
    return sorted(objects, key=lambda obj: POSITIONS.index(obj["position"]))


def _cell_distance(a: str, b: str) -> int:
    (ra, ca), (rb, cb) = divmod(POSITIONS.index(a), 3), divmod(POSITIONS.index(b), 3)
    return abs(ra - rb) + abs(ca - cb)


def score_image(asked: list[dict], detected: list[dict]) -> dict:
    """How well one image shows the asked objects.

    Asked and detected objects are matched one to one, by the assignment with the most correct
    attributes (ties: nearer cells). An asked attribute that is None (the caption left it open) is not
    judged. Returns per attribute `[correct, judged]` counts, `count` (exactly as many objects as asked)
    and `all` (right count and every judged attribute of every asked object right), as floats.
    """

    def hits(obj, found):
        return sum(obj.get(a) is not None and found[a] == obj[a] for a in ATTRIBUTES)

    best, best_key = (), None
    slots = list(range(len(detected))) + [None] * len(asked)  # None: the asked object is not drawn
    for assignment in set(itertools.permutations(slots, len(asked))):
        pairs = [(obj, detected[i]) for obj, i in zip(asked, assignment) if i is not None]
        key = (
            sum(hits(obj, found) for obj, found in pairs),
            -sum(_cell_distance(obj["position"], found["position"]) for obj, found in pairs if obj.get("position")),
        )
        if best_key is None or key > best_key:
            best, best_key = dict(zip(range(len(asked)), assignment)), key
    result = {}
    for attribute in ATTRIBUTES:
        judged = [(obj, best[i]) for i, obj in enumerate(asked) if obj.get(attribute) is not None]
        correct = sum(i is not None and detected[i][attribute] == obj[attribute] for obj, i in judged)
        result[attribute] = [correct, len(judged)]
    result["count"] = float(len(detected) == len(asked))
    result["all"] = float(result["count"] == 1 and all(c == n for c, n in (result[a] for a in ATTRIBUTES)))
    return result


def score_images(images, asked_objects) -> dict:
    """Over images: per attribute the share of judged asked objects drawn right (None if none was judged),
    the share of images with the right count, and the share with everything right (`all`)."""
    if len(images) != len(asked_objects):
        raise ValueError(f"{len(images)} images but {len(asked_objects)} object lists.")
    if not len(images):
        raise ValueError("score_images needs at least one image.")
    scores = [score_image(asked, detect(image)) for image, asked in zip(images, asked_objects)]
    result = {}
    for attribute in ATTRIBUTES:
        correct, judged = (sum(s[attribute][i] for s in scores) for i in (0, 1))
        result[attribute] = correct / judged if judged else None
    for key in ("count", "all"):
        result[key] = sum(s[key] for s in scores) / len(scores)
    return result


def score_answers(predictions: list[str], answers: list[str], types: list[str]) -> dict:
    """Exact-match accuracy (case and surrounding space ignored) per question type and over all."""
    if not len(predictions) == len(answers) == len(types):
        raise ValueError("predictions, answers and types must have the same length.")
    by_type = defaultdict(list)
    for prediction, answer, kind in zip(predictions, answers, types):
        by_type[kind].append(prediction.strip().lower() == answer.strip().lower())
    scores = {kind: sum(v) / len(v) for kind, v in sorted(by_type.items())}
    scores["all"] = sum(sum(v) for v in by_type.values()) / max(1, len(predictions))
    return scores


def answer_baselines(answers: list[str], types: list[str], choices: dict[str, int]) -> dict:
    """What no skill scores, per question type: `majority` (always the most common answer of that type
    in these questions) and `chance` (a uniform guess among `choices[type]` answers)."""
    by_type = defaultdict(list)
    for answer, kind in zip(answers, types):
        by_type[kind].append(answer)
    majority = {kind: max(v.count(a) for a in set(v)) / len(v) for kind, v in sorted(by_type.items())}
    majority["all"] = sum(max(v.count(a) for a in set(v)) for v in by_type.values()) / max(1, len(answers))
    chance = {kind: 1 / choices[kind] for kind in sorted(by_type)}
    chance["all"] = sum(len(v) / choices[kind] for kind, v in by_type.items()) / max(1, len(answers))
    return {"majority": majority, "chance": chance}
