"""Train an image tokenizer on your own images: the VQ (a diffusers `VQModel`) or the residual-quantised one.

The recipe that made the Shapes demo's tokenizer (examples/shapes/train_vq.py), as a library call:
reconstruction MSE + the VQ commitment loss, Adam with cosine decay, optionally tile by tile (a code then
depends on its own tile only), and dead codes re-seeded from the encoder's outputs every `reseed_every`
steps (without that a codebook collapses to a few codes).
"""

import math

import torch
from diffusers import VQModel
from tqdm.auto import tqdm

from ..modeling.forking_unifork import VQ_IMAGE_SIZE_KEY, VQ_TILE_SIZE_KEY
from ..modeling.image_processing_unifork import UniForkImageProcessorPil
from ..modeling.rq_unifork import UniForkRQImageTokenizer
from ..modeling.vq_unifork import UniForkVQImageTokenizer


def small_vq(sample_size: int, codebook_size: int = 1024, downsampling_factor: int = 4) -> VQModel:
    """A small convolutional VQModel (about 0.3M parameters): `downsampling_factor` pixels per code side."""
    levels = int(math.log2(downsampling_factor)) + 1
    if 2 ** (levels - 1) != downsampling_factor:
        raise ValueError(f"downsampling_factor must be a power of 2, got {downsampling_factor}.")
    return VQModel(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(16, 32, 64, 64, 64)[:levels],
        layers_per_block=1,
        latent_channels=32,
        num_vq_embeddings=codebook_size,
        vq_embed_dim=32,
        norm_num_groups=1,  # GroupNorm over all channels: per-sample statistics, no channel grouping to tune
        sample_size=sample_size,
        mid_block_add_attention=False,
    )


def images_to_tensor(images, image_processor) -> torch.Tensor:
    """PIL images (a list, or a `datasets` image column) -> `(N, 3, H, W)` in [-1, 1], as the processor makes them."""
    images = list(images)
    if not images:
        raise ValueError("images is empty: pass at least one image.")
    return torch.cat(
        [image_processor(images[i : i + 256], return_tensors="pt").pixel_values for i in range(0, len(images), 256)]
    )


@torch.no_grad()
def reconstruction_metrics(tokenizer: UniForkVQImageTokenizer, pixels: torch.Tensor) -> dict:
    """MSE and PSNR (images in [-1, 1], so a peak-to-peak range of 2) of encode -> decode, and the share of the
    codebook the images use."""
    codes = torch.cat([tokenizer.encode(part) for part in pixels.split(256)])
    reconstructed = torch.cat([tokenizer.decode(part) for part in codes.split(256)])
    mse = torch.nn.functional.mse_loss(reconstructed, pixels).item()
    return {
        "mse": mse,
        "psnr": 10 * math.log10(4 / max(mse, 1e-12)),
        "codes_used": codes.unique().numel(),
        "codebook_size": tokenizer.codebook_size,
    }


