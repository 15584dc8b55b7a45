"""Bounded, seeded fuzzing of the argument space users touch most: every input either works or is refused
by this package with a ValueError / TypeError of its own, never a traceback from deep inside torch,
transformers or PIL."""

import math
import traceback

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
numbers = st.one_of(st.none(), st.integers(-3, 100), st.floats(allow_nan=True, allow_infinity=True), st.just("1.0"))


# Messages of transformers' own processor checks that already name the argument and the numbers.
CLEAR_LIBRARY_MESSAGES = (
    "number of <image> tokens in the prompts should be the same as the number of images",
    "but no images were passed",
    "you should probably activate truncation and/or padding",
)


def assert_ours(call):
    """Run `call`; an exception must be a ValueError/TypeError/NotImplementedError raised by unifork_hf (or one
    of transformers' clear processor checks)."""
    try:
        return call()
    except (ValueError, TypeError, NotImplementedError) as error:
        frames = traceback.extract_tb(error.__traceback__)
        clear = "unifork_hf" in frames[-1].filename or any(m in str(error) for m in CLEAR_LIBRARY_MESSAGES)
        assert clear, "".join(traceback.format_exception(error))
        return None


@FUZZ
@given(
    prompt=st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=3), st.integers(), st.none()),
    guidance_scale=numbers,
    temperature=numbers,
    top_k=numbers,
    top_p=numbers,
    num_images_per_prompt=st.one_of(st.integers(-1, 2), st.just(1.5)),
    max_batch_size=st.one_of(st.none(), st.integers(-1, 3), st.just(2.0)),
    jacobi_window=st.one_of(st.none(), st.integers(-1, 70)),
    output_type=st.sampled_from(["pil", "pt", "tokens", "np", None]),
    generator=st.sampled_from([None, 0, "seed", torch.Generator().manual_seed(0)]),
)
def test_generate_image_arguments(
    built_model,
    prompt,
    guidance_scale,
    temperature,
    top_k,
    top_p,
    num_images_per_prompt,
    max_batch_size,
    jacobi_window,
    output_type,
    generator,
):
    result = assert_ours(
        lambda: built_model.generate_image(
            prompt,
            guidance_scale=guidance_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            num_images_per_prompt=num_images_per_prompt,
            max_batch_size=max_batch_size,
            jacobi_window=jacobi_window,
            output_type=output_type,
            generator=generator,
            progress_bar=False,
        )
    )
    if result is not None:  # accepted: then the output is what was asked for
        count = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        assert len(result) == count
        if output_type == "tokens":
            assert result.shape == (count, built_model.config.num_image_tokens)
            assert 0 <= int(result.min()) and int(result.max()) < built_model.config.codebook_size
        if output_type == "pt":
            assert math.isfinite(float(result.sum())) and 0 <= float(result.min()) and float(result.max()) <= 1


def images():
    sizes = st.tuples(st.integers(0, 40), st.integers(0, 40))
    pil = st.builds(
        lambda size, mode: Image.new(mode, size), sizes, st.sampled_from(["RGB", "L", "RGBA", "LA", "P", "1", "I", "F"])
    )
    arrays = st.builds(
        lambda shape, dtype: np.zeros(shape, dtype=dtype),
        st.sampled_from([(8, 8), (8, 8, 3), (8, 8, 4), (3, 8, 8), (8, 8, 1), (0, 8, 3), (8, 8, 5), (2, 8, 8, 3)]),
        st.sampled_from([np.uint8, np.float32, np.int64, bool]),
    )
    tensors = st.builds(
        lambda shape: torch.zeros(shape), st.sampled_from([(3, 8, 8), (8, 8, 3), (1, 3, 8, 8), (5, 8, 8)])
    )
    return st.one_of(pil, arrays, tensors, st.integers(), st.text(max_size=5))


@FUZZ
@given(
    image_list=st.one_of(images(), st.lists(images(), max_size=3)),
    text=st.one_of(
        st.none(),
        st.text(max_size=20),
        st.lists(st.sampled_from(["<image>", "a <image> b", "no image", ""]), max_size=3),
    ),
)
def test_processor_inputs(built_model, image_list, text):
    processor = built_model.processor
    batch = assert_ours(lambda: processor(images=image_list, text=text, return_tensors="pt"))
    if batch is not None and "pixel_values" in batch:
        pixels = batch["pixel_values"]
        assert pixels.shape[1:] == (3, 32, 32) and torch.isfinite(pixels).all() and pixels.abs().max() <= 1
