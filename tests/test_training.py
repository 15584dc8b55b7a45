import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset, concatenate_datasets, load_from_disk
from PIL import Image
from safetensors.torch import load_file, save_file

from unifork_hf import GENERATION, UNDERSTANDING, UniForkForConditionalGeneration
from unifork_hf.data.tiny import tiny_llm, tiny_tokenizer, tiny_vq
from unifork_hf.training import (
    FREEZING_POLICIES,
    UniForkDataCollator,
    UniForkTrainer,
    UniForkTrainingArguments,
    apply_freezing,
    colour_dataset,
    mix_tasks,
    prepare_generation,
    prepare_understanding,
    pretokenize_images,
)
from unifork_hf.training.recipes import load_recipe, run_recipe

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "..", "configs", "tiny-colours.yaml")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def prepared(model):
    parts = colour_dataset(16, seed=0)
    und = prepare_understanding(parts["understanding"], model.processor)
    gen = prepare_generation(parts["generation"], model.processor)
    return und, gen, parts


def training_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return UniForkTrainingArguments(**kwargs)


def test_understanding_labels_cover_exactly_the_answers(model, prepared):
    und, _, parts = prepared
    processor = model.processor
    row = und[0]
    answer = parts["understanding"][0]["messages"][1]["content"][0]["text"]
    ids, labels = row["input_ids"], row["labels"]
    expected = processor.tokenizer(answer, add_special_tokens=False).input_ids + [processor.tokenizer.eos_token_id]
    kept = [i for i, label in enumerate(labels) if label != -100]
    assert [labels[i] for i in kept] == [ids[i] for i in kept] == expected
    # the answer is the last turn: its tokens sit right after the assistant header, before the final newline
    assert kept == list(range(len(ids) - 1 - len(expected), len(ids) - 1))
    assert ids.count(processor.image_token_id) == processor.image_seq_length
    assert row["task"] == UNDERSTANDING and row["prompt_length"] == 0


def test_generation_labels_cover_every_image_token(model, prepared):
    _, gen, parts = prepared
    processor = model.processor
    row = gen[3]
    prompt = processor.tokenizer(
        processor.image_generation_prompt(parts["generation"][3]["caption"]), add_special_tokens=False
    ).input_ids
    n = processor.image_seq_length
    assert row["input_ids"] == prompt + [processor.image_token_id] * n + [processor.eoi_token_id]
    assert row["labels"] == [-100] * len(prompt) + [processor.image_token_id] * n + [-100]
    assert row["prompt_length"] == len(prompt) and row["task"] == GENERATION and row["row"] == 3
    batch = UniForkDataCollator(processor, cfg_dropout=0.0)([row])
    out = model(**batch)  # all 64 image tokens are trained (the official code trained the first 256 of 576)
    first = row["input_ids"].index(processor.image_token_id)
    codes = model.model.image_tokenizer.encode(batch["pixel_values"])[0]
    expected = torch.nn.functional.cross_entropy(out.image_logits[0, first - 1 : first - 1 + n], codes)
    torch.testing.assert_close(out.loss_generation, expected)


def test_collator_pads_on_the_right_and_routes_tasks(model, prepared):
    und, gen, _ = prepared
    rows = [und[0], gen[0], und[1]]
    batch = UniForkDataCollator(model.processor, cfg_dropout=0.0)(rows)
    assert batch["task"].tolist() == [UNDERSTANDING, GENERATION, UNDERSTANDING]
    lengths = [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["pixel_values"].shape == (3, 3, 32, 32)
    for i, length in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert batch["labels"][i, length:].eq(-100).all()


def test_mixed_batch_losses_equal_single_task_batches(model, prepared, tmp_path):
    und, gen, _ = prepared
    collator = UniForkDataCollator(model.processor, cfg_dropout=0.0)
    trainer = UniForkTrainer(
        model=model,
        args=training_args(tmp_path, freeze="none"),
        data_collator=collator,
        processing_class=model.processor,
    )
    model.eval()
    with torch.no_grad():
        _, mixed = trainer.compute_loss(model, collator([und[0], gen[0], und[1], gen[1]]), return_outputs=True)
        _, und_only = trainer.compute_loss(model, collator([und[0], und[1]]), return_outputs=True)
        _, gen_only = trainer.compute_loss(model, collator([gen[0], gen[1]]), return_outputs=True)
    torch.testing.assert_close(mixed.loss_understanding, und_only.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.loss_generation, gen_only.loss, atol=1e-5, rtol=0)
    n_und = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in (und[0], und[1]))
    n_gen = 2 * 64
    expected = (und_only.loss * n_und + gen_only.loss * n_gen) / (n_und + n_gen)
    torch.testing.assert_close(mixed.loss, expected, atol=1e-5, rtol=0)


