"""Is the model drawing new images or copying its training set? A nearest-neighbour report.

A small model trained long on a small image set learns to reproduce its training images: the loss on them
keeps falling while the images it draws for a prompt become copies. Each generated image's pixel distance
to its nearest training image is compared with the same distance for real images the model never saw (a
held-out split): those set the scale of "close" for this dataset.
"""

import warnings

import numpy as np
import torch


def _pixels(images, size) -> torch.Tensor:
    """PIL images -> `(N, H*W*3)` float tensor in [0, 1], resized to `size` where they differ."""
    arrays = [
        np.asarray(image.convert("RGB").resize(size) if image.size != size else image.convert("RGB"))
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).float().flatten(1) / 255


def nearest_training_distances(images, training_images) -> torch.Tensor:
    """Each image's RMS pixel distance (pixels in [0, 1]) to its nearest training image."""
    training_images = list(training_images)
    if not training_images:
        raise ValueError("training_images is empty.")
    size = training_images[0].size
    train = _pixels(training_images, size)
    query = _pixels(list(images), size)
    return torch.cat([torch.cdist(part, train).min(dim=1).values for part in query.split(256)]) / train.shape[1] ** 0.5


def copy_report(generated, training_images, reference_images, quantile: float = 0.05, warn: bool = True) -> dict:
    """Nearest-training-image distances of `generated` images against those of `reference_images` (real
    images not trained on, e.g. the test split).

    A generated image closer to a training image than all but a `quantile` of the reference images are counts
    as a copy; for images as new as the reference ones about `quantile` of them would. Warns when more than
    twice that share are copies.

    Returns `{"generated_median", "reference_median", "copy_threshold", "copy_share", "expected_share",
    "copies"}` (distances are RMS pixel distances in [0, 1]; `copies` lists the indices of the copies).

    Example:

    ```python
    >>> from PIL import Image
    >>> from unifork_hf.evaluation import copy_report
    >>> train = [Image.new("RGB", (8, 8), (v, v, v)) for v in range(0, 250, 10)]
    >>> held_out = [Image.new("RGB", (8, 8), (v + 5, v + 5, v + 5)) for v in range(0, 250, 10)]
    >>> report = copy_report(train[:4], train, held_out, warn=False)  # drawing training images back
    >>> report["copy_share"], report["copies"]
    (1.0, [0, 1, 2, 3])

    ```
    """
    generated = list(generated)
    if not generated:
        raise ValueError("generated is empty.")
    if not 0 < quantile < 0.5:
        raise ValueError(f"quantile must be in (0, 0.5), got {quantile}.")
    ours = nearest_training_distances(generated, training_images)
    theirs = nearest_training_distances(reference_images, training_images)
    threshold = torch.quantile(theirs, quantile).item()
    copies = (ours < threshold).nonzero().squeeze(1).tolist()
    report = {
        "generated_median": round(ours.median().item(), 4),
        "reference_median": round(theirs.median().item(), 4),
        "copy_threshold": round(threshold, 4),
        "copy_share": round(len(copies) / len(generated), 4),
        "expected_share": quantile,
        "copies": copies,
    }
    if warn and report["copy_share"] > 2 * quantile:
        warnings.warn(
            f"{report['copy_share']:.0%} of the generated images are near-copies of training images (closer to one "
            f"than {1 - quantile:.0%} of the held-out images are; about {quantile:.0%} expected): the model may be "
            "memorising its training set. Select an earlier checkpoint by eval loss, stop early, or sample "
            "with a higher temperature.",
            stacklevel=2,
        )
    return report


__all__ = ["copy_report", "nearest_training_distances"]
