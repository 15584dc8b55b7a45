"""Train a UniFork on your own images, end to end, with library calls only.

The images stand in for a folder of your own labelled pictures: scikit-learn's handwritten digits (1,797
8x8 greyscale scans that ship inside the scikit-learn package, so nothing is downloaded).

    pip install -e ".[train,eval]" scikit-learn
    python examples/own_data/train_digits.py --out runs/digits          # the full run (README: numbers, time)
    python examples/own_data/train_digits.py --out /tmp/digits --ci     # seconds: the test's configuration

1. The data as `datasets`: an 80/20 split stratified by digit, images drawn at 16x16 px; captions for
   generation ("a handwritten 7", ...) and two questions per image for understanding ("Which digit is
   this?" -> "7", "Is the digit even or odd?" -> "odd").
2. The image tokenizer: `train_vq_tokenizer` on the training images (4x4-px tiles: 16 codes per image).
3. The text tokenizer: `build_text_tokenizer` on the captions, questions and answers.
4. The model: a small random Qwen2 forked into a Y by `from_pretrained_llm`, which reads the image size and
   tiles from the VQ.
5. Training: `UniForkTrainer` with one eval set per task; the best checkpoint by the combined eval loss
   (`load_best_model_at_end`) and early stopping. On a set this small the model soon starts to memorise
   its training images: the generation eval loss turns up while the training loss keeps falling.
6. Evaluation on the test split: answers (exact match, beside chance and the majority answer); generated
   images read by an independent classifier (logistic regression on the 8x8 scans; its own test accuracy
   is the ceiling); a copy report (each generated image's distance to its nearest training image, against
   the test images' own).

Writes OUT/metrics.json and OUT/samples.png, and the trained model (with its processor) to OUT.
"""

import argparse
import json
import os
import random
import time

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from transformers import EarlyStoppingCallback, Qwen2Config, Qwen2ForCausalLM

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.evaluation import answer_questions, copy_report
from unifork_hf.evaluation.benchmark import image_grid
from unifork_hf.training import (
    UniForkTrainer,
    UniForkTrainingArguments,
    build_text_tokenizer,
    mix_tasks,
    prepare_generation,
    prepare_understanding,
    pretokenize_images,
    train_vq_tokenizer,
)

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = ["a handwritten {d}", "the digit {d}", "a {d}", "draw a {name}", "the number {name}"]
QUESTIONS = {"digit": "Which digit is this?", "parity": "Is the digit even or odd?"}
SIZES = {  # the full run; --ci: a configuration that runs in seconds
    "full": dict(vq_steps=1500, codebook=256, hidden=128, layers=4, steps=3000, eval_every=200, samples=10),
    "ci": dict(vq_steps=20, codebook=32, hidden=32, layers=2, steps=8, eval_every=4, samples=1),
}


def to_image(scan: np.ndarray) -> Image.Image:
    """An 8x8 scan (0 = paper, 16 = ink) -> a 16x16 RGB picture, dark ink on white."""
    return Image.fromarray((255 - scan * 255 / 16).astype(np.uint8)).resize((16, 16), Image.NEAREST).convert("RGB")


def to_scan(image: Image.Image) -> np.ndarray:
    """The inverse, for the classifier: a picture -> 8x8 ink values in 0..16."""
    grey = np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=np.float32)
    return (255 - grey) * 16 / 255


def digits_data(seed: int, limit: int | None = None):
    """Train/test `datasets` of images with their digit, captions and questions (the user's part)."""
    digits = load_digits()
    scans, labels = digits.images, digits.target
    if limit:
        scans, labels = scans[:limit], labels[:limit]
    split = train_test_split(scans, labels, test_size=0.2, stratify=labels, random_state=seed)
    rng = random.Random(seed)
    data = {}
    for name, (part_scans, part_labels) in {"train": split[::2], "test": split[1::2]}.items():
        images = [to_image(scan) for scan in part_scans]
        labels = [int(label) for label in part_labels]
        captions = [rng.choice(CAPTIONS).format(d=d, name=NAMES[d]) for d in labels]
        data[name] = {"images": images, "labels": labels, "captions": captions, "scans": part_scans}
    return data


def understanding_rows(images, labels) -> Dataset:
    rows = {"images": [], "messages": []}
    for image, label in zip(images, labels):
        for kind, question in QUESTIONS.items():
            answer = str(label) if kind == "digit" else ("even" if label % 2 == 0 else "odd")
            rows["images"].append([image])
            rows["messages"].append(
                [
                    {"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ]
            )
    return Dataset.from_dict(rows)


def build_model(data, size, args):
    texts = data["train"]["captions"] + list(QUESTIONS.values()) + [str(d) for d in range(10)] + ["even", "odd"]
    texts += [caption.format(d=d, name=NAMES[d]) for caption in CAPTIONS for d in range(10)]
    tokenizer = build_text_tokenizer(texts)
    vq, vq_metrics = train_vq_tokenizer(
        data["train"]["images"],
        tile_size=4,
        codebook_size=size["codebook"],
        max_steps=size["vq_steps"],
        eval_images=data["test"]["images"],
        seed=args.seed,
        progress=not args.ci,
    )
    torch.manual_seed(args.seed)
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=size["hidden"],
            intermediate_size=3 * size["hidden"],
            num_hidden_layers=size["layers"],
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        )
    )
    model = UniForkForConditionalGeneration.from_pretrained_llm(llm, vq, tokenizer=tokenizer)
    return model, vq_metrics