def test_cfg_dropout_rate_and_what_is_dropped(model):
    processor = model.processor
    rows = [
        {
            "task": GENERATION,
            "row": i,
            "prompt_length": 3,
            "input_ids": [7, 8, 9, 10, 11],
            "labels": [-100] * 3 + [1, 2],
        }
        for i in range(4000)
    ]
    collator = UniForkDataCollator(processor, cfg_dropout=0.1)
    dropped = [collator.drops_prompt(row) for row in rows]
    assert abs(sum(dropped) / len(rows) - 0.1) < 0.015
    collator.epoch = 1  # a new epoch drops other rows at the same rate
    again = [collator.drops_prompt(row) for row in rows]
    assert abs(sum(again) / len(rows) - 0.1) < 0.015 and again != dropped
    assert not any(collator.drops_prompt({**row, "task": UNDERSTANDING}) for row in rows[:500])
    collator.epoch = 0
    row = rows[dropped.index(True)]
    batch = collator([row])
    empty = collator.unconditional_prompt
    assert batch["input_ids"][0].tolist() == empty + [10, 11]
    assert batch["labels"][0].tolist() == [-100] * len(empty) + [1, 2]
    assert empty == processor.tokenizer(processor.image_generation_prompt(""), add_special_tokens=False).input_ids
    assert UniForkDataCollator(processor, cfg_dropout=0.0).drops_prompt(row) is False
    with pytest.raises(ValueError, match="cfg_dropout"):
        UniForkDataCollator(processor, cfg_dropout=1.5)


@pytest.mark.parametrize("policy", sorted(FREEZING_POLICIES))
def test_freezing_policies_train_exactly_their_parameters(policy):
    torch.manual_seed(0)
    model = UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer())
    trainable = apply_freezing(model, policy)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == trainable
    k, branch = model.config.num_shared_layers, model.config.num_branch_layers
    per_layer = {n.split(".", 3)[3] for n, _ in model.named_parameters() if n.startswith("model.shared_layers.0.")}
    layers = lambda prefix, count: {f"{prefix}.{i}.{p}" for i in range(count) for p in per_layer}  # noqa: E731
    expected = {
        "align": {
            "model.image_projector.linear_1.weight",
            "model.image_projector.linear_1.bias",
            "model.image_projector.linear_2.weight",
            "model.image_projector.linear_2.bias",
            "lm_head.weight",
            "generation_head.weight",
        },
        "generation_branch": layers("model.generation_layers", branch)
        | {"model.generation_norm.weight", "generation_head.weight"},
        "understanding_branch": layers("model.understanding_layers", branch)
        | {"model.understanding_norm.weight", "lm_head.weight"},
    }
    vq = {n for n, _ in model.named_parameters() if n.startswith("model.image_tokenizer.")}
    everything = {n for n, _ in model.named_parameters()}
    expected["joint"] = everything - vq
    assert names == expected[policy]
    assert len(layers("model.shared_layers", k) & names) == (len(per_layer) * k if policy == "joint" else 0)
    assert not names & vq


