"""Where a Shapes checkpoint falls short: understanding on training scenes, and what it draws for held-out pairs.

    python examples/shapes/diagnose_checkpoint.py [--model DIR] [-n 500] [--heldout-n 200]

1. Exact match on questions about `n` *training* scenes: about as low as on test means the model
   underfits understanding rather than failing to generalise.
2. For each held-out object (a colour+shape pair never seen in training) in `heldout-n` held-out
   captions, what the judge finds at its place: the pair itself, the right colour with a trained
   shape, the right shape with a trained colour, or neither.
"""

import argparse
import collections

import unifork_hf
from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import HELDOUT_PAIRS, shapes_dataset, to_understanding
from unifork_hf.evaluation import detect, score_answers
from unifork_hf.evaluation.answers import answer_questions
from unifork_hf.evaluation.benchmark import generate_for_captions


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=unifork_hf.DEMO_CHECKPOINT)
    parser.add_argument("-n", type=int, default=500, help="training scenes to ask about")
    parser.add_argument("--heldout-n", type=int, default=200, help="held-out captions to draw")
    parser.add_argument("--num-train", type=int, default=25000, help="as in training (the splits depend on it)")
    args = parser.parse_args()
    model = UniForkForConditionalGeneration.from_pretrained(args.model).eval()
    data = shapes_dataset(num_train=args.num_train, num_test=500, num_heldout=500, seed=0)

    questions = to_understanding(data["train"].select(range(args.n)))
    asked = questions["question"]
    predictions = answer_questions(model, [images[0] for images in questions["images"]], asked, progress_bar=False)
    scores = score_answers(predictions, questions["answer"], questions["type"])
    print(f"understanding on {args.n} training scenes: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items()))

    heldout = data["heldout"].select(range(args.heldout_n))
    outcomes = collections.Counter()
    for image, objects in zip(generate_for_captions(model, heldout["caption"], progress_bar=False), heldout["objects"]):
        found = {o["position"]: (o["colour"], o["shape"]) for o in detect(image)}
        for obj in objects:
            asked_pair = (obj["colour"], obj["shape"])
            if asked_pair not in HELDOUT_PAIRS:
                continue
            drawn = found.get(obj["position"])
            outcomes[
                "nothing at its place"
                if drawn is None
                else "the held-out pair"
                if drawn == asked_pair
                else "another held-out pair"
                if drawn in HELDOUT_PAIRS
                else "right colour, a trained shape"
                if drawn[0] == obj["colour"]
                else "right shape, a trained colour"
                if drawn[1] == obj["shape"]
                else "neither"
            ] += 1
    total = sum(outcomes.values())
    print(
        f"held-out objects in {args.heldout_n} held-out captions, drawn as: "
        + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in outcomes.most_common())
    )


if __name__ == "__main__":
    main()
