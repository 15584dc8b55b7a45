"""A GenEval-style automatic judge for Shapes images, and exact-match scoring of answers.

`detect(image)` finds the objects of an image: pixels are snapped to the nearest palette colour,
each non-background colour is split into connected components, and each component gets a shape
(from how much of its bounding box it fills), a size (its bounding box) and a position (the grid cell of
its centroid). `score_images` compares detections with the objects a caption asked for.

Example:

```python
>>> from unifork_hf.data.shapes import render
>>> detect(render([{"colour": "red", "shape": "circle", "size": "large", "position": "top left"}]))
[{'colour': 'red', 'shape': 'circle', 'size': 'large', 'position': 'top left'}]
```
"""

from collections import defaultdict

import numpy as np

from ..data.shapes import BACKGROUND, COLOURS, IMAGE_SIZE, POSITIONS, SIZES

ATTRIBUTES = ("colour", "shape", "size", "position")
_PALETTE_NAMES = ["background", *COLOURS]
_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
MIN_AREA = 6  # smaller components are noise (the smallest shape, a small triangle, covers ~20 pixels)
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2  # on the bounding box's longer side


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


def classify_shape(pixels: np.ndarray) -> str:
    """square fills its bounding box, a circle ~3/4 of it, a triangle ~1/2."""
    height = pixels[:, 0].max() - pixels[:, 0].min() + 1
    width = pixels[:, 1].max() - pixels[:, 1].min() + 1
    fill = len(pixels) / (height * width)
    if fill > 0.9:
        return "square"
    return "circle" if fill > 0.66 else "triangle"


def detect(image) -> list[dict]:
    """The objects of a Shapes image (PIL or `(H, W, 3)` array), sorted by grid position."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"Shapes images are {IMAGE_SIZE}x{IMAGE_SIZE}, got {array.shape[1]}x{array.shape[0]}.")
    nearest = ((array[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1).argmin(-1)
    cell = IMAGE_SIZE / 3
    objects = []
    for index, name in enumerate(_PALETTE_NAMES[1:], start=1):
        for pixels in _components(nearest == index):
            if len(pixels) < MIN_AREA:
                continue
            cy, cx = pixels.mean(0)
            row, column = min(int(cy // cell), 2), min(int(cx // cell), 2)
            objects.append({
                "colour": name,
                "shape": classify_shape(pixels),
                "size": "large" if max(np.ptp(pixels, axis=0)) + 1 > SIZE_THRESHOLD else "small",
                "position": POSITIONS[row * 3 + column],
            })  # fmt: skip
    return sorted(objects, key=lambda obj: POSITIONS.index(obj["position"]))


def score_image(expected: list[dict], detected: list[dict]) -> dict:
    """Per-attribute correctness of one image: each expected object is matched to the detection in its
    cell (else the nearest-cell one); `count` and `all` (every attribute of every object, right count)."""
    remaining = list(detected)
    hits = defaultdict(int)
    for obj in expected:
        if not remaining:
            break
        row, column = divmod(POSITIONS.index(obj["position"]), 3)
        match = min(remaining, key=lambda d: abs(divmod(POSITIONS.index(d["position"]), 3)[0] - row)
                    + abs(divmod(POSITIONS.index(d["position"]), 3)[1] - column))  # fmt: skip
        remaining.remove(match)
        for attribute in ATTRIBUTES:
            hits[attribute] += match[attribute] == obj[attribute]
    result = {attribute: hits[attribute] / len(expected) for attribute in ATTRIBUTES}
    result["count"] = float(len(detected) == len(expected))
    result["all"] = float(result["count"] == 1 and all(result[a] == 1 for a in ATTRIBUTES))
    return result


def score_images(images, expected_objects) -> dict:
    """Mean per-attribute accuracy, count accuracy and all-correct rate over images."""
    if len(images) != len(expected_objects):
        raise ValueError(f"{len(images)} images but {len(expected_objects)} object lists.")
    scores = [score_image(expected, detect(image)) for image, expected in zip(images, expected_objects)]
    return {key: sum(s[key] for s in scores) / len(scores) for key in (*ATTRIBUTES, "count", "all")}


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
