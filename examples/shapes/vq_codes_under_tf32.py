"""Why a GPU evaluation of a Shapes checkpoint answered fewer questions than the CPU: the VQ's codes under TF32.

    python examples/shapes/vq_codes_under_tf32.py docs/fork-point/K3-seed2 [-n 500]

On an NVIDIA GPU, cuDNN runs float32 convolutions in TF32 by default (`torch.backends.cudnn.allow_tf32`): their
inputs keep 10 of float32's 23 mantissa bits. The Shapes VQ's codebook holds near-duplicate entries (codes whose
vectors are ~1e-6 apart), so that rounding moves many tiles to a near-identical entry with another index, one the
model never saw in training if its data were encoded on the CPU. This script rounds the VQ encoder's convolution
inputs and weights to TF32 on the CPU and reports how many codes change, how far apart the swapped entries are, and
exact match on the test questions with float32 and with TF32-rounded image codes.
"""

import argparse
import collections

import torch
import torch.nn.functional as F

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import shapes_dataset, to_understanding
from unifork_hf.evaluation.answers import answer_questions


def tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32's 10-bit mantissa (round half up on the magnitude), as TF32 convolutions read it."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class tf32_convolutions:
    """Within the block every `F.conv2d` (the VQ encoder's) computes on TF32-rounded inputs and weights."""

    def __enter__(self):
        self.conv2d = F.conv2d
        F.conv2d = lambda x, w, b=None, *args, **kwargs: self.conv2d(tf32(x), tf32(w), b, *args, **kwargs)

    def __exit__(self, *exc):
        F.conv2d = self.conv2d


def exact_match(model, questions) -> dict:
    images = [images[0] for images in questions["images"]]
    answers = answer_questions(model, images, questions["question"], progress_bar=False)
    right = collections.defaultdict(list)
    for answer, truth, kind in zip(answers, questions["answer"], questions["type"]):
        right[kind].append(answer == truth)
        right["all"].append(answer == truth)
    return {kind: round(100 * sum(v) / len(v), 1) for kind, v in right.items()}


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="a Shapes checkpoint folder")
    parser.add_argument("-n", type=int, default=500, help="test scenes (5 questions each)")
    args = parser.parse_args()
    model = UniForkForConditionalGeneration.from_pretrained(args.model).eval()
    processor = model.processor
    test = shapes_dataset(num_train=0, num_test=args.n, num_heldout=0, seed=0)["test"]
    codes = processor.encode_images(list(test["image"]))
    with tf32_convolutions():
        rounded = processor.encode_images(list(test["image"]))
    changed = codes != rounded
    book = processor.require_image_tokenizer().codebook.float()
    apart = (book[codes[changed]] - book[rounded[changed]]).norm(dim=-1)
    nearest = torch.cdist(book, book).fill_diagonal_(float("inf")).min(1).values
    print(f"{args.model}: {100 * changed.float().mean():.1f}% of {codes.numel()} image codes change under TF32")
    if changed.any():
        print(f"  distance between the swapped entries: median {apart.median():.2e}, max {apart.max():.2e}")
    print(f"  distance from each codebook entry to its nearest other: median {nearest.median():.2e}")
    questions = to_understanding(test)
    print(f"  test questions, float32 codes:      {exact_match(model, questions)}")
    with tf32_convolutions():
        print(f"  test questions, TF32-rounded codes: {exact_match(model, questions)}")


if __name__ == "__main__":
    main()
