"""Score a checkpoint on a dataset of your own: answers by exact match (beside the majority answer), images by
a judge you supply.

Rows with a question (`image`, `question`, `answer` columns) test understanding; rows with a caption
(`caption`, optional `image`) are drawn and handed to the judge. `unifork evaluate --dataset DIR --judge
module:function` runs it from the command line.
"""

import importlib
from collections import Counter
from collections.abc import Callable

import torch

from .answers import answer_questions


def load_judge(spec: str) -> Callable:
    """`"package.module:function"` -> the function (a judge: `judge(images, rows) -> dict of scores`)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"judge must be given as 'module:function', got {spec!r}.")
    judge = getattr(importlib.import_module(module), name, None)
    if not callable(judge):
        raise ValueError(f"judge {spec!r}: {module} has no function {name!r}.")
    return judge


def evaluate_dataset(
    model,
    dataset,
    judge: Callable | None = None,
    n: int | None = None,
    seed: int = 0,
    question_first: bool = True,
    batch_size: int = 64,
    progress_bar: bool = True,
) -> dict:
    """Understanding: exact match of the (stripped) replies on the rows with a `question`, with the share of
    the most common answer beside it. Generation: one image per row with a `caption` (seeded per row), scored
    by `judge(images, rows)` (rows as dicts) if given, else only counted.

    Example:

    ```python
    >>> import unifork_hf
    >>> from datasets import Dataset
    >>> from unifork_hf import UniForkForConditionalGeneration
    >>> from unifork_hf.evaluation import detect
    >>> from unifork_hf.evaluation.datasets import evaluate_dataset
    >>> model = UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
    >>> drawn = model.generate_image("a large red circle at the top left", progress_bar=False)[0]
    >>> rows = Dataset.from_dict({"image": [drawn, None], "question": ["What colour is the circle?", None],
    ...                           "answer": ["red", None], "caption": [None, "a small blue square at the center"]})
    >>> def colour_judge(images, rows):
    ...     return {"blue": sum(d["colour"] == "blue" for image in images for d in detect(image)) / len(images)}
    >>> evaluate_dataset(model, rows, judge=colour_judge, progress_bar=False)
    {'understanding': {'exact_match': 1.0, 'majority_answer': 1.0, 'num_questions': 1}, 'generation': {'num_images': 1, 'blue': 1.0}}

    ```
    """
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    columns = set(dataset.column_names)
    result = {}
    if {"image", "question", "answer"} <= columns:
        asked = [row for row in dataset if row["question"] is not None]
        if asked:
            replies = answer_questions(
                model,
                [row["image"] for row in asked],
                [row["question"] for row in asked],
                batch_size=batch_size,
                progress_bar=progress_bar,
                question_first=question_first,
            )
            answers = [str(row["answer"]).strip() for row in asked]
            majority = Counter(answers).most_common(1)[0][1] / len(answers)
            correct = sum(reply == answer for reply, answer in zip(replies, answers))
            result["understanding"] = {
                "exact_match": correct / len(asked),
                "majority_answer": majority,
                "num_questions": len(asked),
            }
    if "caption" in columns:
        rows = [row for row in dataset if row["caption"] is not None]
        if rows:
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(rows))]
            images = model.generate_image(
                [row["caption"] for row in rows],
                generator=generators,
                max_batch_size=batch_size,
                progress_bar=progress_bar,
            )
            result["generation"] = {"num_images": len(images), **(judge(images, rows) if judge else {})}
    if not result:
        raise ValueError(
            "The dataset has neither question rows (columns image, question, answer) nor caption rows (caption); "
            f"its columns are {sorted(columns)}."
        )
    return result


__all__ = ["evaluate_dataset", "load_judge"]
