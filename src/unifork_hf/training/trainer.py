"""`UniForkTrainer`: transformers' Trainer for mixed understanding + generation batches.

What it adds to `Trainer`: the paper's freezing stages, the default collator (with classifier-free
guidance prompt dropout), batches that mix the tasks in proportion (`train_sampling_strategy=
"task_stratified"`), an explicit per-task loss balance (`understanding_loss_share`), and per-task
losses and the understanding share of the loss in the logs.

Example:

```python
>>> import tempfile
>>> from unifork_hf import UniForkForConditionalGeneration
>>> from unifork_hf.data.tiny import tiny_llm, tiny_tokenizer, tiny_vq
>>> from unifork_hf.training import colour_dataset, mix_tasks, prepare_generation, prepare_understanding
>>> model = UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer())
>>> parts = colour_dataset(16)
>>> und = prepare_understanding(parts["understanding"], model.processor)
>>> gen = prepare_generation(parts["generation"], model.processor)
>>> args = UniForkTrainingArguments(output_dir=tempfile.mkdtemp(), freeze="joint", cfg_dropout=0.1, max_steps=4,
...                                 use_cpu=True, report_to=[], disable_tqdm=True, logging_strategy="no")
>>> trainer = UniForkTrainer(model=model, args=args, train_dataset=mix_tasks(und, gen), processing_class=model.processor)
>>> result = trainer.train()  # doctest: +ELLIPSIS
{'train_runtime': ..., 'train_loss': ..., 'epoch': ...}
>>> result.global_step
4

```
"""

import os
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint, has_length

from ..modeling.modelcard_unifork import write_model_card
from ..modeling.modeling_unifork import UniForkForConditionalGeneration
from ..modeling.saving_unifork import verify_weight_checksums
from .collator import TaskStratifiedSampler, UniForkDataCollator

