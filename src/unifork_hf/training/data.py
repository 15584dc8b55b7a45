"""Data for UniFork training: `datasets` tables -> tokenized rows of both tasks -> mixed, padded batches.

    understanding rows  {"images": [PIL, ...], "messages": [chat turns]}   loss on the assistant's replies
    generation rows     {"image": PIL, "caption": str}                     loss on every image token

`prepare_understanding` / `prepare_generation` tokenize the text once (`Dataset.map`), giving both
tasks the same columns, so `mix_tasks` can interleave them with sampling ratios; `pretokenize_images`
optionally replaces the images by their VQ codes once, so epochs do not re-encode images. All of it
works on `Dataset` and streaming `IterableDataset` alike. `UniForkDataCollator` pads a list of rows
into one batch for the model's per-sample task routing, with classifier-free-guidance prompt dropout;
`TaskStratifiedSampler` orders rows so that every batch holds each task in proportion.

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
import random
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from datasets import Dataset, Features, Image, List, Value, interleave_datasets

from ..modeling.modeling_unifork import GENERATION, UNDERSTANDING


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


def _columns(dataset):
    columns = dataset.column_names
    if columns is None:  # streaming datasets may not know their columns before the first row
        columns = list(next(iter(dataset)).keys())
    return columns


def prepare_understanding(dataset, processor, messages_column: str = "messages", images_column: str = "images"):
    """Tokenize chat rows (`messages` with `{"type": "image"}` items, and their `images`) for understanding.

    Labels keep the assistant's replies (and their end-of-text) only: the template's `{% generation %}`
    blocks, found by transformers' `return_assistant_tokens_mask`.
    """
    columns = _columns(dataset)
    for column in (messages_column, images_column):
        if column not in columns:
            raise ValueError(f"Understanding dataset has no column {column!r} (columns: {columns}).")

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
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                processor_kwargs={"images": images} if images else {},
            )  # fmt: skip
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"Row {index}: column {messages_column!r} could not be tokenized: {error}") from error
        input_ids = list(out["input_ids"][0])
        mask = list(out["assistant_masks"][0])
        labels = [token if keep else -100 for token, keep in zip(input_ids, mask)]
        return {"task": UNDERSTANDING, "input_ids": input_ids, "labels": labels, "prompt_length": 0, "row": index,
                "images": images}  # fmt: skip

    return _map(dataset, tokenize, PREPARED_FEATURES, columns, "Tokenizing understanding rows")


def prepare_generation(dataset, processor, caption_column: str = "caption", image_column: str = "image"):
    """Tokenize caption -> image rows for generation: the image-generation prompt, then every image token.

    Labels mark all image positions (the model puts each position's VQ code there); nothing else is trained.
    """
    columns = _columns(dataset)
    for column in (caption_column, image_column):
        if column not in columns:
            raise ValueError(f"Generation dataset has no column {column!r} (columns: {columns}).")
    image_part = (
        [processor.image_token_id] * processor.image_seq_length + [processor.eoi_token_id]
    )
    image_labels = [processor.image_token_id] * processor.image_seq_length + [-100]

    def tokenize(row, index):
        caption = row[caption_column]
        if not isinstance(caption, str):
            raise _bad_row(caption_column, index, "a string", caption)
        image = _check_image(row[image_column], image_column, index)
        prompt = processor.tokenizer(processor.image_generation_prompt(caption), add_special_tokens=False).input_ids
        return {
            "task": GENERATION,
            "input_ids": prompt + image_part,
            "labels": [-100] * len(prompt) + image_labels,
            "prompt_length": len(prompt),
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


class TaskStratifiedSampler(torch.utils.data.Sampler):
    """A random order of the rows in which every run of consecutive rows (so every batch, also when batches
    are split over processes or accumulated) holds each task in proportion to the dataset, within one row.

    Each task's rows are shuffled and spread evenly over the epoch (row i of a task with n rows sits at
    `(i + phase) / n`, with a random phase per task); merging the tasks by that place gives the order.
    Seeded by `seed` and the epoch (`set_epoch`, which Trainer calls), so a resumed run sees the same order.

    Example:

    ```python
    >>> sampler = TaskStratifiedSampler([0, 1, 1, 1] * 25, seed=0)
    >>> order = list(sampler)  # every 8 consecutive rows: 2 of task 0 and 6 of task 1

    ```
    """

    def __init__(self, tasks, seed: int = 0):
        self.tasks = torch.as_tensor(list(tasks), dtype=torch.long)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        places, rows = [], []
        for task in self.tasks.unique():
            members = (self.tasks == task).nonzero().squeeze(1)
            members = members[torch.randperm(len(members), generator=generator)]
            phase = torch.rand((), generator=generator, dtype=torch.float64)
            places.append((torch.arange(len(members), dtype=torch.float64) + phase) / len(members))
            rows.append(members)
        order = torch.cat(rows)[torch.cat(places).argsort(stable=True)]
        return iter(order.tolist())


def pretokenize_images(dataset, processor, batch_size: int = 64):
    """Replace the `images` column of prepared rows by `image_ids` (VQ codes), computed once.

    On a `Dataset` the result is an Arrow table (cached on disk when the dataset is), fingerprinted by
    all the VQ's weights, its tile size and the image processing, so a changed tokenizer never reuses stale codes.
    """
    image_tokenizer = processor._require_image_tokenizer()
    features = Features({**{k: v for k, v in PREPARED_FEATURES.items() if k != "images"},
                         "image_ids": List(List(Value("int64")))})  # fmt: skip

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
        # Everything the codes depend on: all VQ weights and buffers (the encoder as much as the codebook),
        # the tile size (the same weights give other codes with and without tiling), the image processing.
        digest = hashlib.sha256(f"tile{image_tokenizer.tile_size}-{processor.image_processor.to_json_string()}".encode())
        for name, tensor in sorted(image_tokenizer.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        fingerprint = f"{dataset._fingerprint}-vq-{digest.hexdigest()[:16]}"
        kwargs.update(desc="Encoding images with the VQ", new_fingerprint=fingerprint)
    return dataset.map(encode, **kwargs)


@dataclass
class UniForkDataCollator:
    """Pads prepared rows of either task into one batch: `input_ids`, `attention_mask`, `labels`, `task`,
    and `pixel_values` (rows with images) or `image_ids` (pre-tokenized rows).

    Classifier-free guidance: a generation row's prompt is replaced by the unconditional (empty)
    prompt with probability `cfg_dropout`, as at sampling time. The draw is a hash of (`seed`, `epoch`,
    the row's source index), not a random stream, so a resumed or distributed run drops exactly the
    prompts an uninterrupted single-process run drops; [`UniForkTrainer`] keeps `seed` and `epoch` current.
    """

    processor: object
    cfg_dropout: float = 0.1
    seed: int = 0
    epoch: int = 0

    def __post_init__(self):
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}.")
        self.unconditional_prompt = self.processor.tokenizer(
            self.processor.image_generation_prompt(""), add_special_tokens=False
        ).input_ids

    def drops_prompt(self, row: dict) -> bool:
        """Whether CFG dropout empties this generation row's prompt in the current epoch."""
        if row["task"] != GENERATION or not self.cfg_dropout:
            return False
        key = f"{self.seed}-{self.epoch}-{row['row']}".encode()
        draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
        return draw < self.cfg_dropout

    def drop_prompt(self, input_ids: list[int], labels: list[int], prompt_length: int):
        """The row with its prompt swapped for the unconditional one."""
        empty = self.unconditional_prompt
        return empty + input_ids[prompt_length:], [-100] * len(empty) + labels[prompt_length:]

    def __call__(self, rows: list[dict]) -> dict:
        sequences, targets, tasks, images, image_ids = [], [], [], [], []
        for row in rows:
            input_ids, labels = list(row["input_ids"]), list(row["labels"])
            if self.drops_prompt(row):
                input_ids, labels = self.drop_prompt(input_ids, labels, row["prompt_length"])
            sequences.append(input_ids)
            targets.append(labels)
            tasks.append(row["task"])
            if "image_ids" in row:
                image_ids.extend(row["image_ids"])
            else:
                images.extend(row.get("images") or [])
        if images and image_ids:
            raise ValueError("A batch mixes rows with images and rows with pre-tokenized image_ids; prepare all alike.")

        length = max(len(s) for s in sequences)
        pad = self.processor.tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([s + [pad] * (length - len(s)) for s in sequences]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences]),
            "labels": torch.tensor([t + [-100] * (length - len(t)) for t in targets]),
            "task": torch.tensor(tasks),
        }
        if images:
            batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt").pixel_values
        if image_ids:
            batch["image_ids"] = torch.tensor(np.asarray(image_ids, dtype=np.int64))
        return batch


def colour_dataset(num_rows: int = 128, image_size: int = 32, seed: int = 0) -> dict[str, Dataset]:
    """A small learnable dataset for smoke-training both tasks: flat-coloured images.

    Returns `{"understanding": Dataset(images, messages), "generation": Dataset(image, caption)}`; the
    question asks for the colour, the caption names it. (The shapes benchmark is the real one.)
    """
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
               "purple": (140, 50, 170), "orange": (250, 140, 20)}  # fmt: skip
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
