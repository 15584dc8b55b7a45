"""PEFT LoRA on parts of the Y, and TRL's SFTTrainer with a UniFork model and processor."""

import datasets
import pytest
import torch
from conftest import tiny_model
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from PIL import Image

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.training.peft_utils import lora_config

IMG, BOI, EOI, N = 500, 501, 502, 16  # image placeholder / begin / end ids and image tokens of tiny_config
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."  # where a PeftModel keeps the wrapped model


def branch_modules(layers: str, num_layers: int = 2, attention=ATTENTION, mlp=MLP) -> set[str]:
    """The projection names of one layer list of tiny_config (2 shared + 2 + 2 branch layers)."""
    return {f"model.{layers}.{i}.self_attn.{p}" for i in range(num_layers) for p in attention} | {
        f"model.{layers}.{i}.mlp.{p}" for i in range(num_layers) for p in mlp
    }


def lora_modules(peft_model, adapter="default") -> set[str]:
    return {
        name.removeprefix(PREFIX)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def saved_modules(peft_model) -> set[str]:
    return {name.removeprefix(PREFIX) for name, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def understanding_inputs(seed=0):
    """An image + question, as pixels (through the frozen VQ) and token ids."""
    g = torch.Generator().manual_seed(seed)
    question = torch.randint(0, 400, (1, 6), generator=g)
    ids = torch.cat([question[:, :2], torch.tensor([[BOI] + [IMG] * N + [EOI]]), question[:, 2:]], 1)
    return {"input_ids": ids, "pixel_values": torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, "task": "understanding"}


def generation_inputs(batch=4, seed=0):
    """Prompt -> <boi> image codes <eoi>, labels on the image tokens only."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 400, (batch, 5), generator=g)
    ids = torch.cat([prompt, torch.full((batch, 1), BOI), torch.full((batch, N), IMG), torch.full((batch, 1), EOI)], 1)
    labels = ids.clone()
    labels[:, :6] = -100
    image_ids = torch.randint(0, 64, (batch, N), generator=g)
    return {"input_ids": ids, "image_ids": image_ids, "labels": labels, "task": "generation"}


def mixed_inputs(seed=0):
    """One understanding and one generation row in a single batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, 400, (2, 4), generator=g), torch.tensor([[BOI] + [IMG] * N + [EOI]] * 2)], 1)
    image_ids = torch.randint(0, 64, (2, N), generator=g)
    return {"input_ids": ids, "image_ids": image_ids, "task": ["understanding", "generation"]}


# ---------------------------------------------------------------------------------------- lora_config


