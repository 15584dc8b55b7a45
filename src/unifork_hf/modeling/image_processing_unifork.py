"""Image processor of UniFork: RGB conversion, resize to the VQ's image size, scale to [-1, 1]."""

import base64
import os

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling


class UniForkImageProcessorPil(PilBackend):
    """Turns images (PIL, numpy or torch; any mode, grayscale and RGBA converted to RGB) into
    `pixel_values` of shape `(B, 3, size, size)` in [-1, 1], the input range of the VQ tokenizer.

    Example:

    ```python
    >>> from PIL import Image
    >>> processor = UniForkImageProcessorPil(size={"height": 32, "width": 32})
    >>> processor(Image.new("L", (64, 48)), return_tensors="pt").pixel_values.shape
    torch.Size([1, 3, 32, 32])

    ```
    """

    model_input_names = ["pixel_values"]
    size = {"height": 32, "width": 32}
    resample = PILImageResampling.BICUBIC
    do_resize = True
    do_rescale = True
    do_normalize = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_convert_rgb = True

    def preprocess(self, images, *args, **kwargs):
        check_image_types(images)
        return super().preprocess(images, *args, **kwargs)


def check_image_types(images) -> None:
    """Raise a `TypeError` naming the type of any image that is not PIL / numpy / torch / a path or URL, and a
    `ValueError` for an image without pixels (resizing one would give a blank image, not an error)."""
    flat = images if isinstance(images, (list, tuple)) else [images]
    flat = [image for item in flat for image in (item if isinstance(item, (list, tuple)) else [item])]
    if not flat:
        raise ValueError("images is empty: pass at least one image, or images=None for text alone.")
    for index, image in enumerate(flat):
        if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor, str)):
            raise TypeError(
                f"images must be PIL images, numpy arrays, torch tensors or paths/URLs, got {type(image).__name__}."
            )
        if isinstance(image, str) and not (
            image.startswith(("http://", "https://")) or os.path.isfile(image) or _is_base64(image)
        ):
            raise ValueError(
                f"images[{index}] is the string {image[:80]!r}, which is neither a file that exists, an "
                "http(s) URL nor base64 image data."
            )
        size = image.size if isinstance(image, PIL.Image.Image) else getattr(image, "shape", (1,))
        if 0 in tuple(size):
            raise ValueError(f"images[{index}] has no pixels (size {tuple(size)}): expected width and height > 0.")
        if isinstance(image, (np.ndarray, torch.Tensor)) and (
            image.ndim != 3 or not {image.shape[0], image.shape[-1]} & {1, 3, 4}
        ):
            raise ValueError(
                f"images[{index}] is an array of shape {tuple(image.shape)}: expected one image as "
                "(height, width, channels) or (channels, height, width) with 1, 3 or 4 channels."
            )


def _is_base64(text: str) -> bool:
    try:
        return bool(text) and bool(base64.b64decode(text.split(",")[-1], validate=True))
    except ValueError:
        return False


__all__ = ["UniForkImageProcessorPil"]
