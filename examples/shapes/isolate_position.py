"""Isolation experiment for position questions ("Where is the red circle?"): train the demo-size model on
understanding rows only, optionally on the rows that ask a position question only, and report exact match
on the test split's position (and colour) questions, overall and on two-shape scenes (where the answer
depends on the shape the question names).

    python examples/shapes/isolate_position.py --only-position --out runs/exp/I1-position-only
    python examples/shapes/isolate_position.py --only-position --data-cache runs/shapes/data-cache-qfirst \
        --out runs/exp/I2-position-only-qfirst

`--data-cache` is a cache written by train_unifork.py (`--data-cache DIR`, with `--ask-every-position` or
`--no-question-first` as wanted): its `understanding` rows are used as they are, and the test questions are
asked the way its rows ask (its key.json). Ends with one RESULT line.
"""

import argparse
import json
import os
import time

import torch
from datasets import load_from_disk
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import shapes_dataset, to_understanding
from unifork_hf.evaluation.answers import answer_questions
from unifork_hf.training import UniForkTrainer, UniForkTrainingArguments


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vq", default="runs/shapes/vq")
    parser.add_argument("--tokenizer", default="runs/shapes/tokenizer")
    parser.add_argument("--data-cache", default="runs/shapes/data-cache-every")
    parser.add_argument("--only-position", action="store_true", help="train on the rows with a position question only")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("-n", type=int, default=300, help="test scenes")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden_size,
            intermediate_size=3 * args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model = UniForkForConditionalGeneration.from_pretrained_llm(
        llm, args.vq, tokenizer=tokenizer, image_size=32, vq_tile_size=4
    )
    rows = load_from_disk(os.path.join(args.data_cache, "understanding"))
    # caches written before question-first became the default have no such key: they put the image first
    question_first = json.load(open(os.path.join(args.data_cache, "key.json"))).get("question_first", False)
    if args.only_position:
        where = tokenizer.convert_tokens_to_ids("Where")
        rows = rows.filter(lambda row: where in row["input_ids"])
    print(f"{len(rows)} training rows", flush=True)
    training_args = UniForkTrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=64,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=100,
        weight_decay=0.01,
        logging_steps=100,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    start = time.time()
    UniForkTrainer(model=model, args=training_args, train_dataset=rows, processing_class=model.processor).train()
    print(f"trained in {time.time() - start:.0f} s", flush=True)

    model.eval()
    scenes = shapes_dataset(num_train=0, num_test=args.n, num_heldout=0, seed=0)["test"]
    questions = to_understanding(scenes)
    result = {}
    for kind in ("position", "colour"):
        picked = [i for i, t in enumerate(questions["type"]) if t == kind]
        replies = answer_questions(
            model,
            [scenes[i // 5]["image"] for i in picked],
            [questions[i]["question"] for i in picked],
            progress_bar=False,
            question_first=question_first,
        )
        right = [reply == questions[i]["answer"] for reply, i in zip(replies, picked)]
        two = [len(scenes[i // 5]["objects"]) == 2 for i in picked]
        result[kind] = {
            "all": round(sum(right) / len(right), 3),
            "two_shape": round(sum(r for r, t in zip(right, two) if t) / sum(two), 3),
        }
    print(
        "RESULT "
        + " ".join(f"{kind}_{part}={value}" for kind, parts in result.items() for part, value in parts.items())
    )
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"metrics": result, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
