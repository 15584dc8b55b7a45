"""UniFork as a diffusers pipeline: `UniForkPipeline.from_pretrained(DIR)(prompt).images`.

diffusers already wraps an autoregressive image model the same way (`GlmImagePipeline`): one component,
the transformers model, sampled code by code instead of denoised step by step.
"""

import os
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from ..modeling.modeling_unifork import UniForkForConditionalGeneration


class UniForkPipeline(DiffusionPipeline):
    """Text -> image with a UniFork checkpoint, the diffusers way.

    The one component, `model`, is a [`UniForkForConditionalGeneration`] with its processor attached; its
    `generation_config.image_generation` holds the checkpoint's sampling settings, used for every argument
    left as None.

    Example:

    ```python
    >>> import torch, unifork_hf
    >>> from unifork_hf import UniForkPipeline
    >>> from unifork_hf.evaluation import detect
    >>> pipe = UniForkPipeline.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
    >>> image = pipe("a large red circle at the top left", generator=torch.Generator().manual_seed(0)).images[0]
    >>> detect(image)
    [{'colour': 'red', 'shape': 'circle', 'size': 'large', 'position': 'top left'}]

    ```
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model: UniForkForConditionalGeneration):
        super().__init__()
        self.register_modules(model=model)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A pipeline saved by `save_pretrained` (a `model_index.json` and a `model/` folder), or any UniFork
        checkpoint folder (as `UniForkForConditionalGeneration.save_pretrained` writes it) wrapped as one."""
        if os.path.isdir(pretrained_model_name_or_path) and not os.path.exists(
            os.path.join(pretrained_model_name_or_path, "model_index.json")
        ):
            dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
            model = UniForkForConditionalGeneration.from_pretrained(
                pretrained_model_name_or_path, dtype=dtype, **kwargs
            )
            return cls(model=model)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("codes",),
    ):
        """Generate images for `prompt`. The arguments are `generate_image`'s (see there), plus diffusers':

        Args:
            output_type: `"pil"`, `"np"` (`(N, H, W, 3)` floats in [0, 1]), `"pt"` (`(N, 3, H, W)` in [0, 1])
                or `"latent"` (the VQ code ids `(N, num_image_tokens)`).
            return_dict: an `ImagePipelineOutput` (`.images`), else a tuple of the images.
            callback_on_step_end: called after every decoding step as
                `callback_on_step_end(pipe, step, None, {"codes": codes})` with the codes sampled so far
                `(N, step + 1)`; it returns a dict (ignored here: codes already sampled stay as they are).
                Setting `pipe._interrupt = True` in it stops generation with a `RuntimeError`.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        if set(callback_on_step_end_tensor_inputs) - {"codes"}:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs can only hold 'codes', got {callback_on_step_end_tensor_inputs}."
            )
        self._interrupt = False
        hook = getattr(self.model, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            # model CPU offload moves the model when its forward is called; generation runs its parts instead
            hook.pre_forward(self.model)
        on_step = None
        if callback_on_step_end is not None:

            def on_step(step: int, codes: torch.Tensor) -> None:
                callback_on_step_end(self, step, None, {"codes": codes})
                if self._interrupt:
                    raise RuntimeError(f"Generation interrupted by callback_on_step_end at step {step}.")

        images = self.model.generate_image(
            prompt,
            negative_prompt=negative_prompt,
            guidance_scale=guidance_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            output_type={"latent": "tokens", "np": "pt"}.get(output_type, output_type),
            progress_bar=getattr(self, "_progress_bar_config", {}).get("disable") is not True,
            callback=on_step,
        )
        self.maybe_free_model_hooks()
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


__all__ = ["UniForkPipeline"]
