"""Training throughput: `UniForkTrainer` against transformers' `Trainer` on the equivalent plain language model.

    python benchmarks/bench_trainer_vs_lm.py [--size small] [--steps 12] [--warmup 3] [--batch 16] [--repeats 2]

Three runs of `max_steps` optimizer steps through the two trainers, on the same rows in the same order:

  plain   transformers' `Trainer` on a `LlamaForCausalLM` with the UniFork's decoder geometry (hidden size,
          layers, heads, MLP) and one vocabulary of text tokens + image codes: an image is its 64 code tokens
          in the sequence, as in a Chameleon-style LM. Labels on the same positions as UniFork's.
  shared  `UniForkTrainer` on UniFork with K = L (one stack: the equivalent of `plain`) on the package's own
          pipeline: `colour_dataset` -> `prepare_understanding` / `prepare_generation` -> `mix_tasks`
          (70% generation rows, as the Shapes recipe) -> `pretokenize_images` -> `UniForkDataCollator`.
  y       the same at K = L/2, the Y: L/2 more decoder layers (the second branch) to update.

Both trainers: fused AdamW (the `TrainingArguments` default), the same learning rate and seed, random batches
(`train_sampling_strategy="random"`: the same order as `Trainer`'s sampler, so every step sees the same tokens),
no CFG dropout (it would shorten some prompts), no evaluation, logging or saving, collation in the main process.
A step's time is taken from `on_step_begin` to `on_step_end` (data loading, forward, backward, optimizer);
the median over the steps after `--warmup`, and the best of `--repeats` runs of each (alternating). Tokens per
second count the non-padding tokens of a step's batch. Sizes: "small" (hidden 256, 8 layers, MLP 1024) and
"medium" (hidden 512, 8 layers, MLP 2048), Llama decoder layers, unifork-tiny's VQ (64 codes per image).

Ends with `RESULT trainer_vs_plain_lm=<shared tokens/s / plain tokens/s> y_vs_shared=<y step / shared step> ...`.
"""

import argparse
import statistics
import tempfile
import time

import torch
from bench_generate_image import build
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from unifork_hf.data.colours import colour_dataset
from unifork_hf.training import (
    UniForkDataCollator,
    UniForkTrainer,
    UniForkTrainingArguments,
    mix_tasks,
    prepare_generation,
    prepare_understanding,
    pretokenize_images,
)

TEXT = {"model_type": "llama", "vocab_size": 512, "max_position_embeddings": 512, "tie_word_embeddings": False}
SIZES = {
    "small": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 4},
    "medium": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8},
}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def unifork_rows(model, num_rows):
    parts = colour_dataset(num_rows, seed=0)
    processor = model.processor
    rows = mix_tasks(
        prepare_understanding(parts["understanding"], processor),
        prepare_generation(parts["generation"], processor),
        generation_ratio=0.7,
    )
    return pretokenize_images(rows, processor)


def lm_rows(rows, image_token_id, text_vocab):
    """The same rows for a plain LM: each image placeholder becomes its code (offset past the text vocabulary);
    labels stay on the same positions (an understanding reply's tokens, a generated image's codes)."""

    def convert(row):
        codes = iter(code for image in row["image_ids"] for code in image)
        input_ids = [text_vocab + next(codes) if t == image_token_id else t for t in row["input_ids"]]
        labels = [input_id if label == image_token_id else label for input_id, label in zip(input_ids, row["labels"])]
        return {"input_ids": input_ids, "labels": labels}

    return Dataset.from_list([convert(row) for row in rows])


def pad_collator(pad_id):
    def collate(rows):
        length = max(len(r["input_ids"]) for r in rows)
        return {
            "input_ids": torch.tensor([r["input_ids"] + [pad_id] * (length - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (length - len(r["labels"])) for r in rows]),
        }  # fmt: skip

    return collate


def train(kind, model, rows, collator, args, out):
    common = dict(
        output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-3,
        lr_scheduler_type="constant", save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    timer = StepTimer()
    if kind == "plain":
        trainer = Trainer(
            model=model, args=TrainingArguments(**common), train_dataset=rows, data_collator=collator, callbacks=[timer]
        )
    else:
        training_args = UniForkTrainingArguments(
            **common, freeze="none", cfg_dropout=0.0, train_sampling_strategy="random"
        )
        trainer = UniForkTrainer(
            model=model, args=training_args, train_dataset=rows, data_collator=collator, callbacks=[timer]
        )
    tokens = []
    loader = trainer.get_train_dataloader()
    for batch in loader:  # the batches the run will see, in its order (same sampler seed)
        tokens.append(int(batch["attention_mask"].sum()))
        if len(tokens) == args.steps:
            break
    trainer.train()
    kept = range(args.warmup, args.steps)
    return statistics.median(timer.times[i] for i in kept), statistics.mean(tokens[i] for i in kept), tokens


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    text = {**TEXT, **SIZES[args.size], "num_key_value_heads": SIZES[args.size]["num_attention_heads"]}
    layers = text["num_hidden_layers"]
    models = {
        "shared": lambda: build("x", {"x": {"text_config": text, "num_shared_layers": layers}}).train(),
        "y": lambda: build("x", {"x": {"text_config": text, "num_shared_layers": layers // 2}}).train(),
    }
    probe = models["shared"]()
    config = probe.config
    rows = unifork_rows(probe, args.batch * args.steps)
    plain_rows = lm_rows(rows, config.image_token_id, config.text_config.vocab_size)
    vocab = config.text_config.vocab_size + config.codebook_size
    pad_id = probe.processor.tokenizer.pad_token_id
    models["plain"] = lambda: LlamaForCausalLM(
        LlamaConfig(**{**text, "vocab_size": vocab, "pad_token_id": pad_id})
    ).train()
    collators = {"plain": pad_collator(pad_id)}
    collators["shared"] = collators["y"] = UniForkDataCollator(probe.processor, cfg_dropout=0.0)

    best, tokens, params = {}, {}, {}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            for kind in ("plain", "shared", "y"):
                torch.manual_seed(0)
                model = models[kind]()
                params[kind] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                step, mean_tokens, seen = train(
                    kind, model, plain_rows if kind == "plain" else rows, collators[kind], args, out
                )
                best[kind] = min(best.get(kind, float("inf")), step)
                tokens[kind] = (mean_tokens, seen)
    assert tokens["plain"][1] == tokens["shared"][1] == tokens["y"][1], "the runs must see the same tokens"
    throughput = {kind: tokens[kind][0] / best[kind] for kind in best}
    print(
        f"size {args.size}: Llama layers hidden {text['hidden_size']} x {layers}, batch {args.batch}, "
        f"{tokens['plain'][0]:.0f} tokens a step (mean), {torch.get_num_threads()} threads"
    )
    for kind in ("plain", "shared", "y"):
        print(
            f"  {kind:6s} {params[kind] / 1e6:6.2f}M trained params: step {best[kind] * 1e3:7.1f} ms, "
            f"{throughput[kind]:8.0f} tokens/s"
        )
    print(
        f"RESULT trainer_vs_plain_lm={throughput['shared'] / throughput['plain']:.3f} "
        f"y_vs_shared={best['y'] / best['shared']:.3f} plain_tok_s={throughput['plain']:.0f} "
        f"shared_tok_s={throughput['shared']:.0f} y_tok_s={throughput['y']:.0f}"
    )


if __name__ == "__main__":
    main()
