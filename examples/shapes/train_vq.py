"""Train the Shapes VQ image tokenizer: a diffusers VQModel, 32x32 images -> 8x8 codes of a 2048-entry codebook.

    python examples/shapes/train_vq.py --out runs/shapes/vq [--steps 12000] [--tile-size 4] [--seed 0]

The VQ sees 4x4-pixel tiles (one code each; `UniForkConfig.vq_tile_size=4`), so a code depends on its
own patch only and has one colour. A whole-image VQModel's GroupNorms and receptive field make every
code depend on the whole image: removing one object changed 91% of the codes far from it, and the
UniFork trained on those codes drew only 30% of the test captions correctly. With 8x8 tiles
(`--tile-size 8 --codebook-size 1024 --steps 5000`: 2x2 codes decoded together) reconstructions are
100% right too, but a colour belongs to a combination of codes, and the demo model's colour answers
stayed at chance for its first 1000 steps (61% with 4x4 tiles). 4x4 tiles need the longer training:
after 5000 steps 12% of the reconstructed objects came out a different colour, after 12000 none.

The training is `unifork_hf.training.train_vq_tokenizer`: the distinct tiles of the training images (most
of the tiles are white, so a rare edge of a shape counts as much as the background), reconstruction (MSE) +
the VQ commitment loss, Adam 1e-3 with cosine decay, batch 256 tiles, codes no batch has used for 100
steps re-seeded from encoder outputs (without that the codebook collapses to a few codes). The demo's VQ
(2026-12-02) was trained by the same loop before it started the codebook on the encoder's outputs too
(the default init puts every code far from them). Ends by judging reconstructions of the test split with the Shapes judge and
measuring how local the codes are: the share of codes away from an object that change when that
object is removed (0 by construction for a tiled VQ; 0.91 for the earlier whole-image VQ).
"""

import argparse
import random
import time

import numpy as np
import torch

from unifork_hf.data.shapes import COLOURS, IMAGE_SIZE, bounding_box, render, shapes_dataset
from unifork_hf.evaluation import score_images
from unifork_hf.modeling.vq_unifork import UniForkVQImageTokenizer
from unifork_hf.training import train_vq_tokenizer


def to_tensor(images) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def to_pil(tensor):
    from PIL import Image

    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def code_locality(tokenizer: UniForkVQImageTokenizer, scenes, seed=0) -> float:
    """Share of the positions away from an object (outside its code box widened by one code) whose codes change
    when that object is removed from the scene: 0 when each code depends on its own patch only (VQ or RQ)."""
    rng = random.Random(seed)
    factor = tokenizer.downsampling_factor  # pixels per code
    side = IMAGE_SIZE // factor
    reduced, far = [], []
    for objects in scenes:
        removed = rng.randrange(len(objects))
        reduced.append(render([obj for i, obj in enumerate(objects) if i != removed]))
        mask = torch.ones(side, side)
        left, top, right, bottom = (value // factor for value in bounding_box(objects[removed]))
        mask[max(top - 1, 0) : bottom + 2, max(left - 1, 0) : right + 2] = 0
        far.append(mask)
    with torch.no_grad():
        codes = [
            tokenizer.encode(images).reshape(len(scenes), side, side, -1)  # (-1: an RQ position's codes)
            for images in (to_tensor([render(objects) for objects in scenes]), to_tensor(reduced))
        ]
    far = torch.stack(far)
    return float(((codes[0] != codes[1]).any(-1) * far).sum() / far.sum())


def code_colour_purity(tokenizer: UniForkVQImageTokenizer, images: torch.Tensor) -> float:
    """How well a code alone names the colour of the pixels under it: over the code regions that are
    all one shape colour, the share whose colour is the most common one for their code. 1.0 when each
    code carries its own region's colour; lower when a tile's codes carry it together."""
    factor = tokenizer.downsampling_factor
    with torch.no_grad():
        codes = tokenizer.encode(images).flatten()
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    regions = UniForkVQImageTokenizer.to_tiles(images, factor).permute(0, 2, 3, 1).reshape(len(codes), -1, 3)
    nearest = torch.cdist(regions.reshape(-1, 3), palette).argmin(-1).reshape(len(codes), -1)
    one_colour = (regions < 0.9).any(-1).all(-1) & (nearest == nearest[:, :1]).all(-1)
    counts = torch.zeros(tokenizer.codebook_size, len(palette))
    counts.index_put_((codes[one_colour], nearest[one_colour, 0]), torch.tensor(1.0), accumulate=True)
    return float(counts.max(1).values.sum() / counts.sum().clamp(min=1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=256, help="tiles")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--tile-size", type=int, default=4, help="pixels; (tile/4)^2 codes per tile")
    parser.add_argument("--codebook-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = shapes_dataset(num_train=20000, num_test=500, num_heldout=500, seed=args.seed)
    start = time.time()
    vq, metrics = train_vq_tokenizer(
        data["train"]["image"],
        tile_size=args.tile_size,
        codebook_size=args.codebook_size,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        eval_images=data["test"]["image"],
        seed=args.seed,
    )
    vq.save_pretrained(args.out)
    tokenizer = UniForkVQImageTokenizer(vq_model=vq, tile_size=args.tile_size)
    with torch.no_grad():
        test = to_tensor(data["test"]["image"])
        reconstructions = to_pil(tokenizer.decode(tokenizer.encode(test)))
    scores = score_images(reconstructions, data["test"]["objects"])
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s; test reconstruction {metrics}")
    print("reconstructions judged:", {k: round(v, 4) for k, v in scores.items()})
    print(f"codes away from a removed object that change: {code_locality(tokenizer, data['test']['objects']):.3f}")
    print(f"code -> colour purity of one-colour code regions: {code_colour_purity(tokenizer, test):.3f}")


if __name__ == "__main__":
    main()
