"""The paper's image tokenizer: SigLIP features, residual quantisation over one shared codebook, a pixel decoder.

UniFork (as VILA-U before it) tokenizes an image with a SigLIP vision transformer cut one layer before its end,
quantises each patch feature with D rounds of nearest-neighbour residual quantisation (one codebook shared by
every depth: code d is the code vector nearest to what codes 0..d-1 left unexplained), and decodes the sum of the
D code vectors with a 1x1 conv and a taming-style convolutional decoder. The sum is also what the LLM sees of an
image, for both tasks. See docs/official/layout.md, section 1, for the official modules this mirrors.

Built from maintained parts: transformers' `SiglipVisionModel` (its bicubic `interpolate_pos_encoding` is the
official one for grids larger than the position table) and diffusers' VAE `Decoder` (the taming decoder's blocks:
`ResnetBlock2D`, single-head `Attention`, `Upsample2D`). The quantiser is the one part written here.
"""

import itertools

import torch
from diffusers.models.autoencoders.vae import Decoder
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from .configuration_unifork import DEFAULT_RQ_CONFIG, UNIFORK_BASE_RQ_CONFIG  # noqa: F401  (re-exported)


class UniForkRQImageTokenizer(nn.Module, PyTorchModelHubMixin, library_name="unifork-hf"):
    """Images <-> `(B, h*w, depth)` residual code ids.

    Images are `(B, 3, H, W)` in [-1, 1]; codes are int64, positions in row-major grid order, then depth. The
    features are the vision transformer's last layer output before its final norm: build it with the number of
    layers to run (`num_hidden_layers`: 23 for SigLIP-large's 24, as the official tokenizer uses).

    Example:

    ```python
    >>> import torch
    >>> tokenizer = UniForkRQImageTokenizer(DEFAULT_RQ_CONFIG)
    >>> codes = tokenizer.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    >>> codes.shape, tokenizer.decode(codes).shape, tokenizer.embed_codes(codes).shape
    (torch.Size([2, 16, 4]), torch.Size([2, 3, 32, 32]), torch.Size([2, 16, 64]))

    ```

    `save_pretrained(dir)` / `from_pretrained(dir)` (huggingface_hub's `PyTorchModelHubMixin`) store it on its own
    (`config.json` with the `rq_config`, `model.safetensors`), e.g. to build a UniFork from it with
    `UniForkForConditionalGeneration.from_pretrained_llm(llm, rq_tokenizer)`.
    """

    def __init__(self, rq_config: dict):
        super().__init__()
        config = self.rq_config = dict(rq_config)
        vision = SiglipVisionConfig(**config["vision_config"])
        self.depth = int(config["depth"])
        if self.depth < 1:
            raise ValueError(f"rq_config['depth'] must be >= 1, got {self.depth}.")
        if len(config["up_block_types"]) != len(config["block_out_channels"]):
            raise ValueError(
                f"rq_config: up_block_types ({len(config['up_block_types'])}) and block_out_channels "
                f"({len(config['block_out_channels'])}) must list the same decoder levels."
            )
        self.encoder = SiglipVisionModel(vision)
        self.codebook_embedding = nn.Embedding(config["codebook_size"], vision.hidden_size)
        self.post_quant_conv = nn.Conv2d(vision.hidden_size, config["latent_channels"], 1)
        self.decoder = Decoder(
            in_channels=config["latent_channels"],
            out_channels=3,
            up_block_types=tuple(config["up_block_types"]),
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"],
            norm_num_groups=config["norm_num_groups"],
        )
        upsampling = 2 ** (len(config["block_out_channels"]) - 1)
        if upsampling != vision.patch_size:
            raise ValueError(
                f"rq_config: the decoder upsamples x{upsampling} ({len(config['block_out_channels'])} levels) but the "
                f"encoder's patches are {vision.patch_size} px; they must agree."
            )
        self.requires_grad_(False)
        # Trained weights: transformers' initialisation must not redo them. It must still run on a module that owns
        # a non-persistent buffer (SigLIP's position ids): no checkpoint holds one, so from_pretrained leaves it as
        # allocated until that module's init makes it; the flagged weights beside it are left alone.
        for part in itertools.chain(self.parameters(), self.modules()):
            if not getattr(part, "_non_persistent_buffers_set", None):
                part._is_hf_initialized = True

    @property
    def codebook_size(self) -> int:
        return self.codebook_embedding.num_embeddings

    @property
    def downsampling_factor(self) -> int:
        return self.encoder.config.patch_size

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors, `(codebook_size, code_dim)`, shared by every depth."""
        return self.codebook_embedding.weight

    def check_codes(self, codes: torch.Tensor, name: str = "image token ids") -> None:
        """Raise naming `name` unless `codes` are integer ids in the codebook with `depth` codes per position."""
        if codes.is_floating_point():
            raise TypeError(f"{name} must be integer code ids, got dtype {codes.dtype}.")
        if codes.ndim < 1 or not 1 <= codes.shape[-1] <= self.depth:
            raise ValueError(
                f"{name} must end in a depth dimension of 1..{self.depth}, got shape {tuple(codes.shape)}."
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"{name} must be in 0..{self.codebook_size - 1} (the RQ codebook), "
                f"got values in {int(codes.min())}..{int(codes.max())}."
            )

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids `(..., d)` -> the sum of their `d` code vectors `(..., code_dim)`: the image as the LLM sees it,
        and the partial reconstruction of the first `d` depths."""
        self.check_codes(codes)
        return nn.functional.embedding(codes, self.codebook).sum(-2)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` -> patch features `(B, h*w, code_dim)`, before quantisation."""
        patch = self.downsampling_factor
        if (
            pixel_values.ndim != 4
            or pixel_values.shape[1] != 3
            or pixel_values.shape[-1] % patch + pixel_values.shape[-2] % patch
        ):
            raise ValueError(
                f"pixel_values must have shape (batch, 3, height, width) with sides multiples of {patch} (the patch), "
                f"got {tuple(pixel_values.shape)}."
            )
        pixel_values = pixel_values.to(self.codebook.dtype)
        if not self.encoder.config.num_hidden_layers:  # patch embeddings only: a code depends on its own patch
            return self.encoder.embeddings(pixel_values, interpolate_pos_encoding=True)
        output = self.encoder(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True)
        return output.hidden_states[-1]  # the last layer run, before post_layernorm (which the tokenizer skips)

    def quantize(self, features: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Residual quantisation: features `(..., code_dim)` -> code ids `(..., depth)`; at every depth the code
        vector nearest (squared L2) to what the previous codes left."""
        depth = self.depth if depth is None else depth
        codebook = self.codebook
        squared_norms = codebook.pow(2).sum(-1)
        residual, codes = features, []
        for _ in range(depth):
            distance = squared_norms - 2 * residual @ codebook.T  # + |residual|^2, the same for every code
            codes.append(distance.argmin(-1))
            residual = residual - codebook[codes[-1]]
        return torch.stack(codes, -1)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [-1, 1] -> code ids `(B, h*w, depth)`."""
        return self.quantize(self.features(pixel_values), depth)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Code ids `(B, h*w, d)` (any d <= depth: the first d depths) -> images `(B, 3, H, W)` in [-1, 1]."""
        if codes.ndim != 3:
            raise ValueError(f"image token ids must have shape (batch, h*w, depth), got {tuple(codes.shape)}.")
        if grid_size is None:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"{codes.shape[1]} image positions do not form a square grid; pass `grid_size`.")
            grid_size = (side, side)
        latents = self.embed_codes(codes).transpose(1, 2).reshape(codes.shape[0], -1, *grid_size)
        return self.decoder(self.post_quant_conv(latents))


__all__ = ["UniForkRQImageTokenizer", "DEFAULT_RQ_CONFIG", "UNIFORK_BASE_RQ_CONFIG"]
