import numpy as np
import pandas as pd
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from unifork_hf.data.shapes import shapes_dataset
from unifork_hf.evaluation.alignment import _batch, modality_alignment, mutual_knn_alignment, plot_alignment


def test_identical_or_rotated_features_align_perfectly():
    torch.manual_seed(0)
    features = torch.randn(100, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    assert mutual_knn_alignment(features, features, k=10) == 1.0
    # cosine neighbourhoods survive rotations and per-sample scaling, and another width
    scaled = (features @ rotation) * torch.rand(100, 1).add(0.5)
    assert mutual_knn_alignment(features, torch.cat([scaled, torch.zeros(100, 5)], 1), k=10) == pytest.approx(1.0)


def test_independent_features_align_at_chance():
    torch.manual_seed(0)
    n, k = 400, 10
    values = [mutual_knn_alignment(torch.randn(n, 32), torch.randn(n, 32), k=k) for _ in range(5)]
    assert sum(values) / len(values) == pytest.approx(k / (n - 1), rel=0.25)


def test_a_hand_computed_case():
    # unit vectors at angles 0, 0.1, 0.3, 1.0 (a) and 0, 0.1, 1.0, 0.3 (b: samples 2 and 3 swapped)
    def angles(*values):
        return torch.tensor([[torch.cos(torch.tensor(v)), torch.sin(torch.tensor(v))] for v in values])

    a, b = angles(0.0, 0.1, 0.3, 1.0), angles(0.0, 0.1, 1.0, 0.3)
    # k=1 neighbours: a -> [1, 0, 1, 2], b -> [1, 0, 3, 1]: agreement on samples 0 and 1
    assert mutual_knn_alignment(a, b, k=1) == 0.5


def test_metric_errors():
    with pytest.raises(ValueError, match="same N"):
        mutual_knn_alignment(torch.randn(10, 4), torch.randn(11, 4))
    with pytest.raises(ValueError, match="k must be in 1..N-1 = 1..9"):
        mutual_knn_alignment(torch.randn(10, 4), torch.randn(10, 4), k=10)


@pytest.fixture(scope="module")
def pairs():
    return shapes_dataset(num_train=40, num_test=1, num_heldout=1, seed=0)["train"]


def test_alignment_along_each_task_path_of_a_unifork(built_model, pairs):
    config = built_model.config
    depth, k_shared = config.text_config.num_hidden_layers, config.num_shared_layers
    tables = {
        task: modality_alignment(built_model, pairs, task=task, k=5, batch_size=16, progress_bar=False)
        for task in ("understanding", "generation")
    }
    for task, table in tables.items():
        assert isinstance(table, pd.DataFrame) and list(table["layer"]) == list(range(depth + 1))
        assert list(table["branch"]) == ["shared"] * (k_shared + 1) + [task] * (depth - k_shared)
        assert table["alignment"].between(0, 1).all() and (table["num_samples"] == 40).all()
    # the branches are different weights: the deep layers must not agree across tasks by accident
    assert not tables["understanding"]["alignment"].equals(tables["generation"]["alignment"])
    again = modality_alignment(built_model, pairs, task="generation", k=5, batch_size=7, progress_bar=False)
    assert again["alignment"].tolist() == pytest.approx(tables["generation"]["alignment"].tolist(), abs=1e-9)


def test_layer_zero_pools_the_right_positions(built_model, pairs):
    """At depth 0 the features are the input embeddings: recompute them by hand."""
    processor = built_model.processor
    table = modality_alignment(built_model, pairs, task="generation", k=5, progress_bar=False)
    input_ids, attention_mask, text_mask = _batch(processor, list(pairs["caption"]), "generation")
    caption_tokens = [processor.tokenizer(c, add_special_tokens=False).input_ids for c in pairs["caption"]]
    assert [int(m.sum()) for m in text_mask] == [len(t) for t in caption_tokens]
    with torch.no_grad():
        text = torch.stack([built_model.model.embed_tokens(torch.tensor(t)).mean(0) for t in caption_tokens])
        image = built_model.model.embed_image_codes(processor.encode_images(list(pairs["image"]))).mean(1)
    assert table["alignment"][0] == pytest.approx(mutual_knn_alignment(image, text, k=5))


def test_alignment_of_a_plain_causal_lm_fed_the_same_sequences(built_model, pairs):
    processor = built_model.processor
    offset = len(processor.tokenizer)
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=offset + built_model.config.codebook_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    table = modality_alignment(
        llm, pairs, task="generation", k=5, processor=processor, image_token_offset=offset, progress_bar=False
    )
    assert list(table["layer"]) == [0, 1, 2, 3] and set(table["branch"]) == {"llm"}
    with pytest.raises(ValueError, match="image_token_offset"):
        modality_alignment(llm, pairs, processor=processor)


def test_alignment_errors_and_plot(built_model, pairs, tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        modality_alignment(built_model, pairs, task="both")
    with pytest.raises(ValueError, match="lacks the column"):
        modality_alignment(built_model, pairs.rename_column("caption", "text"))
    with pytest.raises(ValueError, match="k must be in"):
        modality_alignment(built_model, pairs, k=40)
    table = modality_alignment(built_model, pairs, task="generation", k=5, progress_bar=False)
    blank = plot_alignment({}, str(tmp_path / "empty.png"))
    path = plot_alignment({"generation": table}, str(tmp_path / "alignment.png"))
    from PIL import Image

    drawn, empty = np.asarray(Image.open(path).convert("RGB")), np.asarray(Image.open(blank).convert("RGB"))
    assert drawn.shape == empty.shape and drawn.shape[0] > 100

    # the curve: coloured (not grey) pixels that the axes alone do not have
    def coloured(a):
        return int((a.astype(int).max(-1) - a.astype(int).min(-1) > 60).sum())

    assert coloured(drawn) > 200 and coloured(empty) == 0


def test_cli_analyze_alignment(built_dir, tmp_path, capsys):
    import unifork_hf.cli as cli

    png, csv = tmp_path / "alignment.png", tmp_path / "alignment.csv"
    cli.main(["analyze-alignment", "--model", built_dir, "-n", "20", "-k", "3", "--out", str(png), "--csv", str(csv)])
    out = capsys.readouterr().out
    table = pd.read_csv(csv)
    layers = table["layer"].max() + 1
    assert len(table) == 2 * layers and set(table["task"]) == {"understanding", "generation"}
    assert out.count("\n") >= layers + 2 and "understanding" in out and png.exists()
    # the printed numbers are the table's
    first = out.splitlines()[2].split()
    assert float(first[1]) == pytest.approx(table["alignment"][0], abs=5e-4)
