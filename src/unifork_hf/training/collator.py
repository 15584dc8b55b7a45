"""How prepared rows become batches: `TaskStratifiedSampler` orders them so that every batch holds each task in
proportion, and `UniForkDataCollator` pads a list of rows of either task into one batch for the model's
per-sample task routing, with classifier-free-guidance prompt dropout."""

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..modeling.routing_unifork import GENERATION


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