def train_vq_tokenizer(
    images,
    image_size: int | None = None,
    tile_size: int | None = None,
    vq_model: VQModel | None = None,
    codebook_size: int = 1024,
    max_steps: int = 2000,
    batch_size: int = 64,
    learning_rate: float = 3e-4,
    reseed_every: int = 100,
    eval_images=None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[VQModel, dict]:
    """Train a VQ image tokenizer on `images`; returns the trained `VQModel` and its reconstruction metrics.

    Args:
        images: PIL images: a list, or a `datasets` image column (`dataset["image"]`).
        image_size: side the images are resized to (as `UniForkImageProcessorPil` does for the model);
            default: the first image's width.
        tile_size: train and tokenize `tile_size` x `tile_size` tiles on their own (then pass the same
            `vq_tile_size` to the model; `from_pretrained_llm` reads it from the VQ's config); None: whole images.
        vq_model: the VQModel to train; default `small_vq(...)` (4 pixels per code side).
        max_steps, batch_size, learning_rate: Adam with cosine decay over `max_steps` batches of images (tiles).
        reseed_every: every this many steps, codes no batch used since the last re-seed are moved onto encoder
            outputs of the training images, the badly quantised ones more likely (k-means++ style); the whole
            codebook starts that way.
        eval_images: images to report reconstruction on (default: up to 512 of the training images).
        seed: initialisation, batches and re-seeding.

    Returns:
        `(vq_model, metrics)`: metrics `mse`, `psnr` (dB), `codes_used`, `codebook_size` on the eval images,
        `dead_codes_reseeded` (over training), `train_loss` (last 100 steps' mean).

    Example:

    ```python
    >>> from PIL import Image
    >>> from unifork_hf.training import train_vq_tokenizer
    >>> images = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue", "white")]
    >>> vq, metrics = train_vq_tokenizer(images, codebook_size=16, max_steps=20, progress=False)
    >>> vq.config.num_vq_embeddings, metrics["codebook_size"], vq.config["_unifork_image_size"]
    (16, 16, 16)

    ```
    """
    torch.manual_seed(seed)
    images = list(images)
    if not images:
        raise ValueError("images is empty: pass at least one image.")
    image_size = image_size or images[0].size[0]
    image_processor = UniForkImageProcessorPil(size={"height": image_size, "width": image_size})
    pixels = images_to_tensor(images, image_processor)
    if vq_model is None:
        vq_model = small_vq(tile_size or image_size, codebook_size)
    tokenizer = UniForkVQImageTokenizer(vq_model=vq_model, tile_size=tile_size).requires_grad_(True)
    if image_size % (tile_size or tokenizer.downsampling_factor):
        raise ValueError(f"image_size {image_size} must be a multiple of tile_size / the VQ's downsampling factor.")
    # distinct tiles: most tiles of most images are background, which would otherwise drown the rare edges
    train = UniForkVQImageTokenizer.to_tiles(pixels, tile_size).unique(dim=0) if tile_size else pixels
    loss_history, reseeded = _train(vq_model, train, max_steps, batch_size, learning_rate, reseed_every, seed, progress)
    vq_model.eval().requires_grad_(False)
    vq_model.register_to_config(
        **{VQ_IMAGE_SIZE_KEY: image_size, VQ_TILE_SIZE_KEY: tile_size}
    )  # for from_pretrained_llm
    eval_pixels = images_to_tensor(eval_images, image_processor) if eval_images is not None else pixels[:512]
    metrics = reconstruction_metrics(tokenizer, eval_pixels)
    metrics.update(dead_codes_reseeded=reseeded, train_loss=sum(loss_history[-100:]) / max(len(loss_history[-100:]), 1))
    return vq_model, metrics


def _train(vq, train, max_steps, batch_size, learning_rate, reseed_every, seed, progress) -> tuple[list, int]:
    optimizer = torch.optim.Adam(vq.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max_steps)
    used = torch.zeros(vq.config.num_vq_embeddings, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    losses, reseeded = [], 0
    # start the codebook on the encoder's outputs (k-means++ style): the default init, uniform in +-1/K, puts
    # every code far from them and learning waits until the codebook has crawled there
    _reseed(vq, train, torch.arange(len(used)), generator)
    bar = tqdm(range(1, max_steps + 1), desc="Training the VQ", disable=not progress)
    vq.train()
    for step in bar:
        batch = train[torch.randint(0, len(train), (batch_size,), generator=generator)]
        latents = vq.encode(batch).latents
        quantized, commit_loss, (_, _, indices) = vq.quantize(latents)
        reconstruction = vq.decode(quantized, force_not_quantize=True).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + commit_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        used[indices] = True
        if step % reseed_every == 0:
            dead = (~used).nonzero().squeeze(1)
            if len(dead):
                reseeded += _reseed(vq, train, dead, generator)
            bar.set_postfix(loss=f"{loss.item():.4f}", dead=len(dead))
            used.zero_()
    return losses, reseeded


@torch.no_grad()
def _reseed(vq, train, dead, generator) -> int:
    """Move the `dead` codes onto encoder outputs of the training images (see `_distinct_draw`); returns how many
    moved."""
    vectors = torch.cat([vq.encode(part).latents for part in train.split(1024)])
    vectors = vectors.permute(0, 2, 3, 1).reshape(-1, vectors.shape[1])
    new = _distinct_draw(vectors, vq.quantize.embedding.weight, len(dead), generator)
    vq.quantize.embedding.weight[dead[: len(new)]] = new
    return len(new)


def _distinct_draw(candidates, codebook, count, generator) -> torch.Tensor:
    """Up to `count` rows of `candidates`, no two alike and none already in `codebook`, drawn with probability
    growing with their squared distance to the codebook (a uniform draw would spend most codes on copies of the
    background). Flat image regions encode to the same vector: drawn twice, they would give two codes one vector,
    ids that float rounding then swaps (the Shapes VQ's near-duplicates: `vq_unifork.float32_convolutions`). So
    vectors that agree to 1e-4 of the largest value count as one, and when fewer than `count` differ, the rest of
    the dead codes stay where they are, unused."""
    scale = candidates.abs().max().clamp_min(1e-12)
    _, group = torch.unique(torch.round(candidates / scale * 1e4), dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), len(candidates), dtype=torch.long, device=group.device)
    candidates = candidates[first.scatter_reduce(0, group, torch.arange(len(candidates), device=group.device), "amin")]
    error = torch.cdist(candidates, codebook).min(dim=1).values ** 2
    keep = error > 1e-8 * scale**2  # not a code already
    candidates, error = candidates[keep], error[keep]
    count = min(count, len(candidates))
    if not count:
        return candidates[:0]
    return candidates[torch.multinomial(error, count, replacement=False, generator=generator)]


def small_rq_config(image_size: int, codebook_size: int = 1024, depth: int = 4, patch_size: int = 4) -> dict:
    """A small `rq_config` (about 0.5M parameters) for images trained from scratch: `patch_size` pixels per position
    side, `depth` residual codes per position. Its encoder is SigLIP's patch embedding without transformer layers,
    so a position's codes depend on its own patch only (the Shapes VQ needed that locality: see train_vq.py)."""
    levels = int(math.log2(patch_size)) + 1
    if 2 ** (levels - 1) != patch_size:
        raise ValueError(f"patch_size must be a power of 2, got {patch_size}.")
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 0, "num_attention_heads": 1}
    return {
        "vision_config": {**vision, "image_size": image_size, "patch_size": patch_size, "vision_use_head": False},
        "codebook_size": codebook_size,
        "depth": depth,
        "latent_channels": 32,
        "block_out_channels": [16, 32, 64, 64, 64][:levels],
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": 1,
        "norm_num_groups": 1,
    }


