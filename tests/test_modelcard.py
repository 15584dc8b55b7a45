"""Model card (README.md) written by save_pretrained / push_to_hub. Offline: the Hub calls are patched."""

import os
import re
import types

import pytest
import torch
from conftest import tiny_model
from diffusers import VQModel
from huggingface_hub import EvalResult, HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from test_config import depth_head_parameters
from transformers import AutoModelForCausalLM, AutoTokenizer

from unifork_hf import UniForkConfig, UniForkForConditionalGeneration
from unifork_hf.modeling.modelcard_unifork import MODEL_CARD_MARKER, build_model_card
from unifork_hf.modeling.rq_unifork import UniForkRQImageTokenizer

DEFAULT_TAGS = ["unifork", "image-generation", "multimodal", "custom_code"]


# ---------------------------------------------------------------------- expected counts, from the config alone


def qwen2_layer(text) -> int:
    """Parameters of one Qwen2 decoder layer: q/k/v projections with bias, o without, SwiGLU MLP, two norms."""
    h, i = text.hidden_size, text.intermediate_size
    head_dim = h // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h


def expected_counts(config: UniForkConfig) -> dict:
    text = config.text_config
    h, k, num_layers = text.hidden_size, config.num_shared_layers, text.num_hidden_layers
    with torch.device("meta"):
        tokenizer = UniForkRQImageTokenizer(config.rq_config) if config.rq_config else VQModel(**config.vq_config)
        vq = sum(p.numel() for p in tokenizer.parameters())
    head = h * config.codebook_size
    if config.rq_config:
        head = depth_head_parameters(
            h, config.code_dim, config.codebook_size, config.image_depth, **config.depth_head_config
        )
    counts = {
        "embeddings": text.vocab_size * h,
        "shared": k * qwen2_layer(text),
        "branch": (num_layers - k) * qwen2_layer(text) + h,  # layers + final norm
        "lm_head": 0 if config.tie_word_embeddings else text.vocab_size * h,
        "generation_head": head,
        "projector": (config.code_dim + 1) * config.projector_hidden_size + (config.projector_hidden_size + 1) * h,
        "vq": vq,
    }
    counts["total"] = sum(counts.values()) + counts["branch"]  # two branches
    return counts


def table(body: str) -> dict:
    """The parameter table of a card body: {part: count}."""
    rows = re.findall(r"^\| \**(.+?)\** \| \**([\d,]+)\** \|$", body, flags=re.M)
    return {name: int(count.replace(",", "")) for name, count in rows}


def load_card(directory) -> ModelCard:
    return ModelCard.load(os.path.join(directory, "README.md"))


# ---------------------------------------------------------------------- save_pretrained


def test_card_metadata_and_body(tmp_path):
    model = tiny_model(num_shared_layers=1)  # K = 1 of L = 4: branch depth 3
    model.add_model_tags(["trl"])
    model.card_data.update(
        base_model="Qwen/Qwen2.5-0.5B",
        datasets=["my-org/captions", "my-org/vqa"],
        eval_results=[
            {
                "task_type": "text-to-image",
                "dataset_type": "geneval",
                "dataset_name": "GenEval",
                "metric_type": "accuracy",
                "metric_value": 0.46,
                "dataset_split": "test",
                "metric_name": "Overall",
            },
            EvalResult(
                task_type="visual-question-answering",
                dataset_type="mme",
                dataset_name="MME",
                metric_type="score",
                metric_value=1208.0,
            ),
        ],
        model_name="my-org/unifork-tiny",
        license="apache-2.0",
        language=["en"],
        tags=["sft", "unifork"],
        training_summary="Stage 1: 1 epoch of captions.",
    )
    model.save_pretrained(tmp_path / "unifork-tiny")
    card = load_card(tmp_path / "unifork-tiny")

    assert card.data.to_dict() == {
        "base_model": "Qwen/Qwen2.5-0.5B",
        "datasets": ["my-org/captions", "my-org/vqa"],
        "language": ["en"],
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "image-text-to-text",
        "tags": DEFAULT_TAGS + ["trl", "sft"],
        "model-index": [
            {
                "name": "my-org/unifork-tiny",
                "results": [
                    {
                        "task": {"type": "text-to-image"},
                        "dataset": {"name": "GenEval", "type": "geneval", "split": "test"},
                        "metrics": [{"type": "accuracy", "value": 0.46, "name": "Overall"}],
                    },
                    {
                        "task": {"type": "visual-question-answering"},
                        "dataset": {"name": "MME", "type": "mme"},
                        "metrics": [{"type": "score", "value": 1208.0}],
                    },
                ],
            }
        ],
    }
    assert [(r.dataset_name, r.metric_value) for r in card.data.eval_results] == [("GenEval", 0.46), ("MME", 1208.0)]

    body = card.text
    assert MODEL_CARD_MARKER in body
    assert body.lstrip().startswith("# my-org/unifork-tiny")
    assert "K = 1 (layers shared by both tasks); branch depth L − K = 3 (layers per task)" in body
    assert "16×16 px" in body and "4×4 code grid (16 tokens per image)" in body and "codebook of 64 codes" in body
    assert "tile encoded on its own" not in body
    tiled = build_model_card(tiny_model(image_size=16, vq_tile_size=8)).text
    assert "codebook of 64 codes, each 8×8-px tile encoded on its own" in tiled
    expected = expected_counts(model.config)
    assert table(body) == {
        "embeddings": expected["embeddings"],
        "shared layers (layer 0)": expected["shared"],
        "understanding branch (layers 1..3 + norm)": expected["branch"],
        "generation branch (layers 1..3 + norm)": expected["branch"],
        "LM head": expected["lm_head"],
        "generation head (64 × 64)": expected["generation_head"],
        "image projector": expected["projector"],
        "VQ image tokenizer (frozen)": expected["vq"],
        "total": expected["total"],
    }
    assert expected["total"] == model.num_parameters()
    # usage snippets load from the save directory's name; the training section
    for snippet in (
        'AutoModel.from_pretrained("unifork-tiny", trust_remote_code=True)',
        'AutoProcessor.from_pretrained("unifork-tiny", trust_remote_code=True)',
        "import unifork_hf",
        "model.generate_image(",
        "`guidance_scale=5.0`, `temperature=1.0`, `top_k=None`, `top_p=None`",  # the model's own sampling
        "model.generate(**inputs",
        "## Training",
        "Stage 1: 1 epoch of captions.",
        "[my-org/captions](https://huggingface.co/datasets/my-org/captions)",
    ):
        assert snippet in body, snippet


