"""The VQ image tokenizer of UniFork: a thin, frozen wrapper on diffusers' `VQModel`."""

import contextlib
import json

import torch
from diffusers import VQModel
from safetensors import safe_open
from torch import nn
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from .configuration_unifork import vq_downsampling_factor

# The download options of `from_pretrained` keyword arguments, passed on to every file a checkpoint is read from.
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder")


def hub_kwargs(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}


def optional_file(path, filename: str, hub_kwargs: dict) -> str | None:
    """The local path of `filename` in a checkpoint folder or Hub repo, or None where it has none."""
    try:
        return cached_file(path, filename, **hub_kwargs)
    except OSError:  # transformers' error for a missing file, repo or connection
        return None


@contextlib.contextmanager
def float32_convolutions():
    """cuDNN runs float32 convolutions in TF32 by default, keeping 10 of the 23 mantissa bits. A VQ's codebook can hold
    near-duplicate entries (the Shapes VQ: ~1e-6 apart), between which that rounding swaps most codes for ids the
    model never saw if its training images were encoded in float32: 87.5% of the demo's test codes, and its test
    questions fall from 98.4% to 83.6% (`examples/shapes/vq_codes_under_tf32.py`). So the encoder runs in float32."""
    conv = getattr(torch.backends.cudnn, "conv", None)  # the per-operator precision API (torch >= 2.9)
    owner, name, value = (
        (conv, "fp32_precision", "ieee") if conv is not None else (torch.backends.cudnn, "allow_tf32", False)
    )
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


