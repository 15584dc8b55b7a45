"""Paired comparison of Shapes checkpoints' generation: all-correct images on the same captions and generators.

    python examples/shapes/compare_generation.py runs/shapes/unifork-rq-d1-6k runs/shapes/unifork-rq-d4-6k \
        --num-scenes 2000 --seeds 0 1

A 500-scene evaluation has a standard error of about 0.8 points at 97% all-correct, too coarse to tell two good
checkpoints apart. Here every checkpoint draws the first `--num-scenes` test scenes (the 500 of `train_unifork.py`
first; test scenes are distinct, never in training) once per seed, each image from its own seeded generator and
the checkpoint's sampling settings, and each image is judged by the Shapes judge. Beside each checkpoint's
all-correct share: its paired difference from the first checkpoint (the same caption and generator seed on both
sides), with a standard error over scenes: each scene's difference is averaged over the seeds first, since one
scene's images are not independent of each other (a caption one model gets wrong it may get wrong for every seed).
Ends with one `RESULT` line.
"""

import argparse

import torch

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import shapes_dataset
from unifork_hf.evaluation import detect, score_image
from unifork_hf.evaluation.benchmark import generate_for_captions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="checkpoint folders; differences are taken from the first")
    parser.add_argument("--num-scenes", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--split", choices=("test", "heldout", "paraphrase"), default="test")
    args = parser.parse_args()
    if args.num_scenes < 2:
        raise SystemExit(f"--num-scenes must be at least 2 (a standard error needs two), got {args.num_scenes}.")
    heldout = args.num_scenes if args.split == "heldout" else 0
    scenes = shapes_dataset(num_train=0, num_test=args.num_scenes, num_heldout=heldout, seed=0)[args.split]

    correct = {}  # model -> all-correct (0/1) per image, shape (seeds, scenes)
    for path in args.models:
        model = UniForkForConditionalGeneration.from_pretrained(path).eval()
        outcomes = []
        for seed in args.seeds:
            # generator seeds seed * 10**6 + i: disjoint across --seeds, equal across checkpoints
            images = generate_for_captions(model, scenes["caption"], seed=seed * 10**6)
            outcomes += [score_image(asked, detect(image))["all"] for image, asked in zip(images, scenes["asked"])]
        correct[path] = torch.tensor(outcomes, dtype=torch.float64).view(len(args.seeds), -1)

    first = args.models[0]
    print(
        f"{args.split}: {args.num_scenes} scenes x seeds {args.seeds} = {correct[first].numel()} images per checkpoint"
    )
    result = {}
    for i, path in enumerate(args.models):
        share = correct[path].mean().item()
        line = f"  {path}: all-correct {100 * share:.2f}%"
        result[f"all_correct_{i}"] = round(100 * share, 2)
        if i:
            difference = (correct[path] - correct[first]).mean(0)  # per scene, over the seeds
            se = difference.std().item() / len(difference) ** 0.5
            line += f", minus {first}: {100 * difference.mean().item():+.2f} points (SE {100 * se:.2f})"
            result[f"difference_{i}"] = round(100 * difference.mean().item(), 2)
            result[f"difference_se_{i}"] = round(100 * se, 2)
        print(line)
    print("RESULT " + " ".join(f"{key}={value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
