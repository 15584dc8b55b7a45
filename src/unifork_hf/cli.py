"""The `unifork` command line: build, generate-image, answer, demo.

unifork build --llm Qwen/Qwen2.5-0.5B --vq path/to/vq --out unifork-0.5b
unifork generate-image --model unifork-0.5b --prompt "a red circle" --prompt "two blue squares" --out grid.png
unifork answer --model unifork-0.5b --image photo.png --question "What colour is the circle?"
unifork train --recipe configs/tiny-colours.yaml
unifork evaluate --model DIR --split heldout -n 500 --json metrics.json
unifork analyze-alignment --model DIR --split test -n 500 -k 10 --out alignment.png
unifork demo --out demo_out
unifork serve --model DIR --port 7860
"""

import argparse
import os
import sys
import time


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _load(model_dir: str):
    from transformers import AutoModel

    import unifork_hf  # noqa: F401  (registers the Auto classes)

    # a path that does not exist would otherwise reach the Hub and fail on the repo id's spelling
    if not os.path.isdir(model_dir) and (
        os.path.isabs(model_dir) or model_dir.startswith((".", "~")) or model_dir.count("/") > 1
    ):
        raise OSError(f"--model {model_dir}: no such directory (a Hub model is named 'owner/name')")

    try:
        return AutoModel.from_pretrained(model_dir).eval()
    except OSError as error:
        if os.path.isdir(model_dir):
            raise
        from unifork_hf.modeling.configuration_unifork import missing_checkpoint_error

        raise missing_checkpoint_error(model_dir, error) from error


def cmd_build(args) -> None:
    from unifork_hf import UniForkForConditionalGeneration

    model = UniForkForConditionalGeneration.from_pretrained_llm(
        args.llm, args.vq, num_shared_layers=args.num_shared_layers
    )
    model.save_pretrained(args.out)
    config = model.config
    print(
        f"UniFork written to {args.out}: K={config.num_shared_layers} shared + 2 x {config.num_branch_layers} "
        f"branch layers, {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{config.image_size} px images as {config.image_grid_size}x{config.image_grid_size} codes"
    )


def cmd_convert(args) -> None:
    from unifork_hf.conversion.convert_official_unifork import run

    print(run(args))


