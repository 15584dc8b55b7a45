"""Data for UniFork training: `datasets` tables -> tokenized rows of both tasks -> one mixed dataset.

    understanding rows  {"images": [PIL, ...], "messages": [chat turns]}   loss on the assistant's replies
    generation rows     {"image": PIL, "caption": str}                     loss on every image token

`prepare_understanding` / `prepare_generation` tokenize the text once (`Dataset.map`), giving both
tasks the same columns, so `mix_tasks` can interleave them with sampling ratios; `pretokenize_images`
optionally replaces the images by their VQ codes once, so epochs do not re-encode images. All of it
works on `Dataset` and streaming `IterableDataset` alike. Batches are made by `collator.py`.

Example:

```python
>>> import unifork_hf
>>> from unifork_hf import UniForkForConditionalGeneration
>>> from unifork_hf.training import UniForkDataCollator, colour_dataset, mix_tasks, prepare_generation, prepare_understanding
>>> model = UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
>>> processor = model.processor
>>> parts = colour_dataset(8)  # chat rows ("What colour is it?") and caption rows ("a red square")
>>> und = prepare_understanding(parts["understanding"], processor)
>>> gen = prepare_generation(parts["generation"], processor)
>>> train = mix_tasks(und, gen, generation_ratio=0.5)
>>> batch = UniForkDataCollator(processor)([train[0], train[1]])
>>> sorted(batch), batch["task"].tolist()  # task 0: understanding, 1: generation
(['attention_mask', 'input_ids', 'labels', 'pixel_values', 'task'], [1, 0])
>>> float(model(**batch).loss) > 0
True

```
"""

import hashlib

import PIL.Image
import torch
from datasets import Dataset, Features, Image, List, Value, interleave_datasets

from ..modeling.routing_unifork import GENERATION, UNDERSTANDING

# The columns every prepared row has, whatever its task.
PREPARED_FEATURES = Features(
    {
        "task": Value("int64"),
        "input_ids": List(Value("int64")),
        "labels": List(Value("int64")),
        "prompt_length": Value("int64"),  # generation: tokens before the image, swapped out by CFG dropout
        "row": Value("int64"),  # index in the source dataset: names bad rows, keys the CFG-dropout draw
        "images": List(Image()),
    }
)


def _bad_row(column: str, index, expected: str, value) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ValueError(f"Row {index}: column {column!r} must be {expected}, got {shown}.")


def _check_image(value, column: str, index):
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):  # undecoded datasets Image
        return value
    raise _bad_row(column, index, "an image", value)


def _map(dataset, function, features, remove_columns, desc):
    kwargs = dict(with_indices=True, features=features, remove_columns=remove_columns)
    if isinstance(dataset, Dataset):
        kwargs["desc"] = desc
    return dataset.map(function, **kwargs)


def _columns(dataset, required: tuple, kind: str) -> list:
    """The dataset's columns, checked to hold `required`."""
    columns = dataset.column_names
    if columns is None:  # streaming datasets may not know their columns before the first row
        columns = list(next(iter(dataset)).keys())
    for column in required:
        if column not in columns:
            raise ValueError(f"{kind} dataset has no column {column!r} (columns: {columns}).")
    return columns


def prepare_understanding(dataset, processor, messages_column: str = "messages", images_column: str = "images"):
    """Tokenize chat rows (`messages` with `{"type": "image"}` items, and their `images`) for understanding.

    Labels keep the assistant's replies (and their end-of-text) only: the template's `{% generation %}`
    blocks, found by transformers' `return_assistant_tokens_mask`.
    """
    columns = _columns(dataset, (messages_column, images_column), "Understanding")

    def tokenize(row, index):
        messages = row[messages_column]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _bad_row(messages_column, index, "a non-empty list of {'role', 'content'} messages", messages)
        if not any(m.get("role") == "assistant" for m in messages):
            raise _bad_row(messages_column, index, "a conversation with at least one assistant reply", messages)
        images = row[images_column] if row[images_column] is not None else []
        if not isinstance(images, list):
            images = [images]
        images = [_check_image(image, images_column, index) for image in images]
        placeholders = sum(
            1
            for m in messages
            if isinstance(m.get("content"), list)
            for item in m["content"]
            if isinstance(item, dict) and item.get("type") == "image"
        )
        if placeholders != len(images):
            raise _bad_row(
                messages_column, index, f"a conversation with one image item per image ({len(images)})", messages
            )
        try:
            out = processor.apply_chat_template(
                messages,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                processor_kwargs={"images": images} if images else {},
            )
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"Row {index}: column {messages_column!r} could not be tokenized: {error}") from error
        input_ids = list(out["input_ids"][0])
        mask = list(out["assistant_masks"][0])
        labels = [token if keep else -100 for token, keep in zip(input_ids, mask)]
        return {
            "task": UNDERSTANDING,
            "input_ids": input_ids,
            "labels": labels,
            "prompt_length": 0,
            "row": index,
            "images": images,
        }

    return _map(dataset, tokenize, PREPARED_FEATURES, columns, "Tokenizing understanding rows")