@pytest.mark.parametrize(
    "branch, layer_lists, heads",
    [
        ("generation", ["generation_layers"], {"generation_head", "model.generation_norm"}),
        ("understanding", ["understanding_layers"], {"lm_head", "model.understanding_norm"}),
        ("shared", ["shared_layers"], set()),
        (
            "all",
            ["shared_layers", "understanding_layers", "generation_layers"],
            {"generation_head", "model.generation_norm", "lm_head", "model.understanding_norm"},
        ),
    ],
)
def test_lora_config_targets_exactly_one_part_of_the_y(branch, layer_lists, heads):
    expected = set().union(*(branch_modules(layers) for layers in layer_lists))
    assert len(expected) == 7 * 2 * len(layer_lists)

    peft_model = get_peft_model(tiny_model(), lora_config(branch=branch))
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    assert lora_modules(peft_model) == expected
    assert saved_modules(peft_model) == set()
    trainable = {n.removeprefix(PREFIX) for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.default.weight" for m in expected for ab in "AB"}

    if heads:  # train_head adds the branch's head and norm, trained in full
        peft_model = get_peft_model(tiny_model(), lora_config(branch=branch, train_head=True))
        assert lora_modules(peft_model) == expected
        assert saved_modules(peft_model) == heads
        trainable = {n.removeprefix(PREFIX) for n, p in peft_model.named_parameters() if p.requires_grad}
        lora = {f"{m}.lora_{ab}.default.weight" for m in expected for ab in "AB"}
        assert trainable == lora | {f"{h}.modules_to_save.default.weight" for h in heads}


def test_lora_config_options_and_errors():
    config = lora_config(branch="understanding", r=4, alpha=8, dropout=0.1, target_projections=("q_proj", "v_proj"))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert config.task_type == "CAUSAL_LM"
    peft_model = get_peft_model(tiny_model(), config)
    assert lora_modules(peft_model) == branch_modules("understanding_layers", attention=("q_proj", "v_proj"), mlp=())
    # Extra LoraConfig fields pass through; modules_to_save merges with train_head's.
    config = lora_config(branch="generation", train_head=True, modules_to_save=["image_projector"], use_rslora=True)
    assert config.use_rslora and config.modules_to_save == ["image_projector", "generation_head", "generation_norm"]

    with pytest.raises(ValueError, match=r"branch must be one of \['all', 'generation', 'shared', 'understanding'\]"):
        lora_config(branch="gen")
    with pytest.raises(ValueError, match="train_head=True: branch 'shared' has no head"):
        lora_config(branch="shared", train_head=True)
    with pytest.raises(ValueError, match="target_projections"):
        lora_config(target_projections=())


def test_regex_also_targets_a_peft_wrapped_model():
    # A second adapter added to a PeftModel sees names under `base_model.model.`: the regex still matches.
    peft_model = get_peft_model(tiny_model(), lora_config(branch="generation"))
    peft_model.add_adapter("und", lora_config(branch="understanding"))
    assert lora_modules(peft_model, "default") == branch_modules("generation_layers")
    assert lora_modules(peft_model, "und") == branch_modules("understanding_layers")


# ---------------------------------------------------------------------------------------- save / load / merge


def test_adapter_save_load_and_merge_give_identical_outputs(tmp_path):
    torch.manual_seed(0)
    base_out = tiny_model()(**mixed_inputs())
    peft_model = get_peft_model(tiny_model(), lora_config(branch="all", train_head=True)).eval()
    with torch.no_grad():  # LoRA B starts at zero: make the adapters (and head copies) change the outputs
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    out = peft_model(**mixed_inputs())
    assert not torch.allclose(out.logits, base_out.logits, atol=1e-3)
    assert not torch.allclose(out.image_logits, base_out.image_logits, atol=1e-3)

    peft_model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    assert lora_modules(loaded) == lora_modules(peft_model) and saved_modules(loaded) == saved_modules(peft_model)
    loaded_out = loaded(**mixed_inputs())
    assert torch.equal(loaded_out.logits, out.logits) and torch.equal(loaded_out.image_logits, out.image_logits)

    merged = loaded.merge_and_unload()
    assert type(merged) is UniForkForConditionalGeneration
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert merged.state_dict().keys() == tiny_model().state_dict().keys()
    merged_out = merged(**mixed_inputs())
    torch.testing.assert_close(merged_out.logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_out.image_logits, out.image_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- the key property


def test_generation_lora_training_leaves_understanding_bit_identical():
    model = tiny_model()
    und, gen, mixed = understanding_inputs(), generation_inputs(), mixed_inputs()
    with torch.no_grad():
        und_before = model(**und).logits
        mixed_before = model(**mixed)
        gen_before = model(**gen)

    peft_model = get_peft_model(model, lora_config(branch="generation", train_head=True))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = peft_model(**gen).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    peft_model.eval()

    assert losses[-1] < losses[0] - 0.1, losses
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(bool(p.abs().sum() > 0) for p in lora_b)  # the LoRA weights did train
    with torch.no_grad():
        gen_after = peft_model(**gen)
        assert gen_after.loss < gen_before.loss
        assert not torch.allclose(gen_after.image_logits, gen_before.image_logits, atol=1e-3)
        # Understanding: the same bits, alone and as the understanding row of a mixed batch.
        assert torch.equal(peft_model(**und).logits, und_before)
        mixed_after = peft_model(**mixed)
        assert torch.equal(mixed_after.logits, mixed_before.logits)
        assert not torch.allclose(mixed_after.image_logits, mixed_before.image_logits, atol=1e-3)

        merged = peft_model.merge_and_unload()
        assert type(merged) is UniForkForConditionalGeneration
        assert torch.equal(merged(**und).logits, und_before)
        assert torch.equal(merged(**mixed).logits, mixed_before.logits)
        torch.testing.assert_close(merged(**gen).image_logits, gen_after.image_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- TRL SFTTrainer


def test_trl_sft_trainer_trains_an_understanding_lora(built_model, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, processor = built_model, built_model.processor
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}
    dataset = datasets.Dataset.from_list(
        [
            {
                "images": [Image.new("RGB", (32, 32), rgb)],
                "messages": [
                    {"role": "user", "content": "What colour is the image?"},
                    {"role": "assistant", "content": name},
                ],
            }
            for name, rgb in colours.items()
        ]
    )
    gen_prompt = processor.image_generation_inputs(["a red square"])
    with torch.no_grad():
        gen_before = model(**gen_prompt, task="generation").image_logits

    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=10,
        per_device_train_batch_size=4,  # the whole dataset: every step sees the same tokens
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        max_length=None,  # must not cut image tokens
        assistant_only_loss=True,  # needs the {% generation %} markers of the processor's chat template
        bf16=False,  # SFTConfig defaults to bf16 autocast, even on CPU, and leaves forward wrapped in it
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(branch="understanding", train_head=True),
    )
    peft_model = trainer.model
    assert isinstance(peft_model, PeftModel)
    assert lora_modules(peft_model) == branch_modules("understanding_layers", num_layers=2)

    # The collator tokenizes image + chat on the fly; the loss covers the answer and its eos only.
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [model.config.num_image_tokens] * 4
    for labels, name in zip(batch["labels"], colours):
        assert processor.tokenizer.decode(labels[labels != -100]) == f"{name}<|endoftext|>"
    with torch.no_grad():
        loss_before = model(**batch).loss.item()  # the model's own understanding loss

    trainer.train()
    assert peft_model.get_base_model().is_activation_checkpointing  # SFTConfig's default, supported by the model
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10
    # TRL's fused LM head (backbone `last_hidden_state` @ `get_output_embeddings()`) computes our own loss.
    assert losses[0] == pytest.approx(loss_before, rel=1e-5)
    assert losses[-1] < 0.6 * losses[0], losses

    peft_model.eval()
    with torch.no_grad():
        loss_after = peft_model(**batch).loss
        assert loss_after.item() < 0.6 * loss_before
        # The fused head reads the trained `lm_head` copy (modules_to_save) through `get_output_embeddings()`.
        torch.testing.assert_close(peft_model(**batch, fused_lm_head=True).loss, loss_after, rtol=1e-5, atol=1e-6)
        # Only the understanding branch and its head trained: the generation path is untouched.
        assert torch.equal(peft_model(**gen_prompt, task="generation").image_logits, gen_before)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(bool(p.abs().sum() > 0) for p in lora_b)
