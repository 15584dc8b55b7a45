"""`UniForkTrainer`: transformers' Trainer for mixed understanding + generation batches.

What it adds to `Trainer`: the paper's freezing stages, the default collator (with classifier-free
guidance prompt dropout), and per-task losses (`loss_understanding`, `loss_generation`) in the logs.

Example:

```python
>>> args = UniForkTrainingArguments(output_dir="out", freeze="joint", cfg_dropout=0.1, max_steps=200)
>>> trainer = UniForkTrainer(model=model, args=args, train_dataset=mix_tasks(und, gen), processing_class=processor)
>>> trainer.train()
```
"""

from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..modeling.modelcard_unifork import write_model_card
from ..modeling.modeling_unifork import UniForkForConditionalGeneration
from .data import UniForkDataCollator


# The paper's training stages, as the parameter-name prefixes each one trains (the VQ is never trained).
FREEZING_POLICIES = {
    "align": ("model.image_projector.", "lm_head.", "generation_head."),
    "joint": ("model.embed_tokens.", "model.image_projector.", "model.shared_layers.", "model.understanding_",
              "model.generation_", "lm_head.", "generation_head."),  # fmt: skip
    "generation_branch": ("model.generation_layers.", "model.generation_norm.", "generation_head."),
    "understanding_branch": ("model.understanding_layers.", "model.understanding_norm.", "lm_head."),
}


def apply_freezing(model: UniForkForConditionalGeneration, policy: str) -> set[str]:
    """Make exactly the parameters of `policy` trainable; returns their names.

    Policies: `"align"` (image projector + both heads), `"joint"` (everything but the VQ tokenizer),
    `"generation_branch"` (generation layers, norm, head), `"understanding_branch"` (understanding
    layers, norm, LM head). With tied embeddings the LM head *is* the input embedding matrix, so
    training it trains both.
    """
    if policy not in FREEZING_POLICIES:
        raise ValueError(f"freeze must be one of {sorted(FREEZING_POLICIES) + ['none']}, got {policy!r}.")
    prefixes = FREEZING_POLICIES[policy]
    trainable = set()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(prefixes))
        if parameter.requires_grad:
            trainable.add(name)
    # Tied weights are listed once, under the input embeddings: follow the LM head.
    if "lm_head." in prefixes and model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight.requires_grad_(True)
        trainable.add("model.embed_tokens.weight")
    return trainable


@dataclass
class UniForkTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus UniFork's: the freezing stage and classifier-free-guidance dropout."""

    freeze: str = field(
        default="joint",
        metadata={"help": "align | joint | generation_branch | understanding_branch | none (leave as is, e.g. PEFT)"},
    )
    cfg_dropout: float = field(
        default=0.1, metadata={"help": "probability of replacing a generation sample's prompt by the empty one"}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "UniFork's collator needs the prepared columns: keep them"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.freeze != "none" and self.freeze not in FREEZING_POLICIES:
            raise ValueError(f"freeze must be one of {sorted(FREEZING_POLICIES) + ['none']}, got {self.freeze!r}.")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}.")


class _CollatorEpoch(TrainerCallback):
    """Tells the collator the epoch, which (with the seed and row) decides its CFG prompt dropout."""

    def __init__(self, collator: UniForkDataCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int((state.epoch or 0) + 1e-6)  # state.epoch is a float that may land on 0.9999...


class UniForkTrainer(Trainer):
    """`Trainer` for UniFork: mixed-task batches, freezing stages, and per-task loss logging.

    `processing_class` is the [`UniForkProcessor`]; the default `data_collator` is a
    [`UniForkDataCollator`] with `args.cfg_dropout`. Per-task losses are the mean of the per-batch
    task losses since the last log (a batch counts for a task only if it holds samples of it), averaged
    over processes; they are unaffected by gradient accumulation.
    """

    def __init__(self, model=None, args: UniForkTrainingArguments | None = None, data_collator=None, **kwargs):
        if args is None:
            args = UniForkTrainingArguments(output_dir="unifork-trainer")
        processor = kwargs.get("processing_class") or getattr(model, "processor", None)
        if data_collator is None:
            if processor is None:
                raise ValueError("UniForkTrainer needs `processing_class` (the UniForkProcessor) or a data_collator.")
            data_collator = UniForkDataCollator(processor, cfg_dropout=getattr(args, "cfg_dropout", 0.1))
        if getattr(args, "freeze", "none") != "none" and isinstance(model, UniForkForConditionalGeneration):
            apply_freezing(model, args.freeze)
        kwargs.setdefault("processing_class", processor)
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        if isinstance(data_collator, UniForkDataCollator):
            data_collator.seed = args.seed
            self.add_callback(_CollatorEpoch(data_collator))
        # [sum of per-batch losses, number of batches] per task since the last log
        self._task_losses = {"loss_understanding": torch.zeros(2), "loss_generation": torch.zeros(2)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name in self._task_losses:
                value = getattr(outputs, name, None)
                if value is not None:
                    self._task_losses[name] += torch.stack([value.detach().float().cpu(), torch.tensor(1.0)])
        return (loss, outputs) if return_outputs else loss

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          dataset=None, **kwargs) -> None:  # fmt: skip
        """Write UniFork's card (architecture, parameter counts, usage) with this run's training summary
        into `output_dir` (used by `push_to_hub`), instead of Trainer's generic card."""
        model = self.accelerator.unwrap_model(self.model)
        if not self.is_world_process_zero() or not isinstance(model, UniForkForConditionalGeneration):
            return super().create_model_card(language=language, license=license, tags=tags, model_name=model_name,
                                             finetuned_from=finetuned_from, dataset=dataset, **kwargs)  # fmt: skip
        given = {"language": language, "license": license, "tags": [tags] if isinstance(tags, str) else tags,
                 "model_name": model_name, "base_model": finetuned_from,
                 "datasets": [dataset] if isinstance(dataset, str) else dataset}  # fmt: skip
        last = next((log for log in reversed(self.state.log_history) if "loss" in log), {})
        summary = {
            "steps": self.state.global_step,
            "freezing stage": self.args.freeze,
            "CFG prompt dropout": self.args.cfg_dropout,
            "learning rate": self.args.learning_rate,
            "batch size (per device x accumulation x processes)": (
                f"{self.args.per_device_train_batch_size} x {self.args.gradient_accumulation_steps} "
                f"x {self.args.world_size}"
            ),
            **{f"last {name}": round(last[name], 4) for name in ("loss", "loss_understanding", "loss_generation")
               if name in last},  # fmt: skip
        }
        saved = model.card_data
        model.card_data = {**saved, **{k: v for k, v in given.items() if v is not None}, "training_summary": summary}
        try:
            write_model_card(model, self.args.output_dir, keep_tags=True)
        finally:
            model.card_data = saved

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the per-task losses since the last one
            for name, totals in self._task_losses.items():
                totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
                if totals[1] > 0:
                    logs[name] = round(float(totals[0] / totals[1]), 4)
                self._task_losses[name] = torch.zeros(2)
        super().log(logs, start_time)
