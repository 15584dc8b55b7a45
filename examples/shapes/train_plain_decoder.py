"""Baseline for the Shapes demo: a plain Qwen2 causal LM with the dims of the UniFork generation path
(hidden 128, 4 layers), trained on the generation rows only, with the VQ codes as extra vocabulary
(token `len(tokenizer) + code`, tied embeddings). Same optimiser, schedule and data as
`train_unifork.py`, so its `loss` (per image token) compares with UniFork's `loss_generation`.

    python examples/shapes/train_plain_decoder.py --vq runs/shapes/vq --tokenizer runs/shapes/tokenizer \
        --out runs/shapes/plain [--max-steps 6800]

Saves the LM, the UniFork processor it was fed with, and `image_token_offset.json`, so that
`unifork_hf.evaluation.alignment.modality_alignment(lm, ..., processor=..., image_token_offset=...)` can compare it.
"""

import argparse
import json
import os
import time

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import shapes_dataset, to_generation
from unifork_hf.training import prepare_generation, pretokenize_images


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vq", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=6800)
    parser.add_argument("--num-train", type=int, default=25000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vq-tile-size", type=int, default=4, help="the tile the VQ was trained on (train_vq.py)")
    args = parser.parse_args()
    start = time.time()

    torch.manual_seed(args.seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    dims = dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # The UniFork builder only to get the same processor (special tokens, prompt template, VQ) as the demo.
    processor = UniForkForConditionalGeneration.from_pretrained_llm(
        Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), **dims)),
        args.vq,
        tokenizer=tokenizer,
        image_size=32,
        vq_tile_size=args.vq_tile_size,
    ).processor
    offset = len(processor.tokenizer)
    codebook_size = processor.image_tokenizer.codebook_size

    data = shapes_dataset(num_train=args.num_train, num_test=500, num_heldout=500, seed=0)
    rows = pretokenize_images(prepare_generation(to_generation(data["train"]), processor), processor)

    def codes_as_tokens(row):
        codes = iter(row["image_ids"][0])
        ids = [offset + next(codes) if t == processor.image_token_id else t for t in row["input_ids"]]
        return {"input_ids": ids, "labels": [t if label != -100 else -100 for t, label in zip(ids, row["labels"])]}

    train = rows.map(codes_as_tokens, remove_columns=rows.column_names)
    print(f"data ready in {time.time() - start:.0f} s: {len(train)} rows")

    def collate(batch):
        width = max(len(row["input_ids"]) for row in batch)
        pad = lambda key, value: torch.tensor([row[key] + [value] * (width - len(row[key])) for row in batch])  # noqa: E731
        lengths = torch.tensor([len(row["input_ids"]) for row in batch])
        return {
            "input_ids": pad("input_ids", tokenizer.pad_token_id),
            "labels": pad("labels", -100),
            "attention_mask": (torch.arange(width)[None] < lengths[:, None]).long(),
        }

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=offset + codebook_size, **dims))
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=64,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=200,
        weight_decay=0.01,
        logging_steps=100,
        save_strategy="no",
        seed=args.seed,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collate)
    trainer.train()
    trainer.save_model()
    processor.save_pretrained(args.out)
    with open(os.path.join(args.out, "image_token_offset.json"), "w") as f:
        json.dump(
            {
                "image_token_offset": offset,
                "num_parameters": model.num_parameters(),
                "train_minutes": round((time.time() - start) / 60, 1),
                "args": vars(args),
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
