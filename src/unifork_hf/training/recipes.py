"""Training recipes: one small YAML file = model + data + `UniForkTrainingArguments`.

```yaml
model:                      # one of: path (a UniFork checkpoint) | llm + vq (fork them) | tiny: true
  tiny: true
  num_shared_layers: 2
data:
  builtin: colours          # or understanding: {...} / generation: {...}, each `datasets.load_dataset`
  num_rows: 128             #   kwargs (path, name, data_files, split, streaming) or {load_from_disk: DIR},
  generation_ratio: 0.5     #   plus optional *_column names; eval_understanding / eval_generation the same
  pretokenize_images: true
training:                   # any UniForkTrainingArguments field, and early_stopping_patience (evaluations)
  output_dir: runs/tiny
  max_steps: 200
image_generation:           # how the trained model samples images: generate_image's defaults, saved in
  guidance_scale: 1.0       #   generation_config.image_generation of every checkpoint (omitted keys: the
  temperature: 0.5          #   model's own, else DEFAULT_IMAGE_GENERATION)
```

A small model of your own, from scratch: a new random LLM described by its config, your tokenizer and VQ
(`build_text_tokenizer`, `train_vq_tokenizer`), and further `UniForkConfig` fields:

```yaml
model:
  llm: {architecture: qwen2, hidden_size: 128, intermediate_size: 384, num_hidden_layers: 4,
        num_attention_heads: 4, num_key_value_heads: 2, tie_word_embeddings: true}
  tokenizer: runs/mine/tokenizer
  vq: runs/mine/vq
  config: {learn_image_position_embeddings: true}   # image_size / vq_tile_size: read from the VQ
```

Run with `unifork train --recipe FILE`.
"""

import os
import types
import typing
from dataclasses import dataclass, field, fields

import torch
import yaml
from transformers import HfArgumentParser

from ..data.colours import colour_dataset
from ..modeling.generation_unifork import DEFAULT_IMAGE_GENERATION
from .datasets import mix_tasks, prepare_generation, prepare_understanding, pretokenize_images
from .trainer import UniForkTrainer, UniForkTrainingArguments


@dataclass
class ModelRecipe:
    path: str | None = None
    llm: str | dict | None = None  # a path / Hub id, or a new random LLM's config (with its `architecture`)
    vq: str | None = None
    tokenizer: str | None = None  # default: the LLM's own (needed with a new random LLM)
    tiny: bool = False
    num_shared_layers: int | None = None
    config: dict = field(default_factory=dict)  # further UniForkConfig fields
    seed: int = 0


@dataclass
class DataRecipe:
    builtin: str | None = None
    num_rows: int = 128
    understanding: dict | None = None
    generation: dict | None = None
    eval_understanding: dict | None = None
    eval_generation: dict | None = None
    generation_ratio: float = 0.5
    pretokenize_images: bool = True
    seed: int = 0


@dataclass
class Recipe:
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    training: UniForkTrainingArguments | None = None
    image_generation: dict = field(default_factory=dict)
    early_stopping_patience: int | None = None  # `training.early_stopping_patience`: EarlyStoppingCallback


SECTIONS = ("model", "data", "training", "image_generation")


def _checked(section: str, key: str, value, hint):
    """`value` as the field's plain type (float, int, bool, str, or optional one of them) wants it, or a
    one-line error naming the key; other types are left to the dataclass. YAML reads `3e-3` as a string."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        plain = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = plain[0] if len(plain) == 1 else None
    if hint not in (float, int, bool, str):
        return value
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    kind = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[hint]
    raise ValueError(f"Recipe {section}.{key}: expected {kind}, got {value!r}.")


def _dataclass_from(cls, values: dict, section: str, build=None):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Recipe section {section!r} has unknown keys {unknown}; known: {sorted(known)}.")
    hints = typing.get_type_hints(cls)
    values = {key: _checked(section, key, value, hints[key]) for key, value in values.items()}
    return (build or cls)(**values)


def load_recipe(path: str, overrides: dict | None = None) -> Recipe:
    """Read a YAML recipe; `overrides` (e.g. `{"training": {"max_steps": 10}}`) replace its values."""
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:  # one line, not the parser's stack
            where = getattr(error, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise ValueError(
                f"Recipe {path!r} is not valid YAML{at}: {getattr(error, 'problem', None) or error}."
            ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"Recipe {path!r} must be a mapping with sections {', '.join(SECTIONS)}.")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"Recipe {path!r} has unknown sections {unknown}; expected {', '.join(SECTIONS)}.")
    for section, values in (overrides or {}).items():
        raw[section] = {**(raw.get(section) or {}), **values}
    sampling = raw.get("image_generation") or {}
    unknown = sorted(set(sampling) - set(DEFAULT_IMAGE_GENERATION))
    if unknown:
        raise ValueError(
            f"Recipe section 'image_generation' has unknown keys {unknown}; known: {list(DEFAULT_IMAGE_GENERATION)}."
        )
    training = dict(raw.get("training") or {})
    patience = _checked(
        "training", "early_stopping_patience", training.pop("early_stopping_patience", None), int | None
    )
    if training.get("resume_from_checkpoint") is True:  # YAML `true`: the field is a string
        training["resume_from_checkpoint"] = "true"
    training.setdefault("output_dir", os.path.splitext(os.path.basename(path))[0])
    arguments = _dataclass_from(
        UniForkTrainingArguments,
        training,
        "training",
        build=lambda **values: HfArgumentParser(UniForkTrainingArguments).parse_dict(values)[0],
    )
    return Recipe(
        model=_dataclass_from(ModelRecipe, raw.get("model") or {}, "model"),
        data=_dataclass_from(DataRecipe, raw.get("data") or {}, "data"),
        training=arguments,
        image_generation=dict(sampling),
        early_stopping_patience=patience,
    )


def build_model(recipe: ModelRecipe):
    """The model (with its processor attached) a recipe starts from."""
    from ..data.tiny import tiny_llm, tiny_tokenizer, tiny_vq
    from ..modeling.modeling_unifork import UniForkForConditionalGeneration

    sources = sum([recipe.path is not None, recipe.llm is not None or recipe.vq is not None, recipe.tiny])
    if sources != 1:
        raise ValueError("Recipe model needs exactly one of: `path`, `llm` + `vq`, or `tiny: true`.")
    if recipe.path is not None:
        return UniForkForConditionalGeneration.from_pretrained(recipe.path)
    torch.manual_seed(recipe.seed)  # every process of a distributed run builds the same random weights
    if recipe.tiny:
        llm, vq, tokenizer = tiny_llm(seed=recipe.seed), tiny_vq(seed=recipe.seed), tiny_tokenizer()
    elif recipe.llm is None or recipe.vq is None:
        raise ValueError("Recipe model: `llm` and `vq` go together.")
    else:
        tokenizer = _load_tokenizer(recipe.tokenizer) if recipe.tokenizer else None
        llm = _random_llm(recipe.llm, tokenizer) if isinstance(recipe.llm, dict) else recipe.llm
        vq = recipe.vq
    return UniForkForConditionalGeneration.from_pretrained_llm(
        llm, vq, tokenizer=tokenizer, num_shared_layers=recipe.num_shared_layers, **recipe.config
    )


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _random_llm(spec: dict, tokenizer):
    """A new causal LM with random weights from `spec`: its `architecture` (a transformers model type such as
    `qwen2` or `llama`) and config fields; the vocabulary is the tokenizer's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    architecture = spec.pop("architecture", None)
    if architecture is None or tokenizer is None:
        raise ValueError(
            "Recipe model.llm as a config needs its `architecture` (e.g. qwen2) and a `model.tokenizer` path."
        )
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **spec,
    )
    return AutoModelForCausalLM.from_config(config)