def test_bad_rows_name_the_column_and_the_row(model):
    processor = model.processor
    image = Image.new("RGB", (8, 8))
    good = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
    ]
    with pytest.raises(ValueError, match=r"Row 1: column 'caption' must be a string, got None"):
        prepare_generation(Dataset.from_dict({"image": [image, image], "caption": ["ok", None]}), processor)
    with pytest.raises(ValueError, match=r"Row 0: column 'picture' must be an image, got 'not an image'"):
        prepare_generation(
            Dataset.from_dict({"picture": ["not an image"], "caption": ["x"]}), processor, image_column="picture"
        )
    with pytest.raises(ValueError, match=r"Row 0: column 'caption' must be a caption without '<image>'"):
        prepare_generation(Dataset.from_dict({"image": [image], "caption": ["a <image> here"]}), processor)
    with pytest.raises(ValueError, match=r"Generation dataset has no column 'caption'"):
        prepare_generation(Dataset.from_dict({"image": [image], "text": ["x"]}), processor)
    with pytest.raises(
        ValueError, match=r"Row 1: column 'messages' must be a conversation with one image item per image"
    ):
        prepare_understanding(
            Dataset.from_dict({"images": [[image], [image, image]], "messages": [good, good]}), processor
        )
    with pytest.raises(
        ValueError, match=r"Row 0: column 'messages' must be a conversation with at least one assistant"
    ):
        prepare_understanding(Dataset.from_dict({"images": [[image]], "messages": [good[:1]]}), processor)
    with pytest.raises(ValueError, match=r"Understanding dataset has no column 'images'"):
        prepare_understanding(Dataset.from_dict({"messages": [good]}), processor)


def test_pretokenized_images_are_encoded_once(model, prepared, tmp_path):
    und, gen, _ = prepared
    train = mix_tasks(und, gen, 0.5)
    pretokenized = pretokenize_images(train, model.processor)
    assert "images" not in pretokenized.column_names
    assert pretokenized[0]["image_ids"] == model.processor.encode_images(train[0]["images"]).tolist()
    # the fingerprint (datasets' cache key) depends on the tiling: tiled codes never reuse untiled ones
    model.model.image_tokenizer.tile_size = model.model.image_tokenizer.downsampling_factor
    try:
        assert pretokenize_images(train, model.processor)._fingerprint != pretokenized._fingerprint
    finally:
        model.model.image_tokenizer.tile_size = None
    # a dataset cached on disk: datasets reuses a map's result by its fingerprint, so a changed VQ *encoder*
    # (the codebook untouched) must give a new fingerprint, and the new codes (it used to return the old)
    train.save_to_disk(tmp_path / "rows")
    cached = load_from_disk(tmp_path / "rows")
    before = pretokenize_images(cached, model.processor)["image_ids"]
    encoder = model.model.image_tokenizer.vq.encoder.conv_in
    saved = encoder.weight.detach().clone()
    try:
        with torch.no_grad():
            encoder.weight.mul_(-1)
        after = pretokenize_images(cached, model.processor)
        assert after["image_ids"] == [model.processor.encode_images(images).tolist() for images in train["images"]]
        assert after["image_ids"] != before
    finally:
        with torch.no_grad():
            encoder.weight.copy_(saved)
    calls = []
    original = model.model.image_tokenizer.encode
    model.model.image_tokenizer.encode = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        trainer = UniForkTrainer(
            model=model,
            args=training_args(
                tmp_path, max_steps=len(pretokenized) // 2, per_device_train_batch_size=4, num_train_epochs=2
            ),
            train_dataset=pretokenized,
            processing_class=model.processor,
        )
        trainer.train()
    finally:
        model.model.image_tokenizer.encode = original
    assert trainer.state.epoch >= 1.9 and calls == []


def test_training_draws_new_cfg_dropout_each_epoch(model, prepared, tmp_path, monkeypatch):
    und, gen, _ = prepared
    train = mix_tasks(und, gen, 0.5)
    seen = []  # (epoch, row, prompt dropped) for every generation row the collator gets
    real_call = UniForkDataCollator.__call__

    def recording_call(self, rows):
        seen.extend((self.epoch, row["row"], self.drops_prompt(row)) for row in rows if row["task"] == GENERATION)
        return real_call(self, rows)

    monkeypatch.setattr(UniForkDataCollator, "__call__", recording_call)
    args = training_args(
        tmp_path, max_steps=-1, num_train_epochs=3, per_device_train_batch_size=8, cfg_dropout=0.4, learning_rate=0.0
    )
    UniForkTrainer(model=model, args=args, train_dataset=train, processing_class=model.processor).train()
    epochs = sorted({epoch for epoch, _, _ in seen})
    assert epochs == [0, 1, 2]  # the trainer tells the collator each new epoch (nothing else does)
    dropped = [{row for epoch, row, drop in seen if epoch == e and drop} for e in epochs]
    assert all(dropped) and len({frozenset(d) for d in dropped}) == 3  # other prompts dropped in each epoch