def train_rq_tokenizer(
    images,
    rq_config: dict | None = None,
    max_steps: int = 2000,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    reseed_every: int = 100,
    eval_images=None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[UniForkRQImageTokenizer, dict]:
    """Train a residual-quantised image tokenizer on `images`; returns it (frozen, in eval mode) and its metrics.

    The loss is RQ-VAE's: reconstruction MSE through the straight-through sum of the codes, a codebook term pulling
    every partial sum (codes 0..d) towards the feature, and 0.25 x the commitment of the feature to them. Adam with
    cosine decay; codes no batch used over `reseed_every` steps are re-seeded onto residuals (of any depth) that the
    codebook quantises badly; the whole codebook starts that way. A zero position table stays zero (frozen): with a
    layer-less encoder the codes then depend on the patch's content only, wherever it is.

    Args:
        images: PIL images (a list or a `datasets` image column), resized to the config's `image_size`.
        rq_config: default `small_rq_config(first image's width)`.

    Returns:
        `(tokenizer, metrics)`: `mse`, `psnr`, `codes_used`, `codebook_size` (eval images, all depths),
        `mse_by_depth` (decoding the first d depths), `dead_codes_reseeded`, `train_loss` (last 100 steps).
    """
    torch.manual_seed(seed)
    images = list(images)
    if not images:
        raise ValueError("images is empty: pass at least one image.")
    rq_config = rq_config or small_rq_config(images[0].size[0])
    tokenizer = UniForkRQImageTokenizer(rq_config)
    size = rq_config["vision_config"]["image_size"]
    image_processor = UniForkImageProcessorPil(size={"height": size, "width": size})
    pixels = images_to_tensor(images, image_processor)
    positions = tokenizer.encoder.embeddings.position_embedding.weight
    if not rq_config["vision_config"].get("num_hidden_layers", 1):
        torch.nn.init.zeros_(positions)
    tokenizer.requires_grad_(True)
    positions.requires_grad_(bool(positions.abs().sum()))
    losses, reseeded = _train_rq(tokenizer, pixels, max_steps, batch_size, learning_rate, reseed_every, seed, progress)
    tokenizer.eval().requires_grad_(False)
    eval_pixels = images_to_tensor(eval_images, image_processor) if eval_images is not None else pixels[:512]
    metrics = reconstruction_metrics(tokenizer, eval_pixels)
    with torch.no_grad():
        codes = tokenizer.encode(eval_pixels)
        metrics["mse_by_depth"] = [
            torch.nn.functional.mse_loss(tokenizer.decode(codes[..., :d]), eval_pixels).item()
            for d in range(1, tokenizer.depth + 1)
        ]
    metrics.update(dead_codes_reseeded=reseeded, train_loss=sum(losses[-100:]) / max(len(losses[-100:]), 1))
    return tokenizer, metrics


def _train_rq(tokenizer, pixels, max_steps, batch_size, learning_rate, reseed_every, seed, progress):
    optimizer = torch.optim.Adam([p for p in tokenizer.parameters() if p.requires_grad], lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max_steps)
    used = torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    _reseed_rq(tokenizer, pixels, torch.arange(len(used)), generator)
    losses, reseeded = [], 0
    bar = tqdm(range(1, max_steps + 1), desc="Training the RQ tokenizer", disable=not progress)
    tokenizer.train()
    for step in bar:
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        features = tokenizer.features(batch)  # (B, n, dim)
        codes = tokenizer.quantize(features.detach())
        partial = tokenizer.codebook[codes].cumsum(-2)  # (B, n, depth, dim): the sums of codes 0..d
        codebook_loss = torch.nn.functional.mse_loss(partial, features.detach().unsqueeze(-2).expand_as(partial))
        commitment = torch.nn.functional.mse_loss(features.unsqueeze(-2).expand_as(partial), partial.detach())
        quantized = features + (partial[..., -1, :] - features).detach()  # straight through
        side = int(round(quantized.shape[1] ** 0.5))
        latents = quantized.transpose(1, 2).reshape(len(batch), -1, side, side)
        reconstruction = tokenizer.decoder(tokenizer.post_quant_conv(latents))
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + codebook_loss + 0.25 * commitment
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        used[codes.flatten()] = True
        if step % reseed_every == 0:
            dead = (~used).nonzero().squeeze(1)
            if len(dead):
                _reseed_rq(tokenizer, pixels, dead, generator)
                reseeded += len(dead)
            bar.set_postfix(loss=f"{loss.item():.4f}", dead=len(dead))
            used.zero_()
    return losses, reseeded


@torch.no_grad()
def _reseed_rq(tokenizer, pixels, dead, generator) -> None:
    """Move the `dead` codes onto residuals (what codes 0..d-1 leave of a feature, any d) of up to 2048 training
    images, drawn with probability growing with their squared distance to the codebook. (With replacement, unlike
    the VQ's `_distinct_draw`: drawing distinct residuals only left the quadrant test's deeper codes unable to refine
    the first; whether RQ codebooks get near-duplicates has not been measured.)"""
    features = torch.cat([tokenizer.features(part) for part in pixels[:2048].split(256)]).flatten(0, 1)
    codes = tokenizer.quantize(features)
    partial = tokenizer.codebook[codes].cumsum(-2)[..., :-1, :]
    residuals = torch.cat([features.unsqueeze(1), features.unsqueeze(1) - partial], 1).flatten(0, 1)
    error = torch.cdist(residuals, tokenizer.codebook).min(dim=1).values ** 2
    choice = torch.multinomial(error + 1e-12, len(dead), replacement=True, generator=generator)
    tokenizer.codebook_embedding.weight[dead] = residuals[choice]


__all__ = [
    "reconstruction_metrics",
    "small_rq_config",
    "small_vq",
    "train_rq_tokenizer",
    "train_vq_tokenizer",
]
