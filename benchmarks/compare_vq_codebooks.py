"""Two Shapes VQ tokenizers side by side: reconstruction, near-duplicate codebook entries, and how many codes
TF32 rounding of the encoder's convolutions swaps (what a GPU's default cuDNN settings did to the demo's codes).

    python benchmarks/compare_vq_codebooks.py --vq runs/shapes/vq runs/vq-distinct

The first VQ is the bundled demo's (trained with dead codes re-seeded with replacement), the second the same
recipe after re-seeding draws distinct vectors only (`training.image_tokenizer._distinct_draw`).
"""

import argparse
import os
import sys

import torch
from diffusers import VQModel

from unifork_hf.data.shapes import shapes_dataset
from unifork_hf.evaluation import score_images
from unifork_hf.modeling.vq_unifork import UniForkVQImageTokenizer
from unifork_hf.training import reconstruction_metrics

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "shapes"))
from train_vq import code_colour_purity, to_pil, to_tensor  # noqa: E402
from vq_codes_under_tf32 import tf32_convolutions  # noqa: E402


@torch.no_grad()
def measure(path: str, pixels: torch.Tensor, objects, tile_size: int) -> dict:
    vq = VQModel.from_pretrained(path).eval()
    tokenizer = UniForkVQImageTokenizer(vq_model=vq, tile_size=tile_size)
    codes = tokenizer.encode(pixels)
    with tf32_convolutions():
        rounded = tokenizer.encode(pixels)
    book = tokenizer.codebook
    used = codes.unique()
    nearest = torch.cdist(book[used], book).scatter_(1, used[:, None], float("inf")).min(1).values
    scores = score_images(to_pil(tokenizer.decode(codes)), objects)
    return {
        "mse": reconstruction_metrics(tokenizer, pixels)["mse"],
        "judged_all": scores["all"],
        "colour_purity": code_colour_purity(tokenizer, pixels),
        "codes_used": len(used),
        "used_with_twin": int((nearest < 1e-5 * book.abs().max()).sum()),  # another entry within 1e-5 of the scale
        "tf32_swapped": (codes != rounded).float().mean().item(),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vq", nargs=2, required=True, help="two VQ folders (train_vq.py's output)")
    parser.add_argument("-n", type=int, default=500, help="Shapes test images")
    parser.add_argument("--tile-size", type=int, default=4, help="the tile both VQs were trained on")
    args = parser.parse_args()
    test = shapes_dataset(num_train=0, num_test=args.n, num_heldout=0, seed=0)["test"]
    pixels = to_tensor(test["image"])
    rows = [measure(path, pixels, test["objects"], args.tile_size) for path in args.vq]
    print(f"{'':16s}" + "".join(f"{path:>28s}" for path in args.vq))
    for key in rows[0]:
        print(f"{key:16s}" + "".join(f"{row[key]:>28.4f}" for row in rows))
    print("RESULT " + " ".join(f"{key}_{name}={row[key]:.4g}" for name, row in zip(("a", "b"), rows) for key in row))


if __name__ == "__main__":
    main()