def test_streaming_datasets_train(model, prepared, tmp_path, monkeypatch):
    _, _, parts = prepared
    processor = model.processor
    und = prepare_understanding(parts["understanding"].to_iterable_dataset(), processor)
    gen = prepare_generation(parts["generation"].to_iterable_dataset(), processor)
    train = pretokenize_images(mix_tasks(und, gen, 0.5), processor)
    trainer = UniForkTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=3, cfg_dropout=0.0),
        train_dataset=train,
        processing_class=processor,
    )
    batches = []
    real_collate = UniForkDataCollator.__call__
    monkeypatch.setattr(
        UniForkDataCollator, "__call__", lambda self, rows: batches.append(real_collate(self, rows)) or batches[-1]
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logged) == 3 and all("loss_understanding" in log or "loss_generation" in log for log in logged)
    # the first batch holds the stream's first rows, in order and unchanged (right-padded)
    first = list(itertools.islice(iter(train), 4))
    batch = batches[0]
    assert [ids[: int(mask.sum())] for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"])] == [
        row["input_ids"] for row in first
    ]
    assert batch["task"].tolist() == [row["task"] for row in first]
    changed = [name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])]
    assert changed  # the stream trained the model


def test_task_stratified_batches_hold_each_task_in_proportion(model, tmp_path):
    processor = model.processor
    rows = colour_dataset(64, seed=1)
    # understanding rows of two kinds (lengths): length grouping would put each kind in batches of its own
    long = rows["understanding"].map(
        lambda row: {
            "messages": [
                {
                    **row["messages"][0],
                    "content": row["messages"][0]["content"][:1]
                    + [{"type": "text", "text": "What colour is the shape in this picture, would you say?"}],
                },
                row["messages"][1],
            ]
        }
    )
    und = prepare_understanding(concatenate_datasets([rows["understanding"], long]), processor)
    train = mix_tasks(und, prepare_generation(rows["generation"], processor), generation_ratio=0.3, seed=0)
    share = sum(t == UNDERSTANDING for t in train["task"]) / len(train)

    def batches(seed, strategy="task_stratified", dataset=train):
        trainer = UniForkTrainer(
            model=model,
            args=training_args(tmp_path, per_device_train_batch_size=10, seed=seed, train_sampling_strategy=strategy),
            train_dataset=dataset,
            processing_class=processor,
        )
        return list(trainer.get_train_dataloader())

    first = batches(0)
    assert len(first) == len(train) // 10 + (len(train) % 10 > 0)
    for batch in first[:-1]:
        understanding = int((batch["task"] == UNDERSTANDING).sum())
        assert abs(understanding - 10 * share) < 1, (understanding, 10 * share)
    lengths = [set(batch["attention_mask"][batch["task"] == UNDERSTANDING].sum(1).tolist()) for batch in first]
    assert sum(len(kinds) > 1 for kinds in lengths) > len(first) / 2  # both kinds mixed in most batches
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, batches(0)))  # seeded
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, batches(1)))
    grouped = batches(
        0, "group_by_length", train.add_column("length", [len(ids) for ids in train["input_ids"]])
    )  # what the recipe used to do: whole batches of one task
    assert any(int((batch["task"] == UNDERSTANDING).sum()) in (0, 10) for batch in grouped)