def prepare_generation(dataset, processor, caption_column: str = "caption", image_column: str = "image"):
    """Tokenize caption -> image rows for generation: the image-generation prompt, then every image token.

    Labels mark all image positions (the model puts each position's VQ code there); nothing else is trained.
    """
    columns = _columns(dataset, (caption_column, image_column), "Generation")

    def tokenize(row, index):
        caption = row[caption_column]
        if not isinstance(caption, str):
            raise _bad_row(caption_column, index, "a string", caption)
        image = _check_image(row[image_column], image_column, index)
        text = processor.image_generation_sequence(caption)
        input_ids = processor.tokenizer(text, add_special_tokens=False).input_ids
        if input_ids.count(processor.image_token_id) != processor.image_seq_length:
            raise _bad_row(caption_column, index, f"a caption without {processor.image_token!r}", caption)
        prompt_length = input_ids.index(processor.image_token_id)  # the prompt ends with <begin_of_image>
        # the image positions are trained (the collator's labels put each one's VQ code there); not the end marker
        labels = [token if token == processor.image_token_id else -100 for token in input_ids]
        return {
            "task": GENERATION,
            "input_ids": input_ids,
            "labels": labels,
            "prompt_length": prompt_length,
            "row": index,
            "images": [image],
        }

    return _map(dataset, tokenize, PREPARED_FEATURES, columns, "Tokenizing generation rows")


def mix_tasks(understanding, generation, generation_ratio: float = 0.5, seed: int = 0):
    """Interleave prepared understanding and generation rows, drawing a generation row with
    probability `generation_ratio` (until both are exhausted: the smaller one is cycled)."""
    if not 0 <= generation_ratio <= 1:
        raise ValueError(f"generation_ratio must be in [0, 1], got {generation_ratio}.")
    if generation_ratio in (0, 1):
        return generation if generation_ratio == 1 else understanding
    # (an interleaved Dataset is ordered by its draw; UniForkTrainer's default sampler re-orders it so that
    # each batch holds both tasks in proportion)
    return interleave_datasets(
        [understanding, generation],
        probabilities=[1 - generation_ratio, generation_ratio],
        seed=seed,
        stopping_strategy="all_exhausted",
    )


def pretokenize_images(dataset, processor, batch_size: int = 64):
    """Replace the `images` column of prepared rows by `image_ids` (the image tokenizer's codes), computed once.

    On a `Dataset` the result is an Arrow table (cached on disk when the dataset is), fingerprinted by
    all the VQ's weights, its tile size and the image processing, so a changed tokenizer never reuses stale codes.
    """
    image_tokenizer = processor.require_image_tokenizer()
    codes_per_image = List(Value("int64"))  # a VQ's one code per position; the RQ tokenizer's `depth` codes
    if getattr(image_tokenizer, "depth", None) is not None:
        codes_per_image = List(codes_per_image)
    features = Features(
        {**{k: v for k, v in PREPARED_FEATURES.items() if k != "images"}, "image_ids": List(codes_per_image)}
    )

    def encode(batch):
        # Rows often share images (several questions about one picture): encode each distinct one once.
        keys = [[(image.size, image.mode, image.tobytes()) for image in images] for images in batch["images"]]
        distinct = {}
        for images, row_keys in zip(batch["images"], keys):
            for image, key in zip(images, row_keys):
                distinct.setdefault(key, image)
        codes = dict(zip(distinct, processor.encode_images(list(distinct.values())).tolist())) if distinct else {}
        return {"image_ids": [[codes[key] for key in row_keys] for row_keys in keys]}

    kwargs = dict(batched=True, batch_size=batch_size, features=features, remove_columns=["images"])
    if isinstance(dataset, Dataset):
        # Everything the codes depend on: all the tokenizer's weights and buffers (the encoder as much as the codebook),
        # the tile size (the same weights give other codes with and without tiling), the image processing.
        digest = hashlib.sha256(
            f"tile{getattr(image_tokenizer, 'tile_size', None)}-{processor.image_processor.to_json_string()}".encode()
        )
        for name, tensor in sorted(image_tokenizer.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        fingerprint = f"{dataset._fingerprint}-vq-{digest.hexdigest()[:16]}"
        kwargs.update(desc="Encoding images", new_fingerprint=fingerprint)
    return dataset.map(encode, **kwargs)
