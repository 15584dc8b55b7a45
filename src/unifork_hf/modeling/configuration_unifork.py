"""Configuration of UniFork, the Y-shaped unified model for image understanding and generation."""

import copy

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The small VQ image tokenizer used when no `vq_config` is given: 32x32 images -> 8x8 codes.
DEFAULT_VQ_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 32,
    "num_vq_embeddings": 512,
    "vq_embed_dim": 32,
    "norm_num_groups": 8,
    "sample_size": 32,
}

# Qwen2.5-0.5B geometry, the LLM of the paper.
_QWEN25_05B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": True,
}

# A LlamaGen-style VQGAN: 256 px images, downsampling 16 -> 16x16 codes, 16384-entry codebook of dim 8.
_VQ_256_F16 = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "block_out_channels": [128, 128, 256, 256, 512],
    "layers_per_block": 2,
    "latent_channels": 256,
    "num_vq_embeddings": 16384,
    "vq_embed_dim": 8,
    "norm_num_groups": 32,
    "sample_size": 256,
}

PRESETS = {
    # The paper's model: Qwen2.5-0.5B split at K = L/2 = 12, 256 px images as 16x16 codes.
    "unifork-base": {"text_config": _QWEN25_05B, "vq_config": _VQ_256_F16, "num_shared_layers": 12},
    # A few MB: for tests and quick experiments.
    "unifork-tiny": {
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
        },
        "vq_config": {**DEFAULT_VQ_CONFIG, "num_vq_embeddings": 64, "vq_embed_dim": 8, "latent_channels": 8},
        "num_shared_layers": 2,
    },
}


def vq_downsampling_factor(vq_config: dict) -> int:
    """Spatial downsampling of a diffusers `VQModel`: every encoder block but the last halves the size."""
    return 2 ** (len(vq_config["block_out_channels"]) - 1)


