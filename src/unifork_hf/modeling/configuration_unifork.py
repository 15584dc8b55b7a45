"""Configuration of UniFork, the Y-shaped unified model for image understanding and generation."""

import copy
import os

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

# A small configuration (tests, CPU experiments). The paper's is UNIFORK_BASE_RQ_CONFIG.
DEFAULT_RQ_CONFIG = {
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "vision_use_head": False,
    },
    "codebook_size": 256,
    "depth": 4,
    "latent_channels": 16,
    "block_out_channels": [32, 32, 64, 64],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 16,
}

# VILA-U's tokenizer as UniFork's configs/config.json sets it: SigLIP-large/16 (256 px position table) run for
# 23 of its 24 layers, 16,384 codes of 1024 dims shared by 4 depths, decoder ch 128 x [1, 1, 2, 2, 4], attention
# at the lowest resolution. UniFork feeds it 384 px images: 24 x 24 positions x 4 codes.
UNIFORK_BASE_RQ_CONFIG = {
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "image_size": 256,
        "patch_size": 16,
        "vision_use_head": False,
    },
    "codebook_size": 16384,
    "depth": 4,
    "latent_channels": 256,
    "block_out_channels": [128, 128, 256, 256, 512],
    "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}


PRESETS = {
    # The paper's model: Qwen2.5-0.5B split at K = L/2 = 12; VILA-U's RQ tokenizer on 384 px images (as the official
    # code runs it: 24x24 positions x 4 codes of 16,384); the official 6-block depth head.
    "unifork-base": {
        "text_config": _QWEN25_05B,
        "rq_config": UNIFORK_BASE_RQ_CONFIG,
        "image_size": 384,
        "depth_head_config": {"width": 896, "attention_width": 3584, "num_heads": 32, "num_layers": 6},
        "num_shared_layers": 12,
    },
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
# The same LLM with the small RQ tokenizer: 32 px images as 4x4 positions x 4 codes.
PRESETS["unifork-tiny-rq"] = {
    **{k: v for k, v in PRESETS["unifork-tiny"].items() if k != "vq_config"},
    "rq_config": DEFAULT_RQ_CONFIG,
}


# The RQ depth head's shape when `depth_head_config` leaves a key out: blocks as wide as the LLM, two of them.
# (The paper's head is 6 blocks with a 4x wider attention: see the unifork-base preset.)
def default_depth_head_config(text_config) -> dict:
    return {
        "width": text_config.hidden_size,
        "attention_width": text_config.hidden_size,
        "num_heads": text_config.num_attention_heads,
        "num_layers": 2,
    }


RQ_CONFIG_KEYS = ("vision_config", "codebook_size", "depth", "latent_channels", "block_out_channels", "up_block_types")


def vq_downsampling_factor(vq_config: dict) -> int:
    """Spatial downsampling of a diffusers `VQModel`: every encoder block but the last halves the size."""
    return 2 ** (len(vq_config["block_out_channels"]) - 1)


class MissingCheckpointError(OSError):
    """`from_pretrained` found no checkpoint under a name; says how to get a model."""


def _check_norm_groups(name: str, decoder_config: dict) -> None:
    """GroupNorm needs every level's channels to split into `norm_num_groups` groups (VQModel and the RQ decoder)."""
    groups = decoder_config.get("norm_num_groups", 32)
    if any(channels % groups for channels in decoder_config["block_out_channels"]):
        raise ValueError(
            f"{name}: every block_out_channels entry {decoder_config['block_out_channels']} must be a multiple "
            f"of norm_num_groups ({groups})."
        )


def missing_checkpoint_error(name, error: OSError) -> OSError:
    """What to do when `from_pretrained(name)` finds nothing: `name` is no local folder and not reachable on the Hub
    (a preset name such as "unifork-base", a typo, or offline)."""
    presets = " (a preset name: the architecture, not weights)" if str(name) in PRESETS else ""
    return MissingCheckpointError(
        f"{name!r}{presets} is neither a local folder nor a checkpoint reachable on the Hub ({error}).\n"
        "No official UniFork weights are published. Two ways to get a model:\n"
        "  1. build one from a pretrained LLM and an image tokenizer, the paper's way:\n"
        "     UniForkForConditionalGeneration.from_pretrained_llm('Qwen/Qwen2.5-0.5B', TOKENIZER_DIR) "
        "(or `unifork build --llm ... --vq ... --out DIR`), then train it;\n"
        "  2. convert a checkpoint trained with the official UniFork code (github tliby/UniFork):\n"
        "     `unifork convert --checkpoint DIR --out DIR` (unifork_hf.conversion.convert_official_checkpoint).\n"
        "An untrained model of a preset's architecture: "
        "UniForkForConditionalGeneration(UniForkConfig.from_preset('unifork-base'))."
    )


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
            Keyword arguments of the diffusers `VQModel` that tokenizes images: one code per position, predicted
            by a linear generation head. The default image tokenizer (`DEFAULT_VQ_CONFIG`) unless `rq_config`
            is given.
        rq_config (`dict`, *optional*):
            The paper's image tokenizer instead ([`UniForkRQImageTokenizer`]): SigLIP features, residual
            quantisation into `depth` codes per position over one shared codebook, a convolutional pixel
            decoder. Keys: `vision_config` (a `SiglipVisionConfig`'s), `codebook_size`, `depth`,
            `latent_channels`, `block_out_channels`, `up_block_types`, `layers_per_block`, `norm_num_groups`.
            Image ids are then `(num_images, num_image_tokens, depth)`, the LLM reads the sum of a position's
            code vectors, and the generation head is a [`UniForkDepthHead`].
        depth_head_config (`dict`, *optional*):
            With `rq_config`: the depth head's `width`, `attention_width`, `num_heads` and `num_layers`.
            Missing keys: the LLM's hidden size (both widths) and attention heads, 2 layers.
        image_depth_loss_weights (`list[float]`, *optional*):
            With `rq_config`: how a position's generation loss weighs its `depth` codes, normalised to sum to 1
            (a position still counts once). None (default): the plain mean over depth, as the official code's
            cross-entropy over all codes. Depth 0 decides most of the image (the deeper codes refine it), so
            weighing it more trades the deeper codes' fit for the first's: on Shapes, trained from scratch for 3000
            steps, `[9, 1, 1, 1]` drew 81.6% of test captions right, `[3, 1, 1, 1]` 52.8%, the plain mean 1.0%
            (`docs/rq-shapes/README.md`; `examples/shapes/train_unifork.py` defaults to `[9, 1, 1, 1]`, with which
            depth 4 drew as many right as depth 1 after 9000 steps).
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
    rq_config: dict | None = None
    depth_head_config: dict | None = None
    image_depth_loss_weights: list[int | float] | None = None
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

        if self.rq_config is not None:
            self._resolve_rq()
        else:
            for name in ("depth_head_config", "image_depth_loss_weights"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is for the RQ image tokenizer: pass rq_config too, or leave it out.")
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

    def _resolve_rq(self):
        """The RQ tokenizer's geometry and the depth head's shape, with the defaults filled in, checked."""
        if self.vq_config is not None:
            raise ValueError("Pass either vq_config (a VQModel) or rq_config (the RQ tokenizer), not both.")
        if self.vq_tile_size is not None:
            raise ValueError("vq_tile_size tiles a VQModel's input; the RQ tokenizer (rq_config) has no tiles.")
        if self.learn_image_code_embeddings:
            raise ValueError(
                "learn_image_code_embeddings is for a VQ's one code per position; with rq_config the LLM reads the "
                "sum of a position's code vectors, as the paper does."
            )
        rq = self.rq_config = dict(self.rq_config)
        missing = [key for key in RQ_CONFIG_KEYS if key not in rq]
        if missing:
            raise ValueError(f"rq_config lacks {missing} (see DEFAULT_RQ_CONFIG), got keys {sorted(rq)}.")
        vision = rq["vision_config"]
        vision = vision.to_dict() if hasattr(vision, "to_dict") else dict(vision)
        rq["vision_config"] = vision
        patch, hidden, heads = (
            vision.get("patch_size", 16),
            vision.get("hidden_size", 768),
            vision.get("num_attention_heads", 12),
        )
        if hidden % heads:
            raise ValueError(
                f"rq_config vision_config: hidden_size {hidden} must be a multiple of num_attention_heads {heads}."
            )
        if rq["depth"] < 1 or rq["codebook_size"] < 1:
            raise ValueError(
                f"rq_config: depth and codebook_size must be >= 1, got {rq['depth']} and {rq['codebook_size']}."
            )
        levels = len(rq["block_out_channels"])
        if len(rq["up_block_types"]) != levels or 2 ** (levels - 1) != patch:
            raise ValueError(
                f"rq_config: the decoder's {levels} levels (block_out_channels, up_block_types: {len(rq['up_block_types'])}) "
                f"must upsample x{patch}, the encoder's patch size: {patch.bit_length()} levels."
            )
        _check_norm_groups("rq_config", rq)
        if self.image_size is None:
            self.image_size = vision.get("image_size", 224)
        if self.image_size < patch or self.image_size % patch:
            raise ValueError(
                f"image_size must be a positive multiple of the RQ encoder's patch size {patch}, got {self.image_size}."
            )
        self._check_derived("image_grid_size", self.image_size // patch, f"image_size // {patch} (the patch size)")
        self._check_derived("codebook_size", rq["codebook_size"], "rq_config['codebook_size']")
        self._resolve_depth_head()
        weights = self.image_depth_loss_weights
        if weights is not None:
            weights = self.image_depth_loss_weights = [float(w) for w in weights]
            if len(weights) != rq["depth"] or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"image_depth_loss_weights must be {rq['depth']} non-negative numbers (one per depth code, "
                    f"rq_config['depth']) with a positive sum, got {weights}."
                )

    def _resolve_depth_head(self):
        text = self.text_config
        head = {**default_depth_head_config(text), **(self.depth_head_config or {})}
        unknown = sorted(set(head) - set(default_depth_head_config(text)))
        if unknown:
            raise ValueError(
                f"depth_head_config: unknown keys {unknown}; known: {sorted(default_depth_head_config(text))}."
            )
        if min(head.values()) < 1 or head["attention_width"] % head["num_heads"]:
            raise ValueError(
                f"depth_head_config: sizes must be positive and attention_width a multiple of num_heads, got {head}."
            )
        self.depth_head_config = head

    def _check_derived(self, name: str, expected: int, what: str):
        if getattr(self, name) is None:
            setattr(self, name, expected)
        if getattr(self, name) != expected:
            raise ValueError(f"{name} must be {what} = {expected}, got {getattr(self, name)}.")

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
        _check_norm_groups("vq_config", vq)
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
    def image_depth(self) -> int:
        """Codes per image position: the RQ tokenizer's depth, 1 for a VQ."""
        return self.rq_config["depth"] if self.rq_config is not None else 1

    @property
    def code_dim(self) -> int:
        """Width of a code vector, the image projector's input."""
        if self.rq_config is not None:
            return self.rq_config["vision_config"].get("hidden_size", 768)
        return self.vq_config["vq_embed_dim"]

    @property
    def num_branch_layers(self) -> int:
        """Depth of each branch of the Y: L - K."""
        return self.text_config.num_hidden_layers - self.num_shared_layers

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "UniForkConfig":
        """transformers' `from_pretrained`, with an error that says how to get a model when nothing is found."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as error:
            if os.path.isdir(str(pretrained_model_name_or_path)):
                raise
            raise missing_checkpoint_error(pretrained_model_name_or_path, error) from error

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UniForkConfig":
        """Build a config from a named preset; keyword arguments override its fields.

        Presets: `"unifork-base"` (the paper: Qwen2.5-0.5B geometry, K=12, VILA-U's RQ tokenizer on 384 px
        images as 24x24 positions x 4 codes of a 16,384-entry codebook, a 6-block depth head), `"unifork-tiny"`
        (a few MB, VQ tokenizer, for tests) and `"unifork-tiny-rq"` (the same with a small RQ tokenizer).

        Example:

        ```python
        >>> config = UniForkConfig.from_preset("unifork-base")
        >>> config.num_shared_layers, config.image_grid_size, config.image_depth, config.codebook_size
        (12, 24, 4, 16384)

        ```
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available: {sorted(PRESETS)}.")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["UniForkConfig"]