class UniForkVQImageTokenizer(nn.Module):
    """Images <-> discrete code ids, on top of a diffusers `VQModel`.

    Images are `(B, 3, H, W)` tensors in [-1, 1]; codes are `(B, h*w)` int64 ids in row-major
    grid order. The wrapper is frozen by default (the paper never trains the tokenizer): call
    `requires_grad_(True)` to train it.

    With `tile_size`, images are cut into `tile_size` x `tile_size` tiles that the VQ encodes and
    decodes one by one, so a code depends only on its own tile. A VQModel's GroupNorms (statistics
    over the whole image), mid-block attention and wide receptive field otherwise make every code
    depend on the whole image: on the Shapes demo removing one object changed 91% of the codes far
    from it, a code map a small LLM could not learn to draw.

    Example:

    ```python
    >>> import torch
    >>> from unifork_hf.modeling.configuration_unifork import DEFAULT_VQ_CONFIG
    >>> tokenizer = UniForkVQImageTokenizer(DEFAULT_VQ_CONFIG)
    >>> codes = tokenizer.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    >>> codes.shape, tokenizer.decode(codes).shape
    (torch.Size([2, 64]), torch.Size([2, 3, 32, 32]))

    ```
    """

    def __init__(self, vq_config: dict | None = None, vq_model: VQModel | None = None, tile_size: int | None = None):
        super().__init__()
        if (vq_config is None) == (vq_model is None):
            raise ValueError("Pass exactly one of `vq_config` (a VQModel config dict) or `vq_model` (a VQModel).")
        self.vq = vq_model if vq_model is not None else VQModel(**vq_config)
        if tile_size is not None and (tile_size < 1 or tile_size % self.downsampling_factor):
            raise ValueError(
                f"tile_size must be a positive multiple of the VQ downsampling factor {self.downsampling_factor}, "
                f"got {tile_size}."
            )
        self.tile_size = tile_size
        self.vq.requires_grad_(False)
        # Tell transformers' `post_init` that these weights are already initialised: its generic
        # init (normal(0.02) for convs and codebook) would otherwise overwrite a trained VQ.
        for module in self.vq.modules():
            module._is_hf_initialized = True

    @property
    def codebook_size(self) -> int:
        return self.vq.config.num_vq_embeddings

    @property
    def downsampling_factor(self) -> int:
        return vq_downsampling_factor(self.vq.config)

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors, `(codebook_size, vq_embed_dim)`."""
        return self.vq.quantize.embedding.weight

    def check_codes(self, codes: torch.Tensor, name: str = "image token ids") -> None:
        """Raise a `ValueError` naming `name` if any id is outside the codebook."""
        if codes.is_floating_point():
            raise TypeError(f"{name} must be integer code ids, got dtype {codes.dtype}.")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"{name} must be in 0..{self.codebook_size - 1} (the VQ codebook), "
                f"got values in {int(codes.min())}..{int(codes.max())}."
            )

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids `(...)` -> code vectors `(..., vq_embed_dim)` (the quantized latents)."""
        self.check_codes(codes)
        return nn.functional.embedding(codes, self.codebook)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [-1, 1] -> code ids `(B, h*w)`."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.vq.config.in_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.vq.config.in_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        step, what = (
            (self.tile_size, "tile size") if self.tile_size else (self.downsampling_factor, "downsampling factor")
        )
        if pixel_values.shape[-1] % step or pixel_values.shape[-2] % step:
            raise ValueError(
                f"pixel_values height and width must be multiples of the VQ {what} {step}, "
                f"got {tuple(pixel_values.shape[-2:])}."
            )
        batch, _, height, width = pixel_values.shape
        with float32_convolutions():
            latents = self.vq.encode(self.to_tiles(pixel_values.to(self.codebook.dtype), self.tile_size)).latents
        _, _, (_, _, indices) = self.vq.quantize(latents)
        factor = self.downsampling_factor
        grid = indices.reshape(latents.shape[0], 1, *latents.shape[-2:])
        return self.from_tiles(grid, batch, height // factor, width // factor).reshape(batch, -1)

    @staticmethod
    def to_tiles(grid: torch.Tensor, side: int | None) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B * H/side * W/side, C, side, side)`, tiles in row-major order."""
        if not side:
            return grid
        channels = grid.shape[1]
        return (
            grid.unfold(2, side, side).unfold(3, side, side).permute(0, 2, 3, 1, 4, 5).reshape(-1, channels, side, side)
        )

    @staticmethod
    def from_tiles(tiles: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
        """Inverse of `to_tiles`: `(B * tiles, C, s, s)` -> `(B, C, height, width)`."""
        if tiles.shape[-2:] == (height, width):  # one tile per image, or no tiling
            return tiles
        channels, side = tiles.shape[1], tiles.shape[-1]
        tiles = tiles.reshape(batch, height // side, width // side, channels, side, side)
        return tiles.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Code ids `(B, h*w)` -> images `(B, 3, H, W)` in [-1, 1] (square grid unless `grid_size`)."""
        if codes.ndim != 2:
            raise ValueError(f"image token ids must have shape (batch, h*w), got {tuple(codes.shape)}.")
        self.check_codes(codes)
        if grid_size is None:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"{codes.shape[1]} image tokens do not form a square grid; pass `grid_size`.")
            grid_size = (side, side)
        batch, (rows, columns) = codes.shape[0], grid_size
        codes_per_tile = self.tile_size // self.downsampling_factor if self.tile_size else None
        if codes_per_tile and (rows % codes_per_tile or columns % codes_per_tile):
            raise ValueError(f"grid_size {grid_size} must be a multiple of {codes_per_tile} codes (one VQ tile).")
        tiles = self.to_tiles(codes.reshape(batch, 1, rows, columns), codes_per_tile)
        latents = self.vq.quantize.get_codebook_entry(
            tiles.flatten(), (tiles.shape[0], *tiles.shape[-2:], self.codebook.shape[1])
        )
        images = self.vq.decode(latents, force_not_quantize=True).sample.clamp(-1, 1)
        factor = self.downsampling_factor
        return self.from_tiles(images, batch, rows * factor, columns * factor)


def image_tokenizer_from_config(vq_config: dict | None, rq_config: dict | None, vq_tile_size: int | None) -> nn.Module:
    """The image tokenizer a UniFork config's fields describe: the RQ tokenizer if it has an `rq_config`, else the VQ."""
    if rq_config is not None:
        from .rq_unifork import UniForkRQImageTokenizer

        return UniForkRQImageTokenizer(rq_config)
    return UniForkVQImageTokenizer(vq_config, tile_size=vq_tile_size)


def image_tokenizer_from_checkpoint(path, **hub_kwargs) -> nn.Module | None:
    """Load only the image tokenizer out of a UniFork checkpoint (its one copy of the tokenizer's weights), found
    by the tokenizer's own parameter names wherever the model keeps it.

    Returns None when `path` holds no UniFork model weights (e.g. a processor-only directory).
    """
    config_file = optional_file(path, CONFIG_NAME, hub_kwargs)
    config = {}
    if config_file is not None:
        with open(config_file) as f:
            config = json.load(f)
    weight_file = optional_file(path, SAFE_WEIGHTS_NAME, hub_kwargs)
    index_file = None if weight_file else optional_file(path, SAFE_WEIGHTS_INDEX_NAME, hub_kwargs)
    has_tokenizer = config.get("vq_config") is not None or config.get("rq_config") is not None
    if not has_tokenizer or (weight_file is None and index_file is None):
        return None
    tokenizer = image_tokenizer_from_config(
        config.get("vq_config"), config.get("rq_config"), config.get("vq_tile_size")
    )
    if weight_file is not None:
        with safe_open(weight_file, framework="pt") as weights:
            file_of = dict.fromkeys(weights.keys(), weight_file)
    else:
        with open(index_file) as f:
            file_of = {key: cached_file(path, shard, **hub_kwargs) for key, shard in json.load(f)["weight_map"].items()}
    anchor = next(iter(tokenizer.state_dict()))  # e.g. "vq.encoder.conv_in.weight"
    prefixes = {key.removesuffix(anchor) for key in file_of if key == anchor or key.endswith("." + anchor)}
    if len(prefixes) != 1:
        raise ValueError(f"Checkpoint {path!r} lacks the image tokenizer weights (*{anchor}, ...).")
    prefix = prefixes.pop()
    state = {}
    for file in sorted({file for key, file in file_of.items() if key.startswith(prefix)}):
        with safe_open(file, framework="pt") as weights:
            for key in weights.keys():
                if key.startswith(prefix):
                    state[key.removeprefix(prefix)] = weights.get_tensor(key)
    tokenizer.load_state_dict(state)
    return tokenizer
