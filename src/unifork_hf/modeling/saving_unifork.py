"""Saving and loading UniFork checkpoints: the model, its processor and card in one folder, written atomically
and checked when loaded.

`UniForkSavingMixin` wraps `PreTrainedModel.save_pretrained` / `from_pretrained` / the Hub upload so that the
processor (tokenizer, image processor, chat template) and the model card travel with the weights, a failed
save leaves the folder as it was, `weights.sha256` catches damaged weight files, and a checkpoint whose
weights or processor disagree with its config is refused instead of loaded half random.
"""

import hashlib
import os
import shutil
import tempfile

from transformers import AutoProcessor

from .configuration_unifork import MissingCheckpointError, missing_checkpoint_error
from .modelcard_unifork import write_model_card
from .vq_unifork import hub_kwargs, optional_file


class UniForkSavingMixin:
    """`save_pretrained`, `push_to_hub` and `from_pretrained` with the processor, card and checksums."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the model, the attached processor (if any) beside it, and a model card (README.md).

        The card is built from `model.card_data` (see [`build_model_card`]); a README.md already in
        `save_directory` that this package did not generate is left as it is. Everything is written into a
        staging folder inside `save_directory` first and moved in file by file only once all of it was
        written: a failure (a full disk, a bad `card_data`) leaves what was there before as it was. Weight
        files of the other layout (one file vs shards) that a previous save left are removed.
        """
        if not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)
        # push_to_hub=True: save here first, then upload as push_to_hub does (from the complete folder)
        push = kwargs.pop("push_to_hub", False)
        hub_kwargs = {
            key: kwargs.pop(key)
            for key in (
                "repo_id",
                "commit_message",
                "commit_description",
                "private",
                "token",
                "create_pr",
                "revision",
                "tags",
            )
            if key in kwargs
        }
        os.makedirs(save_directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".unifork-saving-", dir=save_directory)  # same filesystem: renames are atomic
        try:
            readme = os.path.join(save_directory, "README.md")
            if os.path.exists(readme):  # the card writer keeps a card the user wrote
                shutil.copy2(readme, staging)
            self._save_all(staging, os.path.basename(os.path.abspath(save_directory)), *args, **kwargs)
            with open(os.path.join(staging, CHECKSUMS_FILE), "w") as f:  # `sha256sum -c` reads it too
                f.writelines(
                    f"{_sha256(os.path.join(staging, name))}  {name}\n"
                    for name in sorted(os.listdir(staging))
                    if name.endswith(".safetensors")
                )
            written = os.listdir(staging)
            for name in os.listdir(save_directory):
                if _is_weights_file(name) and name not in written:
                    os.remove(os.path.join(save_directory, name))
            for name in sorted(written, key=lambda name: not _is_weights_file(name)):  # weights first, then the rest
                os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if push:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            self.push_to_hub(repo_id, **hub_kwargs)

    def _save_all(self, directory, name, *args, **kwargs):
        # `register_for_auto_class` records one Auto class per model class; list AutoModel too so
        # `AutoModel.from_pretrained(dir, trust_remote_code=True)` also finds the full model.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for auto_class in ("AutoModel", "AutoModelForMultimodalLM"):
            auto_map[auto_class] = f"modeling_unifork.{type(self).__name__}"
        self.config.auto_map = auto_map
        if getattr(self.generation_config, "image_generation", None):
            # a generation config marked as derived from the model config drops unknown keys when loaded
            self.generation_config._from_model_config = False
        write_model_card(self, directory, repo_id=name)  # first: a bad card_data fails before the weights are written
        super().save_pretrained(directory, *args, **kwargs)
        if self.processor is not None:
            self.processor.save_pretrained(directory)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # Both `push_to_hub` and `save_pretrained(push_to_hub=True)` upload through here, after transformers
        # has put the Hub repo's card (or a placeholder) in README.md: add the processor (not saved yet on
        # the second path) and the UniFork card, unless the Hub's card is the user's own.
        if self.processor is not None:
            self.processor.save_pretrained(working_dir)
        write_model_card(self, working_dir, repo_id=repo_id, keep_tags=True)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a checkpoint; the processor saved beside it, if any, is attached as `model.processor`.

        Raises a `ValueError` when the checkpoint lacks the image tokenizer's weights, and when weights the
        model needs are missing or the checkpoint holds weights the model has no place for (e.g. a config
        whose `num_shared_layers` differs from the one the weights were trained with): transformers would
        only warn and leave those parts randomly initialised. `allow_missing_weights=True` accepts that
        (as for a new head), and `output_loading_info=True` returns transformers' report too.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        allow_missing_weights = kwargs.pop("allow_missing_weights", False)
        verify_weight_checksums(pretrained_model_name_or_path)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except OSError as error:
            if os.path.isdir(str(pretrained_model_name_or_path)) or isinstance(error, MissingCheckpointError):
                raise  # (the config's from_pretrained raises the latter, with its advice)
            raise missing_checkpoint_error(pretrained_model_name_or_path, error) from error
        tokenizer_prefix = model.y_part_names()["image_tokenizer"] + "."
        missing_tokenizer = [key for key in info["missing_keys"] if key.startswith(tokenizer_prefix)]
        if missing_tokenizer:
            raise ValueError(
                f"Checkpoint {pretrained_model_name_or_path!r} lacks the image tokenizer weights "
                f"({len(missing_tokenizer)} tensors, e.g. {missing_tokenizer[0]!r}); save the model with its image tokenizer."
            )
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if (missing or unexpected) and not allow_missing_weights:
            raise ValueError(
                f"Checkpoint {pretrained_model_name_or_path!r} does not match the model its config describes: "
                f"{len(missing)} weights missing (e.g. {missing[:2]}), {len(unexpected)} unused (e.g. {unexpected[:2]}). "
                "Was the config edited (num_shared_layers, sizes)? Pass allow_missing_weights=True to load anyway "
                "with the missing weights randomly initialised."
            )
        model.processor = _load_processor(pretrained_model_name_or_path, kwargs, model.model.image_tokenizer)
        if model.processor is not None:
            _check_processor_matches(model.config, model.processor, pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model


CHECKSUMS_FILE = "weights.sha256"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weight_checksums(directory) -> None:
    """A local checkpoint's weight files against the checksums `save_pretrained` wrote beside them (safetensors
    itself checks only the header: flipped bytes in the data load without a word)."""
    path = os.path.join(str(directory), CHECKSUMS_FILE)
    if not os.path.isfile(path):
        return  # a Hub download (the Hub checks its files) or a checkpoint saved otherwise
    with open(path) as f:
        for line in f:
            expected, name = line.strip().split("  ", 1)
            file = os.path.join(str(directory), name)
            if os.path.exists(file) and _sha256(file) != expected:
                raise ValueError(
                    f"{file} does not match its checksum in {CHECKSUMS_FILE}: the file is corrupted or was "
                    f"changed after saving. Delete {CHECKSUMS_FILE} to load it anyway."
                )


def _is_weights_file(name: str) -> bool:
    return name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))


