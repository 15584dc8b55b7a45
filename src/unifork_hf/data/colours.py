"""A small learnable dataset of flat-coloured images, for smoke-training both tasks (`unifork train` recipes,
the tests); the Shapes benchmark (`unifork_hf.data.shapes`) is the real one."""

import random

import PIL.Image
from datasets import Dataset


def colour_dataset(num_rows: int = 128, image_size: int = 32, seed: int = 0) -> dict[str, Dataset]:
    """A small learnable dataset for smoke-training both tasks: flat-coloured images.

    Returns `{"understanding": Dataset(images, messages), "generation": Dataset(image, caption)}`; the
    question asks for the colour, the caption names it. (The shapes benchmark is the real one.)
    """
    colours = {
        "red": (220, 30, 30),
        "green": (30, 180, 60),
        "blue": (40, 60, 220),
        "yellow": (240, 220, 40),
        "purple": (140, 50, 170),
        "orange": (250, 140, 20),
    }
    rng = random.Random(seed)
    names = [rng.choice(sorted(colours)) for _ in range(num_rows)]
    images = [PIL.Image.new("RGB", (image_size, image_size), colours[name]) for name in names]
    understanding = Dataset.from_dict(
        {
            "images": [[image] for image in images],
            "messages": [
                [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": name}]},
                ]
                for name in names
            ],
        }
    )
    generation = Dataset.from_dict({"image": images, "caption": [f"a {name} square" for name in names]})
    return {"understanding": understanding, "generation": generation}