# The paper's training stages, as the parts of the Y (`model.y_parts()`) each one trains (never the VQ).
FREEZING_POLICIES = {
    "align": ("image_projector", "understanding_head", "generation_head"),
    "joint": (
        "embeddings",
        "image_projector",
        "shared_layers",
        "understanding_layers",
        "understanding_norm",
        "understanding_head",
        "generation_layers",
        "generation_norm",
        "generation_head",
    ),
    "generation_branch": ("generation_layers", "generation_norm", "generation_head"),
    "understanding_branch": ("understanding_layers", "understanding_norm", "understanding_head"),
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
    parts = model.y_parts()
    # by object, so that a weight tied between parts (the LM head and the embeddings) follows either
    chosen = {id(parameter) for role in FREEZING_POLICIES[policy] for parameter in parts[role].parameters()}
    trainable = set()
    for name, parameter in model.named_parameters():  # tied weights are listed once
        parameter.requires_grad_(id(parameter) in chosen)
        if parameter.requires_grad:
            trainable.add(name)
    return trainable


@dataclass
class UniForkTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus UniFork's: the freezing stage, classifier-free-guidance dropout, and how the
    two tasks share batches and the loss.

    Defaults that differ from `TrainingArguments`, and why (measured on Shapes at the demo size,
    docs/shapes-demo/experiments.md):

    - `train_sampling_strategy="task_stratified"`: every batch holds each task's rows in proportion to
      the dataset, in random order. Length grouping (`"group_by_length"`) fed runs of batches of one
      kind of row (one task, one question type), which stalled learning: 0.5% vs 61% of images drawn
      right after 800 steps. Random batches learn as well as stratified ones on average.
    - `understanding_loss_share=0.25`: the loss is `s * understanding mean + (1 - s) * generation mean`,
      each a token mean over the whole accumulated (and distributed) batch, so a task's weight does not
      depend on how many tokens its rows label. A plain token mean (None) gives each task its share of
      the labelled tokens: an understanding reply labels ~5 tokens and an image 64, so understanding
      got ~3% of the loss. 0.25 answered up to 10 points more questions than the token mean in the
      first 1000-1200 steps and drew its images a little later; 0.5 drew nothing right for 1000 steps.
    """

    freeze: str = field(
        default="joint",
        metadata={"help": "align | joint | generation_branch | understanding_branch | none (leave as is, e.g. PEFT)"},
    )
    cfg_dropout: float = field(
        default=0.1, metadata={"help": "probability of replacing a generation sample's prompt by the empty one"}
    )
    understanding_loss_share: float | None = field(
        default=0.25,
        metadata={
            "help": "s in loss = s * understanding token mean + (1 - s) * generation token mean; "
            "None: one token mean over both tasks (each task weighs its share of labelled tokens)"
        },
    )
    train_sampling_strategy: str = field(
        default="task_stratified",
        metadata={
            "help": "task_stratified (each batch mixes the tasks in proportion), random, sequential, "
            "group_by_length or batch_rebalance"
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "UniFork's collator needs the prepared columns: keep them"}
    )
    resume_without_optimizer_state: bool = field(
        default=False,
        metadata={
            "help": "let resume_from_checkpoint start a fresh optimizer and schedule when the checkpoint "
            "has no optimizer.pt / scheduler.pt (otherwise an error)"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.freeze != "none" and self.freeze not in FREEZING_POLICIES:
            raise ValueError(f"freeze must be one of {sorted(FREEZING_POLICIES) + ['none']}, got {self.freeze!r}.")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}.")
        if self.understanding_loss_share is not None and not 0 < self.understanding_loss_share < 1:
            raise ValueError(
                f"understanding_loss_share must be in (0, 1) or None (a plain token mean), got {self.understanding_loss_share}."
            )
        strategies = ("task_stratified", "random", "sequential", "group_by_length", "batch_rebalance")
        if self.train_sampling_strategy not in strategies:
            raise ValueError(
                f"train_sampling_strategy must be one of {strategies}, got {self.train_sampling_strategy!r}."
            )


class _CollatorEpoch(TrainerCallback):
    """Tells the collator the epoch, which (with the seed and row) decides its CFG prompt dropout."""

    def __init__(self, collator: UniForkDataCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int((state.epoch or 0) + 1e-6)  # state.epoch is a float that may land on 0.9999...


class UniForkTrainer(Trainer):
    """`Trainer` for UniFork: mixed-task batches, freezing stages, the task loss balance, per-task logging.

    `processing_class` is the [`UniForkProcessor`]; the default `data_collator` is a
    [`UniForkDataCollator`] with `args.cfg_dropout`. Logs carry `loss_understanding` and
    `loss_generation` (the mean of the per-batch task losses since the last log; a batch counts for a
    task only if it holds samples of it) and `understanding_share` (the part of the optimised loss that
    came from understanding), averaged over processes and unaffected by gradient accumulation.
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
        # [sum of per-batch values, number of batches] since the last log
        self._logged = {
            name: torch.zeros(2) for name in ("loss_understanding", "loss_generation", "understanding_share")
        }

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, refusing a checkpoint this run cannot continue: one whose weights do not match the
        checksums saved with them, one whose model config differs from the model's (the field is named), or one
        without optimizer and scheduler state unless
        `args.resume_without_optimizer_state` (Trainer would quietly restart Adam and the schedule)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = (
                get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            )
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir} holds no checkpoint-* folder."
                )
        if resume_from_checkpoint:
            self._check_resumable(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _check_resumable(self, checkpoint: str) -> None:
        verify_weight_checksums(checkpoint)  # damaged weights: refuse rather than train on
        config_file = os.path.join(checkpoint, "config.json")
        if isinstance(self.model, UniForkForConditionalGeneration) and os.path.exists(config_file):
            saved = type(self.model.config).from_pretrained(checkpoint).to_dict()  # both through the same defaults
            for field_name, ours, theirs in _config_differences(self.model.config.to_dict(), saved):
                raise ValueError(
                    f"Cannot resume from {checkpoint}: its model has {field_name}={theirs!r}, this run's "
                    f"model {field_name}={ours!r}. Resume with the model the checkpoint was trained as."
                )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return  # their optimizer state lives in their own files
        missing = [
            name for name in ("optimizer.pt", "scheduler.pt") if not os.path.exists(os.path.join(checkpoint, name))
        ]
        if missing and not getattr(self.args, "resume_without_optimizer_state", False):
            raise ValueError(
                f"Cannot resume from {checkpoint}: it has no {' or '.join(missing)}, so the optimizer and "
                "learning-rate schedule would start over. Pass resume_without_optimizer_state=True to accept that."
            )

    def _issue_warnings_after_load(self, load_result) -> None:
        # A tied head is saved once, under the embeddings' name; torch's load_state_dict still lists its alias as
        # missing and Trainer warns "missing keys ['lm_head.weight']" on every resume, though the tie loaded it.
        # Keep the warning for parameters that really were not loaded.
        params = dict(self.model.named_parameters(remove_duplicate=False))
        missing = set(load_result.missing_keys)
        loaded = {param.data_ptr() for name, param in params.items() if name not in missing}
        really_missing = [
            name for name in load_result.missing_keys if name not in params or params[name].data_ptr() not in loaded
        ]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=really_missing))

    def _get_train_sampler(self, train_dataset=None):
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(self.args, "train_sampling_strategy", None) != "task_stratified":
            return super()._get_train_sampler(train_dataset)
        if train_dataset is None or not has_length(train_dataset):
            return None  # a stream comes in its own order (mix_tasks interleaves it by the ratio)
        if "task" not in (getattr(train_dataset, "column_names", None) or []):
            raise ValueError(
                "train_sampling_strategy='task_stratified' needs a `task` column (prepare_* rows have one)."
            )
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return TaskStratifiedSampler(train_dataset["task"], seed=seed)

    def _loss_share(self) -> float | None:
        return getattr(self.args, "understanding_loss_share", None)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's evaluation. With one eval set per task (`eval_dataset={"understanding": ...,
        "generation": ...}`, reported as `eval_understanding_loss` and `eval_generation_loss`) it adds
        `eval_loss`, the two weighted as training weighs them (`understanding_loss_share`, else half each): the
        metric `load_best_model_at_end` and `EarlyStoppingCallback` select on by default."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        und, gen = (metrics.get(f"{metric_key_prefix}_{task}_loss") for task in ("understanding", "generation"))
        if und is not None and gen is not None and f"{metric_key_prefix}_loss" not in metrics:
            share = 0.5 if self._loss_share() is None else self._loss_share()
            combined = {f"{metric_key_prefix}_loss": share * und + (1 - share) * gen}
            self.log(combined)
            metrics.update(combined)
            # Trainer told the callbacks each task's metrics alone; now the combined ones, so that early stopping
            # on `eval_loss` sees it (it has warned, per task, that it did not)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _get_num_items_in_batch(self, batch_samples, device):
        """Trainer counts the labelled tokens of the whole accumulated (and distributed) batch, the loss's
        denominator; with a task loss share each task needs its own: `(understanding, generation)`."""
        total = super()._get_num_items_in_batch(batch_samples, device)
        if self._loss_share() is None or total is None or not all("task" in batch for batch in batch_samples):
            return total
        counts = sum(_task_token_counts(batch["labels"], batch["task"]) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        share = self._loss_share()
        per_task = torch.is_tensor(num_items_in_batch) and num_items_in_batch.shape == (2,)
        if share is None or not per_task:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            token_mean = True
        else:
            outputs = model(**inputs)
            # each task's summed loss over its token count in the whole accumulated (and distributed) batch
            here = _task_token_counts(inputs["labels"], inputs["task"]).to(num_items_in_batch.device)
            terms = [
                weight * task_loss * here[task] / num_items_in_batch[task].clamp(min=1)
                for task, weight, task_loss in (
                    (0, share, outputs.loss_understanding),
                    (1, 1 - share, outputs.loss_generation),
                )
                if task_loss is not None
            ]
            loss = sum(terms)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # undo DDP's averaging of the gradients
            token_mean = False
        if model.training:
            self._log_task_losses(outputs, inputs, share, token_mean)
        return (loss, outputs) if return_outputs else loss

    def _log_task_losses(self, outputs, inputs, share, token_mean):
        und, gen = outputs.loss_understanding, outputs.loss_generation
        for name, value in (("loss_understanding", und), ("loss_generation", gen)):
            if value is not None:
                self._logged[name] += torch.stack([value.detach().float().cpu(), torch.tensor(1.0)])
        if token_mean:  # understanding's part of one token mean over both tasks
            counts = _task_token_counts(inputs["labels"], inputs["task"]).float()
            parts = [
                (value.detach().float().cpu() * n if value is not None else torch.tensor(0.0))
                for value, n in ((und, counts[0]), (gen, counts[1]))
            ]
        else:
            parts = [
                (weight * value.detach().float().cpu() if value is not None else torch.tensor(0.0))
                for value, weight in ((und, share), (gen, 1 - share))
            ]
        total = parts[0] + parts[1]
        if total > 0:
            self._logged["understanding_share"] += torch.stack([parts[0] / total, torch.tensor(1.0)])

    def create_model_card(
        self, language=None, license=None, tags=None, model_name=None, finetuned_from=None, dataset=None, **kwargs
    ) -> None:
        """Write UniFork's card (architecture, parameter counts, usage) with this run's training summary
        into `output_dir` (used by `push_to_hub`), instead of Trainer's generic card."""
        model = self.accelerator.unwrap_model(self.model)
        if not self.is_world_process_zero() or not isinstance(model, UniForkForConditionalGeneration):
            return super().create_model_card(
                language=language,
                license=license,
                tags=tags,
                model_name=model_name,
                finetuned_from=finetuned_from,
                dataset=dataset,
                **kwargs,
            )
        given = {
            "language": language,
            "license": license,
            "tags": [tags] if isinstance(tags, str) else tags,
            "model_name": model_name,
            "base_model": finetuned_from,
            "datasets": [dataset] if isinstance(dataset, str) else dataset,
        }
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
            **{
                f"last {name}": round(last[name], 4)
                for name in ("loss", "loss_understanding", "loss_generation")
                if name in last
            },
        }
        extra = {**{k: v for k, v in given.items() if v is not None}, "training_summary": summary}
        write_model_card(model, self.args.output_dir, keep_tags=True, extra=extra)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the per-task values since the last one
            for name, totals in self._logged.items():
                totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
                if totals[1] > 0:
                    logs[name] = round(float(totals[0] / totals[1]), 4)
                self._logged[name] = torch.zeros(2)
        super().log(logs, start_time)


# Config keys that say nothing about the weights' shapes or meaning.
_NOT_MODEL_FIELDS = {
    "transformers_version",
    "_name_or_path",
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


def _config_differences(ours: dict, theirs: dict, prefix: str = ""):
    """(field, ours, theirs) for each model field two config dicts disagree on, nested dicts by dotted name."""
    for key in sorted(set(ours) | set(theirs)):
        if key in _NOT_MODEL_FIELDS:
            continue
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (list, tuple)) and list(a) == b):
            yield f"{prefix}{key}", a, b


def _task_token_counts(labels: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """Labelled next-token targets per task, `(understanding, generation)`: what each task's loss averages over."""
    per_row = labels[:, 1:].ne(-100).sum(1)
    task = task.to(per_row.device)
    return torch.stack([per_row[task == 0].sum(), per_row[task == 1].sum()]).cpu()