def _check_processor_matches(config, processor, path) -> None:
    """Raise, naming both values, where the saved processor and the model config disagree (e.g. a save that
    failed half way with an older package): prompts would put images where the model does not look."""
    size = processor.image_processor.size
    pairs = [
        ("image_token_id", config.image_token_id, processor.image_token_id),
        ("boi_token_id", config.boi_token_id, processor.boi_token_id),
        ("eoi_token_id", config.eoi_token_id, processor.eoi_token_id),
        ("image tokens per image", config.num_image_tokens, processor.image_seq_length),
        ("image size", (config.image_size, config.image_size), (size["height"], size["width"])),
    ]
    for what, in_config, in_processor in pairs:
        if in_config != in_processor:
            raise ValueError(
                f"Checkpoint {path!r}: the config says {what} {in_config}, the processor {in_processor}. "
                "Save the model and its processor together (model.save_pretrained) again."
            )
    if len(processor.tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"Checkpoint {path!r}: the tokenizer has {len(processor.tokenizer)} tokens, more than the "
            f"model's vocab_size {config.text_config.vocab_size}."
        )


def _load_processor(path, kwargs, image_tokenizer):
    """The processor saved with a checkpoint (sharing the model's image tokenizer), or None."""
    from transformers.utils import PROCESSOR_NAME

    download = hub_kwargs(kwargs)
    if optional_file(path, PROCESSOR_NAME, download) is None:
        return None
    return AutoProcessor.from_pretrained(
        path, trust_remote_code=kwargs.get("trust_remote_code"), image_tokenizer=image_tokenizer, **download
    )
