"""Which image sampling settings draw best on a Shapes checkpoint: all-correct share per guidance scale x
temperature, on test and paraphrase captions, side by side in one run. The winner belongs in the
checkpoint's `generation_config.image_generation` (examples/shapes/train_unifork.py writes it).

    python benchmarks/sweep_sampling_shapes.py --model runs/shapes/unifork [-n 200]

Selecting settings on test captions and then reporting test scores would flatter them, so the sweep
runs on scenes 500..500+n of the test split (the report uses the first 500).
"""

import argparse
import itertools
import time

import torch
from transformers import AutoModel

from unifork_hf.data.shapes import shapes_dataset
from unifork_hf.evaluation.benchmark import evaluate_shapes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("-n", type=int, default=200, help="scenes per split and setting")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = AutoModel.from_pretrained(args.model).eval()
    data = shapes_dataset(num_train=25000, num_test=500 + args.n, num_heldout=0, seed=0)
    splits = {split: data[split].select(range(500, 500 + args.n)) for split in ("test", "paraphrase")}
    best = None
    print(f"{'guidance':>8} {'temp':>5} {'test all':>9} {'paraphrase all':>15} {'s':>5}")
    for guidance, temperature in itertools.product(args.guidance, args.temperature):
        start = time.time()
        scores = {
            split: evaluate_shapes(
                model,
                scenes,
                understanding=False,
                progress_bar=False,
                top_k=0,
                top_p=1.0,
                guidance_scale=guidance,
                temperature=temperature,
            )["generation"]["all"]
            for split, scenes in splits.items()
        }
        print(
            f"{guidance:8.1f} {temperature:5.1f} {scores['test']:9.1%} {scores['paraphrase']:15.1%} "
            f"{time.time() - start:5.0f}"
        )
        if best is None or scores["test"] + scores["paraphrase"] > sum(best[2].values()):
            best = (guidance, temperature, scores)
    guidance, temperature, scores = best
    print(
        f"RESULT best_guidance={guidance} best_temperature={temperature} test_all={scores['test']} "
        f"paraphrase_all={scores['paraphrase']} n={args.n}"
    )


if __name__ == "__main__":
    main()
