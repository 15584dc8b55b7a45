"""Train the Shapes demo UniFork: a small random Qwen2 forked at K = L/2, both tasks mixed, UniForkTrainer.

    python examples/shapes/train_unifork.py --vq runs/shapes/vq --tokenizer runs/shapes/tokenizer \
        --out runs/shapes/unifork [--max-steps 6000] [--seed 0]

The training arguments are the library's defaults (UniForkTrainingArguments: task-stratified batches,
the understanding share of the loss) unless a flag says otherwise. The checkpoint's image sampling
settings (`generation_config.image_generation`) are written from `--guidance-scale`, `--temperature`,
`--top-k`. Ends by evaluating on the test, held-out and paraphrase splits with the Shapes judge and
writing the metrics into the model card.
"""

import argparse
import hashlib
import json
import os
import time

import torch
from datasets import load_from_disk
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import JITTER, shapes_dataset, to_generation, to_understanding
from unifork_hf.evaluation.benchmark import eval_results_for_card, evaluate_shapes
from unifork_hf.training import (
    UniForkTrainer,
    UniForkTrainingArguments,
    mix_tasks,
    prepare_generation,
    prepare_understanding,
    pretokenize_images,
)


def folder_digest(path: str) -> str:
    """sha256 over a folder's file names and contents: the cache key of a VQ or tokenizer, so that one
    retrained in place (same path, new weights) is not served rows encoded by its predecessor."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):  # (sorted by folder: the walk's own order is the file system's)
        for name in sorted(files):
            digest.update(os.path.relpath(os.path.join(root, name), path).encode())
            with open(os.path.join(root, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def encoded_training_rows(scenes, processor, args):
    """Both tasks' training rows, tokenized and VQ-encoded (minutes of work); with `--data-cache`
    saved there once and loaded by later runs whose data, VQ and tokenizer (by content) are the same."""
    key = {
        name: getattr(args, name)
        for name in (
            "vq",
            "tokenizer",
            "num_train",
            "data_seed",
            "vq_tile_size",
            "jitter",
            "question_first",
            "ask_every_position",
        )
    }
    key["vq"], key["tokenizer"] = folder_digest(args.vq), folder_digest(args.tokenizer)
    if args.data_cache and os.path.exists(os.path.join(args.data_cache, "key.json")):
        cached = json.load(open(os.path.join(args.data_cache, "key.json")))
        if cached != key:
            raise SystemExit(
                f"--data-cache {args.data_cache} holds rows made with {cached}, not {key} (VQ and tokenizer by "
                "content digest); give another folder or delete this one."
            )
        return [load_from_disk(os.path.join(args.data_cache, task)) for task in ("understanding", "generation")]
    # VQ-encode each part before mixing: the mix cycles the smaller part, so it holds many more rows.
    # Questions as multi-turn rows (about two per scene): the image tokens are paid for once per row.
    conversations = to_understanding(
        scenes,
        conversation=True,
        seed=args.data_seed,
        ask_every_position=args.ask_every_position,
        question_first=args.question_first,
    )
    understanding = pretokenize_images(prepare_understanding(conversations, processor), processor)
    generation = pretokenize_images(prepare_generation(to_generation(scenes), processor), processor)
    if args.data_cache:
        understanding.save_to_disk(os.path.join(args.data_cache, "understanding"))
        generation.save_to_disk(os.path.join(args.data_cache, "generation"))
        with open(os.path.join(args.data_cache, "key.json"), "w") as f:  # written last: marks a complete cache
            json.dump(key, f)
    return understanding, generation


class LearningCurve(TrainerCallback):
    """Judges a few test scenes every `every` steps: how each question type and attribute is learned."""

    def __init__(self, model, scenes, every, path, question_first=True):
        self.model, self.scenes, self.every, self.path = model, scenes, every, path
        self.question_first = question_first

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        self.model.eval()
        metrics = evaluate_shapes(self.model, self.scenes, progress_bar=False, question_first=self.question_first)
        self.model.train()
        with open(self.path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": state.global_step,
                        "generation": metrics["generation"],
                        "understanding": metrics["understanding"],
                    }
                )
                + "\n"
            )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--vq", required=True, help="the image tokenizer: train_vq.py's VQModel or train_rq.py's RQ tokenizer"
    )
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--generation-ratio", type=float, default=0.7)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="also judge 100 test scenes every this many steps (learning_curve.jsonl)",
    )
    parser.add_argument("--num-train", type=int, default=25000, help="training scenes (5 questions each)")
    parser.add_argument("--num-shared-layers", type=int, default=None, help="K, the fork point (default L/2)")
    parser.add_argument(
        "--learn-code-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="trainable image-code input table (see UniForkConfig.learn_image_code_embeddings)",
    )
    parser.add_argument(
        "--learn-position-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="trainable image-position input table (UniForkConfig.learn_image_position_embeddings)",
    )
    parser.add_argument("--vq-tile-size", type=int, default=4, help="the tile the VQ was trained on (train_vq.py)")
    parser.add_argument(
        "--sampler",
        choices=["task_stratified", "random", "group_by_length"],
        default=None,
        help="train_sampling_strategy (default: UniForkTrainingArguments')",
    )
    parser.add_argument(
        "--understanding-loss-share",
        default=None,
        help="a number in (0, 1), or 'tokens' for one token mean (default: UniForkTrainingArguments')",
    )
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="the checkpoint's image sampling default")
    parser.add_argument("--temperature", type=float, default=0.1, help="the checkpoint's image sampling default")
    parser.add_argument("--top-k", type=int, default=None, help="the checkpoint's image sampling default")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    parser.add_argument("--data-seed", type=int, default=0, help="the Shapes scenes")
    parser.add_argument("--jitter", type=int, default=JITTER, help="pixels a shape may move in its cell")
    parser.add_argument(
        "--ask-every-position",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also ask where the other shape of a two-shape training scene is (to_understanding)",
    )
    parser.add_argument(
        "--question-first",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each row's first question before its image (to_understanding); --no-question-first: "
        "the image first, as the demo was trained before 2026-12-02",
    )
    parser.add_argument(
        "--data-cache",
        default=None,
        help="keep the VQ-encoded training rows here and reuse them in runs with the same data",
    )
    parser.add_argument("--torch-compile", action="store_true", help="train through torch.compile (TrainingArguments)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where to train and evaluate (evaluation samples each image from its own seeded CPU generator either way)",
    )
    parser.add_argument(
        "--depth-loss-weights",
        type=float,
        nargs="+",
        default=None,
        help="RQ tokenizer only: the generation loss's weight of each depth code (image_depth_loss_weights); "
        "default: the first code three quarters of a position's loss ([9, 1, 1, 1] at depth 4), as the plain "
        "mean (`1 1 1 1`, the official loss) drew 1.0%% of Shapes test captions right against 81.6%% (README)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    start = time.time()

    torch.manual_seed(args.seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden_size,
            intermediate_size=3 * args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    with open(os.path.join(args.vq, "config.json")) as f:
        rq_config = json.load(f).get("rq_config")  # train_rq.py's tokenizer: no tiles, no per-code input table
    residual = rq_config is not None
    if args.depth_loss_weights and not residual:
        parser.error(f"--depth-loss-weights is for an RQ tokenizer; {args.vq} is a VQModel.")
    if residual and args.depth_loss_weights is None and rq_config["depth"] > 1:
        args.depth_loss_weights = [3.0 * (rq_config["depth"] - 1)] + [1.0] * (rq_config["depth"] - 1)
    model = UniForkForConditionalGeneration.from_pretrained_llm(
        llm,
        args.vq,
        tokenizer=tokenizer,
        num_shared_layers=args.num_shared_layers,
        learn_image_code_embeddings=args.learn_code_embeddings and not residual,
        learn_image_position_embeddings=args.learn_position_embeddings,
        image_size=32,
        vq_tile_size=None if residual else args.vq_tile_size,
        image_depth_loss_weights=args.depth_loss_weights,
    )
    model.card_data.update(
        datasets=[f"unifork_hf.data.shapes (procedural, seed {args.data_seed})"], license="apache-2.0"
    )
    processor = model.processor

    data = shapes_dataset(
        num_train=args.num_train, num_test=500, num_heldout=500, seed=args.data_seed, jitter=args.jitter
    )
    understanding, generation = encoded_training_rows(data["train"], processor, args)
    train = mix_tasks(understanding, generation, args.generation_ratio, seed=args.seed)
    if args.sampler == "group_by_length":
        train = train.add_column("length", [len(ids) for ids in train["input_ids"]])
    print(f"data ready in {time.time() - start:.0f} s: {len(train)} rows")
    # the checkpoint says how to sample it: no guidance suits this small model (benchmarks/sweep_sampling_shapes.py)
    model.generation_config.image_generation = model.image_generation_settings(
        guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k
    )

    overrides = {}
    if args.sampler:
        overrides["train_sampling_strategy"] = args.sampler
    if args.understanding_loss_share:
        share = args.understanding_loss_share
        overrides["understanding_loss_share"] = None if share == "tokens" else float(share)
    training_args = UniForkTrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=200,
        weight_decay=0.01,
        logging_steps=100,
        save_steps=250,  # a session cut loses at most 250 steps of a sweep run
        save_total_limit=1,
        seed=args.seed,
        use_cpu=args.device == "cpu",
        report_to=[],
        torch_compile=args.torch_compile,
        **overrides,
    )
    trainer = UniForkTrainer(model=model, args=training_args, train_dataset=train, processing_class=processor)
    if args.eval_every:
        trainer.add_callback(
            LearningCurve(
                model,
                data["test"].select(range(100)),
                args.eval_every,
                os.path.join(args.out, "learning_curve.jsonl"),
                args.question_first,
            )
        )
    trainer.train(
        resume_from_checkpoint=any(n.startswith("checkpoint-") for n in os.listdir(args.out))
        if os.path.isdir(args.out)
        else None
    )
    train_minutes = (time.time() - start) / 60

    model.eval()
    metrics = {
        split: evaluate_shapes(
            model, data[split], n=args.eval_n, understanding=split != "paraphrase", question_first=args.question_first
        )
        for split in ("test", "heldout", "paraphrase")
    }  # (paraphrase: test's scenes, other captions)
    model.card_data["eval_results"] = eval_results_for_card(metrics)
    trainer.create_model_card()
    trainer.save_model()
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        # the last logged training losses, per task
        losses = {
            key: next((log[key] for log in reversed(trainer.state.log_history) if key in log), None)
            for key in ("loss", "loss_understanding", "loss_generation")
        }
        curve = [
            {key: log[key] for key in ("step", "loss", "loss_understanding", "loss_generation") if key in log}
            for log in trainer.state.log_history
            if "loss" in log
        ]
        json.dump(
            {
                "metrics": metrics,
                "final_losses": losses,
                "loss_curve": curve,
                "train_minutes": round(train_minutes, 1),
                "num_parameters": model.num_parameters(),
                "args": vars(args),
            },
            f,
            indent=2,
        )
    print(json.dumps(metrics, indent=2))
    print(f"total {(time.time() - start) / 60:.1f} min (training {train_minutes:.1f} min)")


if __name__ == "__main__":
    main()