@pytest.mark.parametrize("share", [0.25, 0.8, None])
def test_understanding_loss_share_sets_each_tasks_share_of_loss_and_gradient(model, prepared, tmp_path, share):
    und, gen, _ = prepared
    processor = model.processor
    collator = UniForkDataCollator(processor, cfg_dropout=0.0)
    mixed = collator([und[0], gen[0], und[1], gen[1], gen[2]])
    alone = {
        task: collator(rows)
        for task, rows in ((UNDERSTANDING, [und[0], und[1]]), (GENERATION, [gen[0], gen[1], gen[2]]))
    }
    trainer = UniForkTrainer(
        model=model,
        args=training_args(tmp_path, understanding_loss_share=share),
        train_dataset=und,
        processing_class=processor,
    )
    model.train()

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        # a head the loss does not reach has no gradient at all
        return tuple(
            torch.zeros_like(w) if w.grad is None else w.grad.clone()
            for w in (model.lm_head.weight, model.generation_head.weight)
        )

    items = trainer._get_num_items_in_batch([mixed], torch.device("cpu"))
    loss = trainer.compute_loss(model, mixed, num_items_in_batch=items)
    und_grad, gen_grad = gradients(loss)
    # independent values: each task's own batch, its plain token-mean loss
    und_loss, gen_loss = (model(**alone[task]).loss for task in (UNDERSTANDING, GENERATION))
    und_tokens, gen_tokens = ((alone[task]["labels"][:, 1:] != -100).sum() for task in (UNDERSTANDING, GENERATION))
    if share is None:  # one token mean: each task weighs its share of the labelled tokens
        weights = (und_tokens / (und_tokens + gen_tokens), gen_tokens / (und_tokens + gen_tokens))
    else:
        weights = (share, 1 - share)
    torch.testing.assert_close(loss, weights[0] * und_loss + weights[1] * gen_loss)
    # the understanding loss alone reaches the LM head, the generation loss alone the image head
    torch.testing.assert_close(und_grad, weights[0] * gradients(model(**alone[UNDERSTANDING]).loss)[0])
    torch.testing.assert_close(gen_grad, weights[1] * gradients(model(**alone[GENERATION]).loss)[1])
    trainer._logged["understanding_share"].zero_()
    trainer._log_task_losses(model(**mixed), mixed, share, token_mean=share is None)
    part = weights[0] * und_loss
    torch.testing.assert_close(
        trainer._logged["understanding_share"][0], (part / (part + weights[1] * gen_loss)).detach()
    )
    model.zero_grad()
    model.eval()


def test_training_logs_the_understanding_share(model, prepared, tmp_path):
    und, gen, _ = prepared
    trainer = UniForkTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, understanding_loss_share=0.4),
        train_dataset=mix_tasks(und, gen, 0.5),
        processing_class=model.processor,
    )
    trainer.train()
    for log in [log for log in trainer.state.log_history if "loss" in log]:
        part = 0.4 * log["loss_understanding"]
        assert log["understanding_share"] == pytest.approx(part / (part + 0.6 * log["loss_generation"]), abs=2e-3)
        assert log["loss"] == pytest.approx(part + 0.6 * log["loss_generation"], abs=2e-3)
    with pytest.raises(ValueError, match=r"understanding_loss_share must be in \(0, 1\) or None"):
        training_args(tmp_path, understanding_loss_share=1.0)
    with pytest.raises(ValueError, match="train_sampling_strategy must be one of"):
        training_args(tmp_path, train_sampling_strategy="by_task")


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """Per-task mean losses, but the optimised loss is normalised over the whole accumulated batch."""
    weights = []
    for batch, accumulation in ((8, 1), (4, 2)):
        out = tmp_path / f"b{batch}"
        subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "train_script.py"),
                str(out),
                "--per-device-batch",
                str(batch),
                "--grad-accum",
                str(accumulation),
                "--max-steps",
                "4",
            ],
            check=True,
            capture_output=True,
        )
        weights.append(load_file(out / "final.safetensors"))
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=2e-6, rtol=0, msg=name)