@strict
class UniForkConfig(PreTrainedConfig):
    r"""
    Configuration of a [`UniForkForConditionalGeneration`]: a decoder-only LLM whose first
    `num_shared_layers` (K) layers are shared by both tasks, and whose remaining L-K layers exist
    twice: once for understanding (text head) and once for generation (head over VQ codes).

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the decoder-only LLM (Qwen2, Llama, ...). Defaults to a Qwen2 config.
        vq_config (`dict`, *optional*):
            Keyword arguments of the diffusers `VQModel` that tokenizes images.
        num_shared_layers (`int`, *optional*):
            K, the fork point, in 0..L. Defaults to L // 2. K = L is a fully shared model, K = 0 two
            task-specific stacks that share only the embeddings.
        vq_tile_size (`int`, *optional*):
            Tokenize images tile by tile: the VQ encodes (and decodes) each `vq_tile_size` x
            `vq_tile_size` tile on its own, so a code depends only on its tile. A multiple of the VQ's
            downsampling factor that divides `image_size`; None (default) encodes whole images.
        image_size (`int`, *optional*):
            Side of the (square) images. Defaults to the VQ config's `sample_size`.
        image_grid_size (`int`, *optional*):
            Side of the code grid; an image is `image_grid_size**2` tokens. Defaults to
            `image_size // downsampling factor of the VQ`.
        codebook_size (`int`, *optional*):
            Number of VQ codes, the size of the generation head. Defaults to the VQ's `num_vq_embeddings`.
        projector_hidden_size (`int`, *optional*):
            Hidden width of the image projector (VQ latent -> Linear -> GELU -> Linear). Defaults to the LLM's.
        projector_hidden_act (`str`, defaults to `"gelu"`):
            Activation of the image projector.
        learn_image_code_embeddings (`bool`, defaults to `False`):
            Add a trainable per-code embedding table (`image_projector.code_embeddings`, zero at
            initialisation) to the projected VQ code vectors. The paper feeds only the projection;
            the table is meant for VQs whose code vectors carry little meaning, e.g. a small VQ trained
            from scratch (the Shapes demo; there it lowered the generation loss early in training and
            ended about level, see the README). Decoding still uses the VQ codebook.
        learn_image_position_embeddings (`bool`, defaults to `False`):
            Add a trainable table of one embedding per place in the code grid
            (`image_projector.position_embeddings`, zero at initialisation) to the image tokens. The
            LLM's 1-D rotary positions give only distances between tokens; the paper's understanding
            encoder (SigLIP) brings its own 2-D position embeddings, which a VQ's codes lack. For
            models trained from scratch, such as the Shapes demo.
        image_token_id, boi_token_id, eoi_token_id (`int`, *optional*):
            Text-vocabulary ids of the image placeholder, begin-of-image and end-of-image tokens.

    Example:

    ```python
    >>> from unifork_hf import UniForkConfig
    >>> config = UniForkConfig.from_preset("unifork-tiny")
    >>> config.num_shared_layers, config.text_config.num_hidden_layers, config.num_image_tokens
    (2, 4, 64)

    ```
    """

    model_type = "unifork"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: dict | PreTrainedConfig | None = None
    vq_config: dict | None = None
    num_shared_layers: int | None = None
    vq_tile_size: int | None = None
    image_size: int | None = None
    image_grid_size: int | None = None
    codebook_size: int | None = None
    projector_hidden_size: int | None = None
    projector_hidden_act: str = "gelu"
    learn_image_code_embeddings: bool = False
    learn_image_position_embeddings: bool = False
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text = self.text_config
        if getattr(text, "is_encoder_decoder", False):
            raise ValueError(
                f"text_config: UniFork forks a decoder-only LLM, got an encoder-decoder config ({text.model_type!r})."
            )
        num_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(
                f"text_config: cannot fork a {text.model_type!r} config without a positive `num_hidden_layers` "
                f"(got {num_layers!r})."
            )
        if self.num_shared_layers is None:
            self.num_shared_layers = num_layers // 2
        if not 0 <= self.num_shared_layers <= num_layers:
            raise ValueError(
                f"num_shared_layers must be in 0..{num_layers} (the LLM's num_hidden_layers), "
                f"got {self.num_shared_layers}."
            )
        # Follow the LLM: e.g. Qwen2.5-0.5B ties its LM head to the input embeddings.
        if text.tie_word_embeddings:
            self.tie_word_embeddings = True

        self.vq_config = {k: v for k, v in (self.vq_config or DEFAULT_VQ_CONFIG).items() if not k.startswith("_")}
        self._resolve_image_geometry()
        self._check_shapes_divide()
        if self.projector_hidden_size is None:
            self.projector_hidden_size = text.hidden_size
        if self.projector_hidden_size < 1:
            raise ValueError(f"projector_hidden_size must be positive, got {self.projector_hidden_size}.")
        for name in ("image_token_id", "boi_token_id", "eoi_token_id"):
            token_id = getattr(self, name)
            if token_id is not None and not 0 <= token_id < text.vocab_size:
                raise ValueError(f"{name} must be in 0..{text.vocab_size - 1} (the text vocabulary), got {token_id}.")

    def _resolve_image_geometry(self):
        """Image size, VQ tile, code grid and codebook size: the defaults the VQ implies, and checks that they agree."""
        vq = self.vq_config
        for key in ("block_out_channels", "num_vq_embeddings", "vq_embed_dim"):
            if key not in vq:
                raise ValueError(f"vq_config must contain {key!r} (a diffusers VQModel config), got keys {sorted(vq)}.")
        factor = vq_downsampling_factor(vq)
        if self.image_size is None:
            self.image_size = vq.get("sample_size", 32)
        if self.image_size < factor or self.image_size % factor:
            raise ValueError(
                f"image_size must be a positive multiple of the VQ downsampling factor {factor}, got {self.image_size}."
            )
        if self.vq_tile_size is not None and (
            self.vq_tile_size < 1 or self.vq_tile_size % factor or self.image_size % self.vq_tile_size
        ):
            raise ValueError(
                f"vq_tile_size must be a positive multiple of the VQ downsampling factor {factor} that divides "
                f"image_size {self.image_size}, got {self.vq_tile_size}."
            )
        expected_grid = self.image_size // factor
        if self.image_grid_size is None:
            self.image_grid_size = expected_grid
        if self.image_grid_size != expected_grid:
            raise ValueError(
                f"image_grid_size must be image_size // {factor} = {expected_grid} for this VQ, "
                f"got {self.image_grid_size}."
            )
        if self.codebook_size is None:
            self.codebook_size = vq["num_vq_embeddings"]
        if self.codebook_size != vq["num_vq_embeddings"]:
            raise ValueError(
                f"codebook_size must equal vq_config['num_vq_embeddings'] = {vq['num_vq_embeddings']}, "
                f"got {self.codebook_size}."
            )

    def _check_shapes_divide(self):
        """What torch or diffusers would otherwise reject deep inside a forward, with a shape error."""
        from transformers.activations import ACT2FN

        text, vq = self.text_config, self.vq_config
        heads, kv_heads = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
        if heads and kv_heads and heads % kv_heads:
            raise ValueError(
                f"text_config: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})."
            )
        if vq["num_vq_embeddings"] < 1 or vq["vq_embed_dim"] < 1:
            raise ValueError(
                f"vq_config: num_vq_embeddings and vq_embed_dim must be positive, got "
                f"{vq['num_vq_embeddings']} and {vq['vq_embed_dim']}."
            )
        groups = vq.get("norm_num_groups", 32)
        if any(channels % groups for channels in vq["block_out_channels"]):
            raise ValueError(
                f"vq_config: every block_out_channels entry {vq['block_out_channels']} must be a multiple "
                f"of norm_num_groups ({groups})."
            )
        for where, name in (
            ("projector_hidden_act", self.projector_hidden_act),
            ("vq_config act_fn", vq.get("act_fn", "silu")),
            ("text_config hidden_act", getattr(text, "hidden_act", "silu")),
        ):
            if name not in ACT2FN:
                raise ValueError(f"{where} {name!r} is not an activation transformers knows; e.g. 'silu', 'gelu'.")

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image: the side of the code grid, squared."""
        return self.image_grid_size**2

    @property
    def num_branch_layers(self) -> int:
        """Depth of each branch of the Y: L - K."""
        return self.text_config.num_hidden_layers - self.num_shared_layers

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UniForkConfig":
        """Build a config from a named preset; keyword arguments override its fields.

        Presets: `"unifork-base"` (the paper: Qwen2.5-0.5B geometry, K=12, 256 px images as
        16x16 codes of a 16384-entry codebook) and `"unifork-tiny"` (a few MB, for tests).

        Example:

        ```python
        >>> config = UniForkConfig.from_preset("unifork-base")
        >>> config.num_shared_layers, config.image_grid_size, config.codebook_size
        (12, 16, 16384)

        ```
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available: {sorted(PRESETS)}.")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["UniForkConfig"]
