"""Image processor of UniFork: RGB conversion, resize to the VQ's image size, scale to [-1, 1]."""

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
    for index, image in enumerate(flat):
        if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor, str)):
            raise TypeError(
                f"images must be PIL images, numpy arrays, torch tensors or paths/URLs, got {type(image).__name__}."
            )
        size = image.size if isinstance(image, PIL.Image.Image) else getattr(image, "shape", (1,))
        if 0 in tuple(size):
            raise ValueError(f"images[{index}] has no pixels (size {tuple(size)}): expected width and height > 0.")


__all__ = ["UniForkImageProcessorPil"]