def test_two_process_ddp_matches_one_process(tmp_path):
    script = os.path.join(HERE, "train_script.py")
    single, double = tmp_path / "single", tmp_path / "ddp"
    common = ["--max-steps", "6", "--cfg-dropout", "0.1"]
    subprocess.run(
        [sys.executable, script, str(single), "--per-device-batch", "8", *common], check=True, capture_output=True
    )
    # --standalone: a free port of its own (a fixed port can meet another run's rendezvous)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    with subprocess.Popen(
        [*command, str(double), "--per-device-batch", "4", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            # SIGTERM: the launcher stops its workers (each in a session of its own, out of reach of a killpg)
            process.terminate()
            output, _ = process.communicate(timeout=60)
            pytest.fail(f"2-process training did not finish in 300 s; its output:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    a, b = load_file(single / "final.safetensors"), load_file(double / "final.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-6, rtol=0, msg=name)
    losses = [[log["loss"] for log in json.load(open(d / "losses.json"))] for d in (single, double)]
    assert len(losses[0]) == 6
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-4, rtol=0)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    script = [sys.executable, os.path.join(HERE, "train_script.py")]
    common = ["--max-steps", "20", "--save-steps", "8", "--cfg-dropout", "0.3"]  # 20 steps cross an epoch
    subprocess.run([*script, str(tmp_path / "full"), *common], check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*script, str(killed), *common, "--step-delay", "0.3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoint-16" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final.safetensors").exists()
    subprocess.run([*script, str(killed), *common, "--resume"], check=True, capture_output=True)
    a, b = load_file(tmp_path / "full" / "final.safetensors"), load_file(killed / "final.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def test_recipe_trains_both_tasks_and_both_losses_fall(tmp_path, capsys):
    trainer = run_recipe(
        RECIPE,
        {
            "training": {"output_dir": str(tmp_path), "max_steps": 60, "logging_steps": 10, "save_strategy": "no"},
            "image_generation": {"guidance_scale": 1.5},
        },
    )
    logs = [log for log in trainer.state.log_history if "loss" in log]
    for name in ("loss_understanding", "loss_generation"):
        assert logs[-1][name] < 0.8 * logs[0][name], (name, logs)
    assert os.path.exists(tmp_path / "model.safetensors") and os.path.exists(tmp_path / "processor_config.json")
    reloaded = UniForkForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.processor is not None
    # the checkpoint says how to sample it: the recipe's settings over the library's
    assert reloaded.generation_config.image_generation == {
        "guidance_scale": 1.5,
        "temperature": 1.0,
        "top_k": None,
        "top_p": None,
    }


def test_cli_resume_true_continues_from_the_last_checkpoint(tmp_path, capsys):
    from unifork_hf.cli import main

    common = ["train", "--recipe", RECIPE, "--output-dir", str(tmp_path)]
    main([*common, "--max-steps", "4"])  # the recipe saves a checkpoint at step 4
    assert os.path.isdir(tmp_path / "checkpoint-4")
    # mark the checkpoint: a run that resumes from it carries the mark, one that starts afresh does not
    weights = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    marked = next(name for name in weights if "generation_head" in name)
    save_file(
        {**weights, marked: weights[marked] + 1.0},
        tmp_path / "checkpoint-4" / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(SystemExit):  # a changed weights file is refused while its checksums say otherwise
        main([*common, "--max-steps", "6", "--resume", "true"])
    assert "does not match its checksum" in capsys.readouterr().err
    (tmp_path / "checkpoint-4" / "weights.sha256").unlink()
    main([*common, "--max-steps", "6", "--resume", "true"])  # used to fail: "Can't find a valid checkpoint at true"
    assert json.load(open(tmp_path / "checkpoint-6" / "trainer_state.json"))["global_step"] == 6
    main(["train", "--recipe", RECIPE, "--output-dir", str(tmp_path / "fresh"), "--max-steps", "6"])
    resumed, fresh = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "fresh" / "model.safetensors")
    assert (resumed[marked] - fresh[marked]).mean() > 0.9  # two steps at lr 3e-3 move it far less than 1


def test_resume_refuses_a_checkpoint_it_cannot_continue(prepared, tmp_path):
    und, gen, _ = prepared
    train = mix_tasks(und, gen, 0.5)

    def trainer(num_shared_layers=1, **args):
        torch.manual_seed(0)
        model = UniForkForConditionalGeneration.from_pretrained_llm(
            tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer(), num_shared_layers=num_shared_layers
        )
        return UniForkTrainer(
            model=model,
            args=training_args(tmp_path, save_strategy="steps", save_steps=2, **args),
            train_dataset=train,
            processing_class=model.processor,
        )

    with pytest.raises(ValueError, match="holds no checkpoint-"):
        trainer().train(resume_from_checkpoint=True)
    trainer(max_steps=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    with pytest.raises(ValueError, match=r"its model has num_shared_layers=1, this run's model num_shared_layers=2"):
        trainer(num_shared_layers=2, max_steps=4).train(
            resume_from_checkpoint=True
        )  # used to fail late, in the optimizer
    os.remove(checkpoint / "optimizer.pt")
    with pytest.raises(ValueError, match=r"it has no optimizer.pt, so the optimizer .* resume_without_optimizer_state"):
        trainer(max_steps=4).train(resume_from_checkpoint=str(checkpoint))  # used to start a fresh optimizer silently
    resumed = trainer(max_steps=4, resume_without_optimizer_state=True)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4


def test_resuming_a_tied_head_warns_only_of_weights_really_missing(prepared, tmp_path):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    und, gen, _ = prepared

    def trainer(max_steps):
        torch.manual_seed(0)
        model = UniForkForConditionalGeneration.from_pretrained_llm(
            tiny_llm(tie_word_embeddings=True), tiny_vq(), tokenizer=tiny_tokenizer()
        )
        assert model.lm_head.weight is model.get_input_embeddings().weight  # the premise: one tensor, saved once
        return UniForkTrainer(
            model=model,
            args=training_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=max_steps),
            train_dataset=mix_tasks(und, gen, 0.5),
            processing_class=model.processor,
        )

    trainer(2).train()
    resumed = trainer(4)
    state = resumed.model.state_dict()
    norm = next(name for name, _ in resumed.model.named_parameters() if name.endswith("norm.weight"))
    partial = {name: value for name, value in state.items() if name not in ("lm_head.weight", norm)}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_warning()  # conftest quiets transformers to errors
    try:
        with CaptureLogger(logging.get_logger("transformers.trainer")) as resume_log:
            resumed.train(resume_from_checkpoint=True)
        with CaptureLogger(logging.get_logger("transformers.trainer")) as partial_log:
            resumed._issue_warnings_after_load(resumed.model.load_state_dict(partial, strict=False))
    finally:
        logging.set_verbosity(verbosity)
    assert resumed.state.global_step == 4
    assert "missing keys" not in resume_log.out  # Trainer alone: "missing keys ... ['lm_head.weight']"
    assert f"missing keys in the checkpoint model loaded: ['{norm}']" in partial_log.out  # a real gap is still named


def test_trainer_writes_the_unifork_card_with_a_training_summary(model, prepared, tmp_path):
    from huggingface_hub import ModelCard

    und, gen, _ = prepared
    trainer = UniForkTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, freeze="generation_branch"),
        train_dataset=mix_tasks(und, gen, 0.5),
        processing_class=model.processor,
    )
    trainer.train()
    trainer.create_model_card(license="apache-2.0", dataset="colours", tags="smoke-test")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["colours"]
    assert {"unifork", "custom_code", "smoke-test"} <= set(card.data.tags)
    assert "| steps | 2 |" in card.text and "| freezing stage | generation_branch |" in card.text
    last = [log for log in trainer.state.log_history if "loss" in log][-1]
    assert f"| last loss_generation | {round(last['loss_generation'], 4)} |" in card.text
    apply_freezing(model, "joint")


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {tiny: true, layers: 3}\n", r"section 'model' has unknown keys \['layers'\]"),
        ("modle: {}\n", r"unknown sections \['modle'\]"),
        ("image_generation: {cfg: 2}\n", r"section 'image_generation' has unknown keys \['cfg'\]"),
        ("training: {freeze: everything}\n", "freeze must be one of"),
        ("training:\n  learning_rate: abc\n", r"^Recipe training.learning_rate: expected a number, got 'abc'\.$"),
        ("training: {max_steps: 1.5}\n", r"^Recipe training.max_steps: expected an integer, got 1.5\.$"),
        ("data: {pretokenize_images: 'no'}\n", r"^Recipe data.pretokenize_images: expected true or false, got 'no'\.$"),
        (
            "model:\n  tiny: true\n   num_shared_layers: 2\n",
            r"is not valid YAML at line 3, column 21: mapping values are not allowed here",
        ),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(str(bad))


