"""Image-text alignment along depth: the measurement behind UniFork's Y shape.

UniFork's observation: along a task's path through the layers, the alignment between the image and the
text of a paired sample rises steadily for understanding, but for generation it rises in early layers
and falls in deep ones (the deep layers turn to producing image detail). Alignment is the mutual
k-nearest-neighbour metric of the Platonic Representation Hypothesis paper (Huh et al., 2024): for N
paired samples with image features `x_i` and text features `y_i`,

    alignment = mean_i |kNN_x(i) ∩ kNN_y(i)| / k

where kNN_x(i) are the k samples whose image features are most cosine-similar to sample i's (itself
excluded). Identical neighbourhoods give 1.0; unrelated features give about k / (N - 1).

Example:

```python
>>> import os, tempfile, unifork_hf
>>> from unifork_hf import UniForkForConditionalGeneration
>>> from unifork_hf.evaluation.alignment import modality_alignment, plot_alignment
>>> from unifork_hf.data.shapes import shapes_dataset
>>> model = UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
>>> test = shapes_dataset(num_train=0, num_test=100, num_heldout=0)["test"]
>>> table = modality_alignment(model, test, task="generation", k=10, progress_bar=False)
>>> table[["layer", "branch"]].values.tolist()  # and `alignment`: one value per depth along the path
[[0, 'shared'], [1, 'shared'], [2, 'shared'], [3, 'generation'], [4, 'generation']]
>>> path = plot_alignment({"UniFork generation": table}, os.path.join(tempfile.mkdtemp(), "alignment.png"))

```
"""

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..modeling.modeling_unifork import UniForkForConditionalGeneration

TASKS = ("understanding", "generation")


def mutual_knn_alignment(features_a: torch.Tensor, features_b: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of shared k-nearest neighbours (cosine similarity, self excluded) of two `(N, D)` feature sets."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[0] != features_b.shape[0]:
        raise ValueError(
            "features_a and features_b must be (N, D_a) and (N, D_b) with the same N, got "
            f"{tuple(features_a.shape)} and {tuple(features_b.shape)}."
        )
    n = features_a.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..N-1 = 1..{n - 1}, got {k}.")

    def neighbours(features):
        features = torch.nn.functional.normalize(features.double(), dim=-1)
        similarity = features @ features.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.topk(k, dim=-1).indices

    a, b = neighbours(features_a), neighbours(features_b)
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)  # |kNN_a(i) ∩ kNN_b(i)|
    return (shared.double() / k).mean().item()


def _sequence_text(processor, caption: str, task: str) -> str:
    """The task's input layout for a paired sample: caption then image (generation), image then caption
    (understanding), as the model sees them in training."""
    if task == "generation":
        return processor.image_generation_sequence(caption)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": caption}]}]
    text = processor.apply_chat_template(conversation, tokenize=False)
    if text.count(processor.image_token) != 1:
        raise ValueError("The processor's chat template must render one image placeholder per image.")
    return text.replace(processor.image_token, processor.image_sequence())