def train(model, data, size, args):
    processor = model.processor
    und = {
        name: prepare_understanding(understanding_rows(d["images"], d["labels"]), processor) for name, d in data.items()
    }
    gen = {
        name: prepare_generation(Dataset.from_dict({"image": d["images"], "caption": d["captions"]}), processor)
        for name, d in data.items()
    }
    und, gen = ({k: pretokenize_images(v, processor) for k, v in part.items()} for part in (und, gen))
    arguments = UniForkTrainingArguments(
        output_dir=os.path.join(args.out, "checkpoints"),
        max_steps=size["steps"],
        per_device_train_batch_size=64,
        per_device_eval_batch_size=128,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=min(100, size["steps"] // 10),
        weight_decay=0.01,
        logging_steps=max(size["eval_every"] // 2, 1),
        eval_strategy="steps",
        eval_steps=size["eval_every"],
        save_steps=size["eval_every"],
        save_total_limit=2,
        load_best_model_at_end=True,  # by eval_loss: both tasks' eval losses, weighted as in training
        use_cpu=True,
        report_to=[],
        seed=args.seed,
        disable_tqdm=args.ci,
    )
    trainer = UniForkTrainer(
        model=model,
        args=arguments,
        train_dataset=mix_tasks(und["train"], gen["train"], 0.5, seed=args.seed),
        eval_dataset={"understanding": und["test"], "generation": gen["test"]},
        processing_class=processor,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=3)],
    )
    trainer.train()
    return trainer


def evaluate(model, data, size, seed: int) -> dict:
    test, train_part = data["test"], data["train"]
    # understanding: exact match per question, beside chance and the majority answer of the test split
    questions = {kind: [q] * len(test["images"]) for kind, q in QUESTIONS.items()}
    truth = {
        "digit": [str(d) for d in test["labels"]],
        "parity": ["even" if d % 2 == 0 else "odd" for d in test["labels"]],
    }
    understanding = {}
    for kind in QUESTIONS:
        replies = answer_questions(model, test["images"], questions[kind], progress_bar=False)
        majority = max(set(truth[kind]), key=truth[kind].count)
        understanding[kind] = {
            "accuracy": float(np.mean([r == t for r, t in zip(replies, truth[kind])])),
            "majority": truth[kind].count(majority) / len(truth[kind]),
            "chance": 1 / len(set(truth[kind])),
        }
    # generation: `samples` images per digit, read by a classifier trained on the 8x8 scans
    classifier = LogisticRegression(max_iter=5000).fit(
        train_part["scans"].reshape(len(train_part["scans"]), -1), train_part["labels"]
    )
    ceiling = classifier.score(test["scans"].reshape(len(test["scans"]), -1), test["labels"])
    prompts = [f"a handwritten {d}" for d in range(10) for _ in range(size["samples"])]
    wanted = [d for d in range(10) for _ in range(size["samples"])]
    generators = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(len(prompts))]
    images = model.generate_image(prompts, generator=generators)
    read = classifier.predict(np.stack([to_scan(image).reshape(-1) for image in images]))
    copies = copy_report(images, train_part["images"], test["images"], warn=True)
    generation = {
        "classifier_accuracy": float(np.mean(read == np.array(wanted))),
        "classifier_ceiling": ceiling,
        "chance": 0.1,
        "copies": {k: v for k, v in copies.items() if k != "copies"},
        "settings": model.image_generation_settings(),
    }
    return {"understanding": understanding, "generation": generation}, images, wanted


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ci", action="store_true", help="a configuration that runs in seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = SIZES["ci" if args.ci else "full"]
    start = time.time()
    data = digits_data(args.seed, limit=200 if args.ci else None)
    model, vq_metrics = build_model(data, size, args)
    vq_seconds = time.time() - start
    trainer = train(model, data, size, args)
    train_seconds = time.time() - start - vq_seconds
    model.eval()
    metrics, images, wanted = evaluate(model, data, size, args.seed)
    trainer.save_model(args.out)
    rows = [f"a handwritten {d}" for d in range(10)]  # one row per prompt
    image_grid(images, rows, columns=size["samples"], cell=64).save(os.path.join(args.out, "samples.png"))
    metrics.update(
        vq=vq_metrics,
        best_checkpoint=trainer.state.best_model_checkpoint,
        best_eval_loss=trainer.state.best_metric,
        steps_trained=trainer.state.global_step,
        eval_history=[
            log for log in trainer.state.log_history if any(k.startswith("eval_") and k.endswith("loss") for k in log)
        ],
        minutes={
            "vq": round(vq_seconds / 60, 1),
            "unifork": round(train_seconds / 60, 1),
            "total": round((time.time() - start) / 60, 1),
        },
        command="python examples/own_data/train_digits.py --out " + args.out + (" --ci" if args.ci else ""),
    )
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    summary = {k: metrics[k] for k in ("understanding", "generation", "steps_trained", "best_eval_loss", "minutes")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