def test_recipe_reads_yaml_number_strings(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("training: {learning_rate: 3e-3, max_steps: 7}\n")  # YAML reads 3e-3 as a string
    assert load_recipe(str(recipe)).training.learning_rate == 0.003


def test_per_task_eval_sets_give_a_combined_eval_loss_for_best_checkpoint_and_early_stopping(model, prepared, tmp_path):
    from transformers import EarlyStoppingCallback

    und, gen, _ = prepared
    args = training_args(
        tmp_path,
        max_steps=20,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        understanding_loss_share=0.25,
        per_device_eval_batch_size=8,
    )
    trainer = UniForkTrainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=mix_tasks(und, gen, 0.5, seed=0),
        eval_dataset={"understanding": und, "generation": gen},
        processing_class=model.processor,
        # any later evaluation counts as no better: training stops at the second one
        callbacks=[EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=1e9)],
    )
    trainer.train()
    und_loss, gen_loss, combined = (
        [log[key] for log in trainer.state.log_history if key in log]
        for key in ("eval_understanding_loss", "eval_generation_loss", "eval_loss")
    )
    assert len(und_loss) == len(gen_loss) == len(combined) == 2
    assert trainer.state.global_step == 4  # stopped early, not at 20
    for und_value, gen_value, value in zip(und_loss, gen_loss, combined):
        assert value == pytest.approx(0.25 * und_value + 0.75 * gen_value)
    best = min(range(2), key=combined.__getitem__)  # the lowest combined loss (the threshold is early stopping's)
    assert trainer.state.best_metric == pytest.approx(combined[best])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{2 * (best + 1)}")
    # the best checkpoint's weights are the ones loaded at the end
    weights = load_file(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"))
    name = "generation_head.weight"
    assert torch.equal(trainer.model.state_dict()[name], weights[name])


def test_recipe_builds_a_small_random_llm_with_eval_sets_and_early_stopping(tmp_path):
    # a model of one's own from scratch: a random LLM from its config, a tokenizer and a VQ saved before
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    tiny_vq().save_pretrained(tmp_path / "vq")
    parts = colour_dataset(24, seed=0)
    for name, dataset in parts.items():
        dataset.save_to_disk(str(tmp_path / name))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
model:
  llm: {{architecture: llama, hidden_size: 48, intermediate_size: 96, num_hidden_layers: 3,
        num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}}
  tokenizer: {tmp_path / "tokenizer"}
  vq: {tmp_path / "vq"}
  num_shared_layers: 1
  config: {{learn_image_position_embeddings: false, projector_hidden_size: 40}}
data:
  understanding: {{load_from_disk: {tmp_path / "understanding"}}}
  generation: {{load_from_disk: {tmp_path / "generation"}}}
  eval_understanding: {{load_from_disk: {tmp_path / "understanding"}}}
  eval_generation: {{load_from_disk: {tmp_path / "generation"}}}
training:
  output_dir: {tmp_path / "out"}
  max_steps: 30
  per_device_train_batch_size: 4
  eval_strategy: steps
  eval_steps: 2
  save_steps: 2
  load_best_model_at_end: true
  early_stopping_patience: 1
  early_stopping_threshold: 0
  use_cpu: true
  report_to: []
  disable_tqdm: true
"""
    )
    with pytest.raises(ValueError, match="unknown keys \\['early_stopping_threshold'\\]"):
        load_recipe(str(recipe))
    recipe.write_text(recipe.read_text().replace("  early_stopping_threshold: 0\n", ""))
    trainer = run_recipe(str(recipe))
    model = trainer.model
    text = model.config.text_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, model.config.num_shared_layers) == (
        "llama",
        48,
        3,
        1,
    )
    assert model.config.projector_hidden_size == 40 and not model.config.learn_image_position_embeddings
    assert text.vocab_size >= len(model.processor.tokenizer)
    combined = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
    assert len(combined) >= 2 and trainer.state.best_metric == pytest.approx(min(combined))
    # patience 1: training stops at the first evaluation that does not improve on the best
    assert trainer.state.global_step < 30 or all(b < a for a, b in zip(combined, combined[1:]))
    stopped = trainer.state.global_step < 30
    assert not stopped or combined[-1] >= min(combined[:-1])