def cmd_generate_image(args) -> None:
    import torch

    from unifork_hf.evaluation.benchmark import image_grid

    model = _load(args.model)
    images = model.generate_image(
        args.prompt,
        num_images_per_prompt=args.num_images_per_prompt,
        generator=[
            torch.Generator().manual_seed(args.seed + i) for i in range(len(args.prompt) * args.num_images_per_prompt)
        ],
        guidance_scale=args.guidance_scale,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        jacobi_window=args.jacobi_window,
        compile=args.compile,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    image_grid(images, args.prompt, columns=args.num_images_per_prompt).save(args.out)
    print(f"{len(images)} image(s) written to {args.out}")


def cmd_answer(args) -> None:
    from PIL import Image

    from unifork_hf.evaluation.answers import answer_questions

    model = _load(args.model)
    replies = answer_questions(
        model,
        [Image.open(args.image)],
        [args.question],
        max_new_tokens=args.max_new_tokens,
        progress_bar=False,
        question_first=not args.image_first,
    )
    print(replies[0])


def cmd_evaluate(args) -> None:
    import json

    if args.dataset:
        return _evaluate_own_dataset(args)
    if args.judge:
        raise SystemExit("error: --judge needs --dataset (the Shapes benchmark has its own judge).")
    from unifork_hf.data.shapes import shapes_dataset
    from unifork_hf.evaluation.benchmark import evaluate_shapes

    model = _load(args.model)
    split = shapes_dataset(num_train=0, num_test=500, num_heldout=500, seed=0)[args.split]
    metrics = evaluate_shapes(
        model,
        split,
        n=args.n,
        batch_size=args.batch_size,
        jacobi_window=args.jacobi_window,
        compile=args.compile,
        understanding=args.split != "paraphrase",
    )
    print(f"Shapes {args.split}, {metrics['num_scenes']} scenes, sampling {metrics['settings']}:")
    print("  generation      " + "  ".join(f"{k} {v:.3f}" for k, v in metrics["generation"].items() if v is not None))
    if "understanding" in metrics:
        print(f"  understanding ({metrics['num_questions']} questions, exact match):")
        for name, scores in (("model", metrics["understanding"]), *metrics["understanding_baselines"].items()):
            print(f"    {name:<9}" + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"written to {args.json}")


def _evaluate_own_dataset(args) -> None:
    import json

    from datasets import load_from_disk

    from unifork_hf.evaluation.datasets import evaluate_dataset, load_judge

    judge = load_judge(args.judge) if args.judge else None
    model = _load(args.model)
    metrics = evaluate_dataset(model, load_from_disk(args.dataset), judge=judge, n=args.n, batch_size=args.batch_size)
    print(json.dumps(metrics, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"written to {args.json}")


def cmd_analyze_alignment(args) -> None:
    from unifork_hf.evaluation.alignment import modality_alignment, plot_alignment

    model = _load(args.model)
    if args.dataset:
        from datasets import load_from_disk

        data = load_from_disk(args.dataset)
    else:
        from unifork_hf.data.shapes import shapes_dataset

        data = shapes_dataset(num_train=0, num_test=args.n, num_heldout=args.n, seed=0)[args.split]
    tasks = ["understanding", "generation"] if args.task == "both" else [args.task]
    tables = {
        task: modality_alignment(
            model, data, task=task, k=args.k, num_samples=min(args.n, len(data)), batch_size=args.batch_size
        )
        for task in tasks
    }
    print(f"Mutual {args.k}-NN image-caption alignment per layer (K = {model.config.num_shared_layers} shared):")
    print("layer  " + "  ".join(f"{task:>13}" for task in tasks))
    for layer in range(len(tables[tasks[0]])):
        print(f"{layer:5d}  " + "  ".join(f"{tables[task]['alignment'][layer]:13.3f}" for task in tasks))
    plot_alignment(
        {task: table for task, table in tables.items()},
        args.out,
        title=f"{os.path.basename(os.path.normpath(args.model))}: image-text alignment",
    )
    print(f"plot written to {args.out}")
    if args.csv:
        import pandas as pd

        pd.concat(tables.values()).to_csv(args.csv, index=False)
        print(f"table written to {args.csv}")


def cmd_demo(args) -> None:
    """The bundled Shapes checkpoint: draw what it is asked, answer what it is asked, and judge both."""
    from unifork_hf import DEMO_CHECKPOINT
    from unifork_hf.data.shapes import shapes_dataset, to_understanding
    from unifork_hf.evaluation import detect, score_answers, score_image, score_images
    from unifork_hf.evaluation.answers import answer_questions
    from unifork_hf.evaluation.benchmark import ANSWER_CHOICES, generate_for_captions, image_grid
    from unifork_hf.evaluation.shapes_judge import answer_baselines

    start = time.time()
    model = _load(DEMO_CHECKPOINT)
    test = shapes_dataset(num_train=0, num_test=500, num_heldout=0, seed=0)["test"]
    scenes = test.select(range(4))
    prompts = [c for c in scenes["caption"] for _ in range(4)]
    images = generate_for_captions(model, prompts, progress_bar=False)
    os.makedirs(args.out, exist_ok=True)
    grid = os.path.join(args.out, "generated.png")
    image_grid(images, list(scenes["caption"]), columns=4, cell=96).save(grid)
    asked = [objects for objects in scenes["asked"] for _ in range(4)]
    generation = score_images(images, asked)

    questions = to_understanding(test.select(range(4, 8)))
    asked = questions["question"]
    replies = answer_questions(model, [imgs[0] for imgs in questions["images"]], asked, progress_bar=False)
    understanding = score_answers(replies, questions["answer"], questions["type"])
    majority = answer_baselines(questions["answer"], questions["type"], ANSWER_CHOICES)["majority"]

    print(f"UniFork Shapes demo ({model.num_parameters() / 1e6:.2f}M parameters, {DEMO_CHECKPOINT})")
    print(f"\nText -> image: {len(images)} images of {len(scenes)} test captions -> {grid}")
    print(f"  sampling: {model.image_generation_settings()} (the checkpoint's generation_config)")
    for index, caption in enumerate(scenes["caption"]):
        per_image = [
            score_image(scenes["asked"][index], detect(image))["all"] for image in images[4 * index : 4 * index + 4]
        ]
        print(f"  {int(sum(per_image))}/4 judged fully correct  {caption}")
    print("  judged: " + ", ".join(f"{k} {v:.0%}" for k, v in generation.items() if v is not None))
    print(f"\nImage -> text: {len(asked)} questions about {len(questions) // 5} test images")
    for question, reply, answer in list(zip(asked, replies, questions["answer"]))[:5]:
        print(f"  {question:<40} -> {reply:<12} ({'right' if reply == answer else 'expected ' + answer})")
    print("  exact match: " + ", ".join(f"{k} {v:.0%}" for k, v in understanding.items()))
    print("  (always the most common answer: " + ", ".join(f"{k} {v:.0%}" for k, v in majority.items()) + ")")
    print(f"\nDone in {time.time() - start:.1f} s. Full benchmark: unifork evaluate --model {DEMO_CHECKPOINT}")


def cmd_serve(args) -> None:
    """The web demo (gradio): generate images, ask about an image."""
    from unifork_hf import DEMO_CHECKPOINT
    from unifork_hf.web_demo import build_demo, shapes_examples

    model = _load(args.model or DEMO_CHECKPOINT)
    prompts, pairs = shapes_examples() if args.model is None else ((), ())
    demo = build_demo(
        model,
        title="UniFork Shapes demo" if args.model is None else f"UniFork: {args.model}",
        question_first=not args.image_first,
        prompt_examples=prompts,
        question_examples=pairs,
    )
    demo.launch(server_name=args.host, server_port=args.port, share=False)


def cmd_train(args) -> None:
    from unifork_hf.training.recipes import run_recipe

    overrides = {"training": {}}
    if args.output_dir:
        overrides["training"]["output_dir"] = args.output_dir
    if args.max_steps:
        overrides["training"]["max_steps"] = args.max_steps
    if args.resume:  # a checkpoint folder, or "true": the output directory's last checkpoint
        overrides["training"]["resume_from_checkpoint"] = args.resume
    trainer = run_recipe(args.recipe, overrides)
    if not trainer.is_world_process_zero():
        return
    logs = [log for log in trainer.state.log_history if "loss" in log]
    for name in ("loss_understanding", "loss_generation"):
        values = [log[name] for log in logs if name in log]
        if values:
            print(f"{name}: {values[0]:.3f} (step {logs[0]['step']}) -> {values[-1]:.3f} (step {logs[-1]['step']})")
    print(f"model saved to {trainer.args.output_dir}")


def _add_decoding_flags(parser) -> None:
    parser.add_argument(
        "--jacobi-window",
        type=_positive_int,
        default=None,
        help="speculative Jacobi decoding: codes drafted and verified per forward (default: one code per forward)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile: faster steps after a one-time compilation (a minute or more)",
    )


def _add_model_commands(commands) -> None:
    build = commands.add_parser("build", help="fork a pretrained LLM + VQ tokenizer into a UniFork checkpoint")
    build.add_argument("--llm", required=True, help="path or Hub id of a decoder-only causal LM (with tokenizer)")
    build.add_argument(
        "--vq",
        required=True,
        help="path or Hub id of the image tokenizer: a diffusers VQModel or a UniForkRQImageTokenizer",
    )
    build.add_argument("--num-shared-layers", type=int, default=None, help="K, the fork point (default L/2)")
    build.add_argument("--out", required=True, help="output directory")
    build.set_defaults(run=cmd_build)

    generate = commands.add_parser("generate-image", help="text -> image(s), written as one PNG grid")
    generate.add_argument("--model", required=True)
    generate.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    generate.add_argument("--out", required=True, help="PNG file")
    generate.add_argument("--num-images-per-prompt", type=_positive_int, default=1)
    for flag, kind, what in (
        ("--guidance-scale", float, "CFG scale (1: off)"),
        ("--temperature", float, "> 0"),
        ("--top-k", int, "0: off"),
        ("--top-p", float, "1.0: off"),
    ):
        generate.add_argument(
            flag, type=kind, default=None, help=f"{what}; default: the checkpoint's generation_config.image_generation"
        )
    generate.add_argument("--seed", type=int, default=0)
    _add_decoding_flags(generate)
    generate.set_defaults(run=cmd_generate_image)

    answer_parser = commands.add_parser("answer", help="answer a question about an image")
    answer_parser.add_argument("--model", required=True)
    answer_parser.add_argument("--image", required=True)
    answer_parser.add_argument("--question", required=True)
    answer_parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    answer_parser.add_argument(
        "--image-first",
        action="store_true",
        help="show the image before the question (default: the question first, as the Shapes recipe trains); "
        "ask a model the way it was trained",
    )
    answer_parser.set_defaults(run=cmd_answer)

    serve = commands.add_parser("serve", help="a web demo of a checkpoint (gradio): text -> images, image -> answers")
    serve.add_argument("--model", default=None, help="checkpoint directory (default: the bundled Shapes checkpoint)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--image-first", action="store_true", help="ask with the image before the question")
    serve.set_defaults(run=cmd_serve)

    train = commands.add_parser("train", help="train as a YAML recipe says (model, data, training arguments)")
    train.add_argument("--recipe", required=True, help="YAML file, e.g. configs/tiny-colours.yaml")
    train.add_argument("--output-dir", default=None, help="override training.output_dir")
    train.add_argument("--max-steps", type=_positive_int, default=None, help="override training.max_steps")
    train.add_argument("--resume", default=None, help="checkpoint directory to resume from, or 'true' for the last")
    train.set_defaults(run=cmd_train)


def _add_conversion_commands(commands) -> None:
    from unifork_hf.conversion.convert_official_unifork import add_arguments

    convert = commands.add_parser(
        "convert", help="an official UniFork checkpoint (or VILA-U vision tower) -> a checkpoint of this package"
    )
    add_arguments(convert).set_defaults(run=cmd_convert)


def _add_benchmark_commands(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="score a checkpoint: on a dataset of your own (--dataset), else the Shapes benchmark"
    )
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument(
        "--dataset",
        default=None,
        help="a `save_to_disk` folder: rows with image/question/answer (exact match) and/or caption (drawn)",
    )
    evaluate.add_argument(
        "--judge", default=None, help="with --dataset: 'module:function' scoring the drawn images, judge(images, rows)"
    )
    evaluate.add_argument(
        "--split",
        choices=["test", "heldout", "paraphrase"],
        default="test",
        help="paraphrase: the test scenes in caption phrasings training never used (generation only)",
    )
    evaluate.add_argument("-n", type=_positive_int, default=500, help="scenes (5 questions each)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=100)
    evaluate.add_argument("--json", default=None, help="also write the metrics here")
    _add_decoding_flags(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    align = commands.add_parser("analyze-alignment", help="image-text alignment per layer along each task's path")
    align.add_argument("--model", required=True)
    align.add_argument("--task", choices=["both", "understanding", "generation"], default="both")
    align.add_argument("--split", choices=["test", "heldout"], default="test", help="Shapes split (default data)")
    align.add_argument("--dataset", default=None, help="a saved datasets.Dataset with image/caption columns instead")
    align.add_argument("-n", type=_positive_int, default=500, help="paired samples")
    align.add_argument("-k", type=_positive_int, default=10, help="nearest neighbours")
    align.add_argument("--batch-size", type=_positive_int, default=50)
    align.add_argument("--out", default="alignment.png", help="PNG plot")
    align.add_argument("--csv", default=None, help="also write the table here")
    align.set_defaults(run=cmd_analyze_alignment)

    demo = commands.add_parser("demo", help="the bundled Shapes checkpoint: generate, answer, judge (offline)")
    demo.add_argument("--out", default="demo_out")
    demo.set_defaults(run=cmd_demo)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="unifork", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(commands)
    _add_conversion_commands(commands)
    _add_benchmark_commands(commands)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"unifork {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
