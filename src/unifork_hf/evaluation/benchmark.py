"""The Shapes benchmark for any UniFork checkpoint: generate from captions and judge the images, answer
questions and score exact match.

Example:

```python
>>> import unifork_hf
>>> from unifork_hf import UniForkForConditionalGeneration
>>> from unifork_hf.data.shapes import shapes_dataset
>>> from unifork_hf.evaluation.benchmark import evaluate_shapes
>>> model = UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
>>> metrics = evaluate_shapes(model, shapes_dataset(num_train=0, num_test=20, num_heldout=0)["test"], progress_bar=False)
>>> sorted(metrics["generation"]), sorted(metrics["understanding"])
(['all', 'colour', 'count', 'position', 'shape', 'size'], ['all', 'colour', 'count', 'position', 'shape', 'size'])

```
"""

import torch

from ..data.shapes import COLOURS, NUMBERS, POSITIONS, SHAPES, SIZES, to_understanding
from .answers import answer_questions
from .shapes_judge import answer_baselines, score_answers, score_images

# How many answers each question type has: the chance baseline.
ANSWER_CHOICES = {
    "colour": len(COLOURS),
    "shape": len(SHAPES),
    "position": len(POSITIONS),
    "size": len(SIZES),
    "count": len(NUMBERS),
}


@torch.no_grad()
def generate_for_captions(model, captions, batch_size=100, seed=0, progress_bar=True, **settings):
    """One image per caption, each from its own seeded generator (so results do not depend on batching).
    Sampling settings not given come from the checkpoint (see `generate_image`)."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
    return model.generate_image(
        list(captions), generator=generators, max_batch_size=batch_size, progress_bar=progress_bar, **settings
    )


def evaluate_shapes(
    model,
    dataset,
    n: int | None = None,
    batch_size: int = 100,
    seed: int = 0,
    progress_bar: bool = True,
    jacobi_window: int | None = None,
    compile: bool = False,
    understanding: bool = True,
    question_first: bool = True,
    **sampling,
) -> dict:
    """Generation (judged images, per attribute and all-correct) and understanding (exact match per
    question type, with the majority-answer and chance baselines) on the first `n` scenes of a Shapes
    split. Images are judged against what each caption asks for (the `asked` column). Sampling uses the
    checkpoint's own settings unless `sampling` (guidance_scale, temperature, top_k, top_p) overrides
    them; `jacobi_window` samples with speculative Jacobi decoding, `compile` through torch.compile.
    `understanding=False` skips the questions (e.g. for the `paraphrase` split, whose scenes are `test`'s);
    `question_first` asks each question before its image (see `answer_questions`)."""
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    settings = model.image_generation_settings(**sampling)
    extra = {**({"jacobi_window": jacobi_window} if jacobi_window else {}), **({"compile": True} if compile else {})}
    images = generate_for_captions(model, dataset["caption"], batch_size, seed, progress_bar, **settings, **extra)
    generation = score_images(images, dataset["asked"])
    result = {"num_scenes": len(dataset), "settings": {**settings, **extra}, "generation": rounded(generation)}
    if understanding:
        questions = to_understanding(dataset)
        asked = questions["question"]
        predictions = answer_questions(
            model,
            [imgs[0] for imgs in questions["images"]],
            asked,
            batch_size,
            progress_bar=progress_bar,
            question_first=question_first,
        )
        baselines = answer_baselines(questions["answer"], questions["type"], ANSWER_CHOICES)
        result["understanding"] = rounded(score_answers(predictions, questions["answer"], questions["type"]))
        result["understanding_baselines"] = {name: rounded(values) for name, values in baselines.items()}
        result["num_questions"] = len(questions)
    return result


def rounded(scores: dict) -> dict:
    return {k: None if v is None else round(v, 4) for k, v in scores.items()}


def eval_results_for_card(metrics: dict) -> list[dict]:
    """`{split: evaluate_shapes(...)}` -> model-index entries for the model card."""
    results = []
    for split, values in metrics.items():
        for task_type, key, name in (
            ("text-to-image", "generation", "all attributes correct"),
            ("visual-question-answering", "understanding", "exact match"),
        ):
            if key not in values:
                continue
            results.append(
                {
                    "task_type": task_type,
                    "dataset_type": "unifork_hf.data.shapes",
                    "dataset_name": "Shapes",
                    "dataset_split": split,
                    "metric_type": "accuracy",
                    "metric_name": f"{name} ({split})",
                    "metric_value": values[key]["all"],
                }
            )
    return results


def image_grid(images, labels, columns: int, cell: int = 128):
    """Images in rows of `columns`, upscaled to `cell` px, each row headed by its label."""
    from PIL import Image, ImageDraw

    label_height = 16
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell, rows * (cell + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top = row * (cell + label_height)
        if column == 0:
            draw.text((2, top + 2), labels[row], fill="black")
        grid.paste(image.resize((cell, cell), Image.NEAREST), (column * cell, top + label_height))
    return grid
