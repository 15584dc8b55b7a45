"""Exact match per question type on one- and two-shape scenes, for one or more Shapes checkpoints.

    python examples/shapes/questions_by_shape_count.py docs/fork-point/K2-seed1 docs/fork-point/K2-seed2 [-n 500]

On a one-shape scene "What colour is the shape at the top left?" can be answered without finding the asked
shape; on a two-shape scene the model must pick the right one of two. A model near 100% on one shape and near
50-60% on two has learned to read attributes but not to look up the asked object.
"""

import argparse
import collections

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import shapes_dataset
from unifork_hf.evaluation.answers import answer_questions


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", help="checkpoint folders")
    parser.add_argument("-n", type=int, default=500, help="test scenes (5 questions each)")
    args = parser.parse_args()
    test = shapes_dataset(num_train=0, num_test=args.n, num_heldout=0, seed=0)["test"]
    asked = [(row["image"], qa, len(row["objects"])) for row in test for qa in row["questions"]]
    for path in args.models:
        model = UniForkForConditionalGeneration.from_pretrained(path).eval()
        answers = answer_questions(model, [a[0] for a in asked], [a[1]["question"] for a in asked], progress_bar=False)
        cells = collections.defaultdict(list)
        for (_, qa, shapes), answer in zip(asked, answers):
            cells[(qa["type"], shapes)].append(answer == qa["answer"])
        print(path)
        for (kind, shapes), right in sorted(cells.items()):
            print(
                f"  {kind:8s} {shapes} shape{'s' * (shapes > 1)}: {100 * sum(right) / len(right):5.1f}% of {len(right)}"
            )


if __name__ == "__main__":
    main()
