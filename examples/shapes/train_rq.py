"""Train a Shapes RQ image tokenizer: 32x32 images -> 8x8 positions x `depth` residual codes of one shared codebook.

    python examples/shapes/train_rq.py --out runs/shapes/rq-d4 --depth 4 [--codebook-size 512] [--steps 6000]

`unifork_hf.training.train_rq_tokenizer` with `small_rq_config`: SigLIP's patch embedding (4x4-pixel patches, no
transformer layers and a zero position table, so a position's codes depend on its own patch only, as the demo VQ's
tiles do), residual quantisation, a small convolutional decoder over the whole image. Ends by judging the test
split's reconstructions with the Shapes judge at every depth, and by measuring how local the codes are (the share
of codes away from an object that change when the object is removed). Writes `metrics.json` beside the tokenizer.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_vq import code_locality, to_pil, to_tensor  # noqa: E402

from unifork_hf.data.shapes import IMAGE_SIZE, shapes_dataset  # noqa: E402
from unifork_hf.evaluation import score_images  # noqa: E402
from unifork_hf.training import small_rq_config, train_rq_tokenizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64, help="images")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = shapes_dataset(num_train=20000, num_test=500, num_heldout=500, seed=args.seed)
    start = time.time()
    tokenizer, metrics = train_rq_tokenizer(
        data["train"]["image"],
        small_rq_config(IMAGE_SIZE, codebook_size=args.codebook_size, depth=args.depth),
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        eval_images=data["test"]["image"],
        seed=args.seed,
    )
    tokenizer.save_pretrained(args.out)
    test = to_tensor(data["test"]["image"])
    with torch.no_grad():
        codes = tokenizer.encode(test)
        judged = {
            depth: score_images(to_pil(tokenizer.decode(codes[..., :depth])), data["test"]["objects"])
            for depth in range(1, args.depth + 1)
        }
    metrics.update(
        seconds=round(time.time() - start),
        steps=args.steps,
        judged_by_depth={d: {k: round(v, 4) for k, v in s.items()} for d, s in judged.items()},
        code_locality=code_locality(tokenizer, data["test"]["objects"]),
        command=" ".join(["python"] + sys.argv),
    )
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