def test_card_counts_of_the_base_preset():
    """The paper's geometry (tied LM head), on the meta device: the README's table."""
    with torch.device("meta"):
        model = UniForkForConditionalGeneration(UniForkConfig.from_preset("unifork-base"))
    card = build_model_card(model)
    expected = expected_counts(model.config)
    rows = table(card.text)
    assert rows["shared layers (layers 0..11)"] == expected["shared"] == 178_948_608
    assert rows["understanding branch (layers 12..23 + norm)"] == expected["branch"] == 178_949_504
    assert rows["LM head (tied to the embeddings)"] == 0
    assert rows["generation head (depth transformer: 6 blocks of width 896, 4 codes × 16,384)"] == 401_936_896
    assert rows["RQ image tokenizer (frozen)"] == expected["vq"] == 350_254_211
    assert rows["total"] == expected["total"] == model.num_parameters() == 1_426_895_491
    assert "K = 12 (layers shared by both tasks); branch depth L − K = 12 (layers per task)" in card.text
    assert card.data.to_dict() == {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": DEFAULT_TAGS,
    }
    assert "## Training" not in card.text


def test_built_checkpoint_records_its_llm(built_dir, tiny_parts, tmp_path):
    """from_pretrained_llm records the LLM; a local path stays out of the metadata (the Hub rejects it)."""
    llm_dir, vq_dir = tiny_parts
    card = load_card(built_dir)
    assert "base_model" not in card.data.to_dict()
    assert "forked from `tiny-qwen2` (a local checkpoint)" in card.text and llm_dir not in card.text
    assert UniForkForConditionalGeneration.from_pretrained_llm(llm_dir, vq_dir).card_data == {"base_model": llm_dir}

    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    llm.name_or_path = "Qwen/Qwen2.5-0.5B"  # as if loaded from the Hub
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = UniForkForConditionalGeneration.from_pretrained_llm(llm, vq_dir, tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    assert load_card(tmp_path).data.base_model == "Qwen/Qwen2.5-0.5B"


def test_user_readme_is_kept_generated_one_is_refreshed(tmp_path):
    model = tiny_model()
    user_card = "---\nlicense: mit\n---\n# My own card\n"
    (tmp_path / "README.md").write_text(user_card)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == user_card
    assert (tmp_path / "model.safetensors").exists()

    other = tmp_path / "generated"
    model.save_pretrained(other)
    assert load_card(other).data.license is None
    model.card_data["license"] = "apache-2.0"
    model.save_pretrained(other)  # our own card: rewritten
    assert load_card(other).data.license == "apache-2.0"


def test_bad_card_inputs_raise(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="EvalResult"):
        build_model_card(model, eval_results=[{"task_type": "text-to-image", "metric_value": 1.0}])
    model.card_data["licence"] = "mit"
    with pytest.raises(ValueError, match="unknown keys"):
        model.save_pretrained(tmp_path)


# ---------------------------------------------------------------------- push_to_hub, offline


@pytest.fixture()
def hub(monkeypatch):
    """Patched Hub: create_repo answers, create_commit records {repo: {path_in_repo: bytes}}, and the
    repo's README.md is `hub.readme` (None: the repo has none)."""
    state = types.SimpleNamespace(uploads={}, readme=None)

    def create_commit(self, repo_id, operations, **kwargs):
        state.uploads[repo_id] = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}

    def download(repo_id, filename, **kwargs):
        if state.readme is None:
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(state.readme)

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr("huggingface_hub.repocard.hf_hub_download", download)
    return state


PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
MODEL_FILES = {"model.safetensors", "config.json", "generation_config.json", "modeling_unifork.py"}
MODEL_FILES |= {"modelcard_unifork.py"}  # remote code: the card writer travels with the model


def card_of(files: dict) -> ModelCard:
    return ModelCard(files["README.md"].decode())


def test_push_to_hub_uploads_model_processor_and_card(built_model, hub, tmp_path):
    built_model.card_data.update(datasets=["my-org/captions"], license="apache-2.0")
    built_model.push_to_hub("my-org/unifork-tiny", tags=["pushed"])
    files = hub.uploads["my-org/unifork-tiny"]
    assert MODEL_FILES | PROCESSOR_FILES | {"README.md"} <= set(files)
    card = card_of(files)
    assert card.data.to_dict() == {
        "datasets": ["my-org/captions"],
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "image-text-to-text",
        "tags": DEFAULT_TAGS + ["pushed"],
    }
    assert MODEL_CARD_MARKER in card.text
    assert 'AutoModel.from_pretrained("my-org/unifork-tiny", trust_remote_code=True)' in card.text

    # save_pretrained(push_to_hub=True) uploads the same set (the processor is saved before the upload)
    built_model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="my-org/other")
    assert set(hub.uploads["my-org/other"]) == set(files)
    assert card_of(hub.uploads["my-org/other"]).data.datasets == ["my-org/captions"]

    # the processor alone: its files, no weights
    built_model.processor.push_to_hub("my-org/processor")
    assert PROCESSOR_FILES <= set(hub.uploads["my-org/processor"])
    assert not MODEL_FILES & set(hub.uploads["my-org/processor"])


def test_push_to_hub_keeps_the_users_card_on_the_hub(built_model, hub, tmp_path):
    hub.readme = tmp_path / "hub_README.md"
    hub.readme.write_text("---\nlicense: mit\n---\n# Hand-written card\n")
    built_model.push_to_hub("my-org/unifork-tiny", tags=["pushed"])
    card = card_of(hub.uploads["my-org/unifork-tiny"])
    assert card.data.to_dict() == {"license": "mit", "tags": ["pushed"]}  # transformers only adds the tags
    assert "# Hand-written card" in card.text and MODEL_CARD_MARKER not in card.text

    # a card this package generated earlier is refreshed from the model's card_data (tags on the Hub are kept)
    hub.readme.write_text(str(build_model_card(built_model, license="bsd-3-clause", tags=["old"])))
    built_model.push_to_hub("my-org/unifork-tiny")
    card = card_of(hub.uploads["my-org/unifork-tiny"])
    assert card.data.license is None and card.data.tags == DEFAULT_TAGS + ["old"]
    assert MODEL_CARD_MARKER in card.text


def test_trainer_push_to_hub_uploads_the_card_with_the_training_summary(hub, tmp_path, monkeypatch):
    def upload_folder(self, repo_id, folder_path, **kwargs):  # Trainer uploads its output_dir in one call
        hub.uploads[repo_id] = {
            os.path.relpath(os.path.join(root, name), folder_path): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder_path)
            for name in names
        }

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    from unifork_hf.data.tiny import tiny_llm, tiny_tokenizer, tiny_vq
    from unifork_hf.training import UniForkTrainer, UniForkTrainingArguments, colour_dataset, prepare_generation

    model = UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer())
    train = prepare_generation(colour_dataset(8)["generation"], model.processor)
    args = UniForkTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        hub_model_id="my-org/trained",
    )
    trainer = UniForkTrainer(model=model, args=args, train_dataset=train, processing_class=model.processor)
    trainer.train()
    trainer.push_to_hub(license="apache-2.0")
    files = hub.uploads["my-org/trained"]
    assert MODEL_FILES | PROCESSOR_FILES | {"README.md"} <= set(files)
    card = card_of(files)
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert MODEL_CARD_MARKER in card.text and "| steps | 2 |" in card.text
