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

It trains on the distinct tiles of the training images (most of the tiles are white), so a rare edge
of a shape counts as much as the background. Reconstruction (MSE) + the VQ commitment loss, Adam 1e-3
with cosine decay, batch 256 tiles. Every 100 steps, codes no batch has used since the last re-seed
are moved onto encoder outputs of the distinct training tiles, the badly quantised ones more likely;
without that the codebook collapses to a few codes. Ends by judging reconstructions of the test split with the Shapes judge and
measuring how local the codes are: the share of codes away from an object that change when that
object is removed (0 by construction for a tiled VQ; 0.91 for the earlier whole-image VQ).
"""

import argparse
import random
import time

import numpy as np
import torch
from diffusers import VQModel
from tqdm.auto import tqdm

from unifork_hf.data.shapes import COLOURS, IMAGE_SIZE, bounding_box, render, shapes_dataset
from unifork_hf.evaluation import score_images
from unifork_hf.modeling.vq_unifork import UniForkVQImageTokenizer


def to_tensor(images) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def to_pil(tensor):
    from PIL import Image

    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def code_locality(tokenizer: UniForkVQImageTokenizer, scenes, seed=0) -> float:
    """Share of the codes away from an object (outside its code box widened by one code) that change
    when that object is removed from the scene: 0 when each code depends on its own patch only."""
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
            tokenizer.encode(images).reshape(-1, side, side)
            for images in (to_tensor([render(objects) for objects in scenes]), to_tensor(reduced))
        ]
    far = torch.stack(far)
    return float(((codes[0] != codes[1]) * far).sum() / far.sum())


def code_colour_purity(tokenizer: UniForkVQImageTokenizer, images: torch.Tensor) -> float:
    """How well a code alone names the colour of the pixels under it: over the code regions that are
    all one shape colour, the share whose colour is the most common one for their code. 1.0 when each
    code carries its own region's colour; lower when a tile's codes carry it together."""
    factor = tokenizer.downsampling_factor
    with torch.no_grad():
        codes = tokenizer.encode(images).flatten()
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    regions = UniForkVQImageTokenizer._to_tiles(images, factor).permute(0, 2, 3, 1).reshape(len(codes), -1, 3)
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
    parser.add_argument("--tile-size", type=int, default=4, help="pixels; (tile/4)^2 codes per tile")
    parser.add_argument("--codebook-size", type=int, default=2048)
    parser.add_argument("--norm-groups", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = shapes_dataset(num_train=20000, num_test=500, num_heldout=500, seed=args.seed)
    tiles = UniForkVQImageTokenizer._to_tiles(to_tensor(data["train"]["image"]), args.tile_size)
    train = tiles.unique(dim=0)
    print(f"{len(train)} distinct {args.tile_size}x{args.tile_size} tiles in {len(data['train'])} training images")
    vq = VQModel(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=32,
        num_vq_embeddings=args.codebook_size,
        vq_embed_dim=32,
        norm_num_groups=args.norm_groups,
        sample_size=args.tile_size,
        mid_block_add_attention=False,  # a 2x2 latent per tile: little to attend to
    )
    tokenizer = UniForkVQImageTokenizer(vq_model=vq, tile_size=args.tile_size).requires_grad_(True)
    optimizer = torch.optim.Adam(vq.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    used = torch.zeros(args.codebook_size, dtype=torch.bool)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    progress = tqdm(range(1, args.steps + 1), desc="VQ")
    for step in progress:
        batch = train[torch.randint(0, len(train), (args.batch_size,), generator=generator)]
        latents = vq.encode(batch).latents
        quantized, commit_loss, (_, _, indices) = vq.quantize(latents)
        reconstruction = vq.decode(quantized, force_not_quantize=True).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + commit_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        used[indices] = True
        if step % 100 == 0:
            dead = (~used).nonzero().squeeze(1)
            if len(dead):  # re-seed unused codes from the encoder outputs of all distinct training tiles
                with torch.no_grad():
                    vectors = torch.cat([vq.encode(part).latents for part in train.split(1024)])
                    vectors = vectors.permute(0, 2, 3, 1).reshape(-1, vectors.shape[1])
                    # k-means++ style: a uniform choice would spend most codes on copies of the white background
                    error = torch.cdist(vectors, vq.quantize.embedding.weight).min(dim=1).values ** 2
                    choice = torch.multinomial(error + 1e-12, len(dead), replacement=True, generator=generator)
                    vq.quantize.embedding.weight[dead] = vectors[choice]
            progress.set_postfix(loss=f"{loss.item():.4f}", dead=len(dead))
            used.zero_()
    vq.eval()
    with torch.no_grad():
        test = to_tensor(data["test"]["image"])
        codes = tokenizer.encode(test)
        reconstructions = to_pil(tokenizer.decode(codes))
        codes_used = codes.unique().numel()
    scores = score_images(reconstructions, data["test"]["objects"])
    vq.save_pretrained(args.out)
    print(
        f"trained {args.steps} steps in {time.time() - start:.0f} s; test codes used {codes_used}/{args.codebook_size}"
    )
    print("reconstructions judged:", {k: round(v, 4) for k, v in scores.items()})
    print(f"codes away from a removed object that change: {code_locality(tokenizer, data['test']['objects']):.3f}")
    print(f"code -> colour purity of one-colour code regions: {code_colour_purity(tokenizer, test):.3f}")


if __name__ == "__main__":
    main()