def _batch(processor, captions, task):
    """Tokenized sequences plus, per row, a mask of the caption's tokens (from character offsets)."""
    texts = [_sequence_text(processor, caption, task) for caption in captions]
    encoding = processor.tokenizer(
        texts,
        padding=True,
        padding_side="left",
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    text_mask = torch.zeros_like(encoding.input_ids, dtype=torch.bool)
    for row, (text, caption) in enumerate(zip(texts, captions)):
        start = text.find(caption)
        end = start + len(caption)
        offsets = encoding.offset_mapping[row]
        text_mask[row] = (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
        text_mask[row] &= encoding.attention_mask[row].bool()
    return encoding.input_ids, encoding.attention_mask, text_mask


@torch.no_grad()
def modality_alignment(
    model,
    dataset,
    task: str = "generation",
    k: int = 10,
    num_samples: int | None = None,
    batch_size: int = 32,
    processor=None,
    image_token_offset: int | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    progress_bar: bool = True,
) -> pd.DataFrame:
    """Mutual k-NN alignment of mean-pooled image and caption features at every depth of a task's path.

    Args:
        model: a [`UniForkForConditionalGeneration`] (features along `task`'s path: shared layers, then
            that task's branch), or a plain transformers causal LM fed the same token sequences with the
            image codes as tokens `image_token_offset + code` (then `processor` is required for the
            text layout and the VQ).
        dataset: rows with an image and its caption (`image_column`, `caption_column`).
        task: `"understanding"` (image then caption) or `"generation"` (caption then image).
        k: neighbours per sample; `num_samples` (default all) must exceed it.
        processor: a UniFork processor with its VQ (default: the UniFork model's own).

    Returns:
        A DataFrame with one row per depth: `layer` (0 = input embeddings, i = output of layer i),
        `alignment`, `branch` ("shared" / the task, or "llm"), `task`, `k`, `num_samples`.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    is_unifork = isinstance(model, UniForkForConditionalGeneration)
    processor = processor or getattr(model, "processor", None)
    if processor is None:
        raise ValueError("modality_alignment needs a UniFork processor (with its VQ) to build the sequences.")
    if not is_unifork and image_token_offset is None:
        raise ValueError("A plain causal LM needs image_token_offset: image code c is fed as token offset + c.")
    missing = [c for c in (image_column, caption_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset lacks the column(s) {missing}; it has {dataset.column_names}.")
    num_samples = len(dataset) if num_samples is None else num_samples
    if num_samples > len(dataset):
        raise ValueError(f"num_samples={num_samples} but the dataset has only {len(dataset)} rows.")
    if not 1 <= k < num_samples:
        raise ValueError(f"k must be in 1..num_samples-1 = 1..{num_samples - 1}, got {k}.")

    model.eval()
    device = model.device
    image_id = processor.image_token_id
    image_features, text_features = [], []
    for start in tqdm(range(0, num_samples, batch_size), desc=f"alignment ({task})", disable=not progress_bar):
        rows = dataset[start : min(start + batch_size, num_samples)]
        input_ids, attention_mask, text_mask = _batch(processor, list(rows[caption_column]), task)
        codes = processor.encode_images(list(rows[image_column])).to(device)
        is_image = input_ids == image_id
        inputs = {"attention_mask": attention_mask.to(device), "output_hidden_states": True}
        if is_unifork:
            inputs.update(input_ids=input_ids.to(device), image_ids=codes, task=task)
        else:
            ids = input_ids.clone()
            ids[is_image] = codes.reshape(-1).cpu() + image_token_offset
            inputs.update(input_ids=ids.to(device))
        hidden_states = model(**inputs).hidden_states
        for mask, store in ((is_image, image_features), (text_mask, text_features)):
            weights = mask.to(device, hidden_states[0].dtype)[:, :, None]
            store.append(torch.stack([(h * weights).sum(1) / weights.sum(1) for h in hidden_states]).float().cpu())
    image_features, text_features = torch.cat(image_features, 1), torch.cat(text_features, 1)

    shared = model.config.num_shared_layers if is_unifork else None
    rows = []
    for layer in range(image_features.shape[0]):
        if is_unifork:
            branch = "shared" if layer <= shared else task
        else:
            branch = "llm"
        alignment = mutual_knn_alignment(image_features[layer], text_features[layer], k)
        rows.append(
            {"layer": layer, "alignment": alignment, "branch": branch, "task": task, "k": k, "num_samples": num_samples}
        )
    return pd.DataFrame(rows)


def plot_alignment(tables: dict, path: str, title: str | None = None) -> str:
    """Write a PNG with one alignment-vs-depth curve per entry of `{label: modality_alignment table}`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4))
    for label, table in tables.items():
        (line,) = axes.plot(table["layer"], table["alignment"], marker="o", label=label)
        if "branch" in table and (table["branch"] == "shared").any():  # mark the fork point in the curve's colour
            fork = table.loc[table["branch"] == "shared", "layer"].max()
            axes.axvline(fork, color=line.get_color(), linestyle=":", linewidth=1)
    chance = {
        k / n
        for table in tables.values()
        if {"k", "num_samples"} <= set(table.columns)
        for k, n in zip(table["k"], table["num_samples"])
    }
    if len(chance) == 1:  # what independent features would score: each kNN set overlaps by k/N on average
        axes.axhline(chance.pop(), color="black", linestyle="--", linewidth=0.8, label="chance (k/N)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("layer (0 = embeddings)")
    axes.set_ylabel("mutual k-NN alignment (image vs caption)")
    axes.set_title(title or "Image-text alignment along depth")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # outside: curves cross a lot
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