def _load_source(spec: dict, task: str):
    from datasets import load_dataset, load_from_disk

    spec = dict(spec)
    columns = {key: spec.pop(key) for key in list(spec) if key.endswith("_column")}
    if "load_from_disk" in spec:
        dataset = load_from_disk(spec.pop("load_from_disk"))
        if spec.get("split"):
            dataset = dataset[spec.pop("split")]
    else:
        dataset = load_dataset(**spec)
    return dataset, columns


def build_dataset(recipe: DataRecipe, processor):
    """Prepared, mixed (and optionally pre-tokenized) training rows for a recipe."""
    if recipe.builtin is not None:
        if recipe.builtin != "colours":
            raise ValueError(f"Recipe data: unknown builtin {recipe.builtin!r}; available: ['colours'].")
        size = processor.image_processor.size["height"]
        parts = colour_dataset(recipe.num_rows, image_size=size, seed=recipe.seed)
        understanding = prepare_understanding(parts["understanding"], processor)
        generation = prepare_generation(parts["generation"], processor)
    else:
        understanding = generation = None
        if recipe.understanding:
            dataset, columns = _load_source(recipe.understanding, "understanding")
            understanding = prepare_understanding(dataset, processor, **columns)
        if recipe.generation:
            dataset, columns = _load_source(recipe.generation, "generation")
            generation = prepare_generation(dataset, processor, **columns)
        if understanding is None and generation is None:
            raise ValueError("Recipe data needs `builtin`, `understanding` and/or `generation`.")
    if understanding is None or generation is None:
        train = understanding if generation is None else generation
    else:
        train = mix_tasks(understanding, generation, recipe.generation_ratio, seed=recipe.seed)
    return pretokenize_images(train, processor) if recipe.pretokenize_images else train


def build_eval_datasets(recipe: DataRecipe, processor) -> dict | None:
    """One prepared eval set per task the recipe names (`eval_understanding`, `eval_generation`), or None."""
    sets = {}
    for task, spec, prepare in (
        ("understanding", recipe.eval_understanding, prepare_understanding),
        ("generation", recipe.eval_generation, prepare_generation),
    ):
        if spec:
            dataset, columns = _load_source(spec, task)
            sets[task] = prepare(dataset, processor, **columns)
            if recipe.pretokenize_images:
                sets[task] = pretokenize_images(sets[task], processor)
    return sets or None


def run_recipe(path: str, overrides: dict | None = None) -> UniForkTrainer:
    """Train as a recipe says; saves the final model (with processor) to `output_dir`. Every checkpoint states
    its image sampling settings (`generation_config.image_generation`): the recipe's over the model's."""
    recipe = load_recipe(path, overrides)
    model = build_model(recipe.model)
    model.generation_config.image_generation = model.image_generation_settings(**recipe.image_generation)
    train_dataset = build_dataset(recipe.data, model.processor)
    callbacks = []
    if recipe.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping_patience))
    trainer = UniForkTrainer(
        model=model,
        args=recipe.training,
        train_dataset=train_dataset,
        eval_dataset=build_eval_datasets(recipe.data, model.processor),
        processing_class=model.processor,
        callbacks=callbacks,
    )
    resume = recipe.training.resume_from_checkpoint  # "true": the output directory's last checkpoint
    trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    trainer.save_model()
    return trainer
