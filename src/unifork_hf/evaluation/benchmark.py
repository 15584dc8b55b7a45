"""The Shapes benchmark for any UniFork checkpoint: generate from captions and judge the images, answer
questions and score exact match.

Example:

```python
>>> from unifork_hf.data.shapes import shapes_dataset
>>> metrics = evaluate_shapes(model, shapes_dataset(num_train=0, num_test=200)["test"], n=200)
>>> metrics["generation"]["all"], metrics["understanding"]["all"]
```
"""

import torch
from tqdm.auto import tqdm

from ..data.shapes import to_understanding
from .shapes_judge import score_answers, score_images

# Sampling used for the reported numbers: near-greedy, no guidance (guidance >= 3 hurt in small models).
GENERATION_SETTINGS = {"guidance_scale": 1.0, "temperature": 0.1}


@torch.no_grad()
def generate_for_captions(model, captions, batch_size=100, seed=0, progress_bar=True, **settings):
    """One image per caption, each from its own seeded generator (so results do not depend on batching)."""
    settings = {**GENERATION_SETTINGS, **settings}
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
    return model.generate_image(list(captions), generator=generators, max_batch_size=batch_size,
                                progress_bar=progress_bar, **settings)  # fmt: skip


@torch.no_grad()
def answer_questions(model, images, questions, batch_size=100, max_new_tokens=4, progress_bar=True):
    """Greedy answers (one image + one question per row), batched with left padding."""
    processor = model._require_processor()
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), desc="answers", disable=not progress_bar):
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True,
            )
            for q in questions[start : start + batch_size]
        ]
        inputs = processor(images=list(images[start : start + batch_size]), text=texts, padding=True,
                           return_tensors="pt").to(model.device)  # fmt: skip
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(output[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def evaluate_shapes(model, dataset, n: int | None = None, batch_size: int = 100, seed: int = 0,
                    progress_bar: bool = True, jacobi_window: int | None = None, compile: bool = False) -> dict:  # fmt: skip
    """Generation (judged images, per attribute and all-correct) and understanding (exact match per
    question type) on the first `n` scenes of a Shapes split. `jacobi_window` samples the images with
    speculative Jacobi decoding, `compile` through torch.compile (see `generate_image`)."""
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    settings = {**GENERATION_SETTINGS, **({"jacobi_window": jacobi_window} if jacobi_window else {}),
                **({"compile": True} if compile else {})}  # fmt: skip
    images = generate_for_captions(model, dataset["caption"], batch_size, seed, progress_bar, **settings)
    generation = score_images(images, dataset["objects"])
    questions = to_understanding(dataset)
    asked = [messages[0]["content"][1]["text"] for messages in questions["messages"]]
    predictions = answer_questions(model, [imgs[0] for imgs in questions["images"]], asked, batch_size,
                                   progress_bar=progress_bar)  # fmt: skip
    understanding = score_answers(predictions, questions["answer"], questions["type"])
    return {
        "generation": {k: round(v, 4) for k, v in generation.items()},
        "understanding": {k: round(v, 4) for k, v in understanding.items()},
        "num_scenes": len(dataset),
        "num_questions": len(questions),
        "settings": settings,
    }


def eval_results_for_card(metrics: dict) -> list[dict]:
    """`{split: evaluate_shapes(...)}` -> model-index entries for the model card."""
    results = []
    for split, values in metrics.items():
        for task_type, key, name in (("text-to-image", "generation", "all attributes correct"),
                                     ("visual-question-answering", "understanding", "exact match")):  # fmt: skip
            results.append({
                "task_type": task_type, "dataset_type": "unifork_hf.data.shapes", "dataset_name": "Shapes",
                "dataset_split": split, "metric_type": "accuracy", "metric_name": f"{name} ({split})",
                "metric_value": values[key]["all"],
            })  # fmt: skip
    return results
