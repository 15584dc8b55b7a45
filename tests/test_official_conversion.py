"""A checkpoint in the official UniFork layout -> this package's model, checked against independent references:
vanilla transformers Qwen2 models for both LLM paths, the official projector's formula, and the official tokenizer's
and depth head's recorded outputs (tests/fixtures, made by scripts/official_reference/make_rq_fixtures.py)."""

import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, Qwen2ForCausalLM, Qwen2Model

from unifork_hf import UniForkConfig, UniForkForConditionalGeneration
from unifork_hf.conversion import (
    OFFICIAL_IMAGE_GENERATION,
    convert_llm_state_dict,
    convert_official_checkpoint,
    official_model_state_dict,
)
from unifork_hf.data.tiny import tiny_llm, tiny_tokenizer

HERE = os.path.dirname(__file__)
FIXTURES = os.path.join(HERE, "fixtures")
sys.path.insert(0, FIXTURES)
from official_weights import official_weight  # noqa: E402

K = 2  # the official K = L // 2 of a 4-layer LLM


@pytest.fixture(scope="module")
def records():
    return {name: torch.load(os.path.join(FIXTURES, f"official_rq_{name}.pt")) for name in ("tokenizer", "depth_head")}


@pytest.fixture(scope="module")
def official(records, tmp_path_factory):
    """An official training output at a tiny geometry (LLM hidden 896: the fixture depth head's input), the vision
    tower in its own folder; returns (checkpoint dir, tower dir, LLM state dict)."""
    torch.manual_seed(0)
    llm = tiny_llm(
        hidden_size=896, intermediate_size=256, num_attention_heads=14, num_key_value_heads=2, vocab_size=400
    )
    generator = torch.Generator().manual_seed(1)
    noise = lambda t, scale=0.05: t + scale * torch.randn(t.shape, generator=generator)  # noqa: E731
    state = dict(llm.state_dict())
    for key, tensor in llm.state_dict().items():  # the generation branch: trained away from its copy
        if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key):
            if int(m[1]) >= K:
                state[f"model.gen_fork_layers.{int(m[1]) - K}.{m[2]}"] = noise(tensor)
    state["model.norm_gen.weight"] = noise(state["model.norm.weight"], 0.2)
    code_dim = records["tokenizer"]["rq_config"]["embed_dim"]
    for name, shape in (("linear1.weight", (896, code_dim)), ("linear1.bias", (896,)), ("linear2.weight", (896, 896))):
        state[f"model.mm_projector.{name}"] = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
    state["model.mm_projector.linear2.bias"] = torch.randn(896, generator=generator) * 0.1
    state["model.mm_projector.token_embedding.weight"] = torch.randn(2, 896, generator=generator)
    checkpoint, tower = tmp_path_factory.mktemp("official"), tmp_path_factory.mktemp("vision_tower")
    save_file(state, checkpoint / "model.safetensors")
    config = {**llm.config.to_dict(), "model_type": "llava_qwen2", "architectures": ["LlavaQwen2ForCausalLM"]}
    config.update(mm_vision_tower=str(tower), tokenizer_model_max_length=1350, mm_projector_lr=None)
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "preprocessor_config.json").write_text(json.dumps({"image_size": 64}))
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.save_pretrained(checkpoint)
    tower_state = {
        f"{part}.{key}": official_weight(key if part == "rqvaesiglip" else f"rqtransformer.{key}", shape)
        for part, name in (("rqvaesiglip", "tokenizer"), ("rqtransformer", "depth_head"))
        for key, shape in records[name]["shapes"].items()
    }
    save_file(tower_state, tower / "model.safetensors")
    tower_config = {
        "rqvaesiglip": records["tokenizer"]["rq_config"],
        "rqtransformer": records["depth_head"]["head_config"],
    }
    (tower / "config.json").write_text(json.dumps(tower_config))
    return checkpoint, tower, state


@pytest.fixture(scope="module")
def converted(official, records):
    checkpoint, _, _ = official
    siglip = {**records["tokenizer"]["vision_config"], "patch_size": 16}  # the fixture's SigLIP, not a Hub one
    return convert_official_checkpoint(checkpoint, siglip_vision_config=siglip).eval()


def test_understanding_path_is_the_official_llm(official, converted):
    """Text through the understanding path equals a vanilla Qwen2 with the official layers, norm and LM head."""
    _, _, state = official
    vanilla = Qwen2ForCausalLM(converted.config.text_config).eval()
    reference = {k: v for k, v in state.items() if k in vanilla.state_dict()}
    reference["model.embed_tokens.weight"] = converted.model.embed_tokens.weight.detach()  # + the BOI / EOI rows
    vanilla.load_state_dict(reference)
    ids = torch.randint(0, 380, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, vanilla(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_generation_path_is_the_official_fork(official, converted):
    """The generation path equals a vanilla Qwen2 whose layers K.. are the official `gen_fork_layers` and whose final
    norm is `norm_gen`; the image token sequence starts with the official BOI embedding."""
    _, _, state = official
    vanilla = Qwen2Model(converted.config.text_config).eval()
    reference = {}
    for key in vanilla.state_dict():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m and int(m[1]) >= K:
            reference[key] = state[f"model.gen_fork_layers.{int(m[1]) - K}.{m[2]}"]
        else:
            reference[key] = state["model.norm_gen.weight" if key == "norm.weight" else f"model.{key}"]
    vanilla.load_state_dict(reference)
    ids = torch.randint(0, 380, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = converted.model(input_ids=ids, task="generation").last_hidden_state
        torch.testing.assert_close(ours, vanilla(input_ids=ids).last_hidden_state, atol=1e-4, rtol=1e-4)
    boi, eoi = converted.config.boi_token_id, converted.config.eoi_token_id
    embeddings = converted.model.embed_tokens.weight
    assert torch.equal(embeddings[[boi, eoi]], state["model.mm_projector.token_embedding.weight"])


def test_image_tokens_are_the_official_projection_of_the_official_codes(official, converted, records):
    _, _, state = official
    record = records["tokenizer"]
    codes = converted.model.image_tokenizer.encode(record["images_4"])
    assert torch.equal(codes, record["codes_4"].reshape(2, 16, 4))  # the converted tokenizer's codes are the official
    summed = record["summed_4"].reshape(2, 16, -1)
    linear = torch.nn.functional.linear
    hidden = torch.nn.functional.gelu(
        linear(summed, state["model.mm_projector.linear1.weight"], state["model.mm_projector.linear1.bias"])
    )
    expected = linear(hidden, state["model.mm_projector.linear2.weight"], state["model.mm_projector.linear2.bias"])
    with torch.no_grad():
        torch.testing.assert_close(converted.model.embed_image_codes(codes), expected, atol=1e-4, rtol=1e-4)


def test_depth_head_gives_the_official_logits(converted, records):
    record = records["depth_head"]
    vectors = converted.model.image_tokenizer.codebook[record["codes"]]
    with torch.no_grad():
        logits = converted.generation_head(record["hidden"], vectors[..., :-1, :])
    torch.testing.assert_close(logits, record["logits"], atol=1e-4, rtol=1e-4)


def test_prompts_sampler_and_saved_model_are_the_officials(converted, tmp_path):
    processor = converted.processor
    assert processor.image_generation_prompt("a cat") == "<|im_start|>USER: a cat ASSISTANT: <begin_of_image>"
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(question, add_generation_prompt=True)
    assert text == (
        "<|im_start|>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT:"
    )
    assert converted.generation_config.image_generation == OFFICIAL_IMAGE_GENERATION
    assert converted.config.num_shared_layers == K and converted.config.image_size == 64
    converted.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, UniForkForConditionalGeneration)
    for name, tensor in converted.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    codes = loaded.generate_image(
        "a cat", output_type="tokens", generator=torch.Generator().manual_seed(0), progress_bar=False
    )
    assert codes.shape == (1, 16, 4)


def test_tower_weights_saved_inside_the_checkpoint_are_used(official, records, tmp_path):
    checkpoint, tower, state = official
    from safetensors.torch import load_file

    inside = {
        **state,
        **{f"model.vision_tower.vision_tower.{k}": v for k, v in load_file(tower / "model.safetensors").items()},
    }
    for name in os.listdir(checkpoint):
        if name != "model.safetensors":
            (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    save_file(inside, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "mit-han-lab/vila-u-7b-256"}))
    with pytest.raises(ValueError, match="pass its vision config"):  # the official geometry's SigLIP is not this one
        convert_official_checkpoint(tmp_path, vision_tower=tower)
    model = convert_official_checkpoint(
        tmp_path, vision_tower=tower, siglip_vision_config={**records["tokenizer"]["vision_config"], "patch_size": 16}
    )
    assert torch.equal(
        model.model.image_tokenizer.codebook, official_weight("quantizer.codebooks.0.weight", (1025, 64))[:-1]
    )


def read_keys(name):
    rows = [line.split("\t") for line in open(os.path.join(FIXTURES, name)).read().splitlines()]
    return {key: eval(shape) for key, shape, *_ in rows}  # noqa: S307  (tuples written by the dump scripts)


def test_every_key_of_the_paper_geometry_lands_once_on_the_meta_device():
    """The 441 LLM keys and 1131 tower keys of the official model at the paper's geometry (read off the official
    code), onto `unifork-base`: every tensor of ours gets exactly one, of the right shape."""
    config = UniForkConfig.from_preset("unifork-base", image_token_id=151665, boi_token_id=151666, eoi_token_id=151667)
    with torch.device("meta"):
        model = UniForkForConditionalGeneration(config)
        llm = {k: torch.empty(s) for k, s in read_keys("official_llm_keys.tsv").items()}
        tower = {k: torch.empty(s) for k, s in read_keys("official_vision_tower_keys.tsv").items()}
    assert len(llm) == 441 and len(tower) == 1131
    state = official_model_state_dict(llm, tower, model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: s for k, s in shapes.items() if k != "lm_head.weight"}

    missing = dict(llm)
    del missing["model.gen_fork_layers.11.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.generation_layers\.11\.mlp\.up_proj\.weight"):
        convert_llm_state_dict(missing, model)
    unexpected = {**llm, "model.layers.3.self_attn.rotary.weight": torch.empty(1, device="meta")}
    with pytest.raises(KeyError, match=r"model\.layers\.3\.self_attn\.rotary\.weight"):
        convert_llm_state_dict(unexpected, model)
    wrong = {**llm, "model.mm_projector.linear1.weight": torch.empty(896, 1152, device="meta")}
    with pytest.raises(ValueError, match=r"'model\.mm_projector\.linear1\.weight' has shape \(896, 1152\)"):
        convert_llm_state_dict(wrong, model)


def test_unifork_convert_cli_whole_model_and_tower_alone(official, records, tmp_path, capsys):
    from unifork_hf.cli import main
    from unifork_hf.modeling.rq_unifork import UniForkRQImageTokenizer

    checkpoint, tower, _ = official
    siglip = tmp_path / "siglip.json"
    siglip.write_text(json.dumps({**records["tokenizer"]["vision_config"], "patch_size": 16}))
    main(["convert", "--checkpoint", str(checkpoint), "--siglip-config", str(siglip), "--out", str(tmp_path / "model")])
    out = capsys.readouterr().out
    assert "UniFork written to" in out and "64 px images as 4x4 positions x 4 codes" in out
    assert isinstance(AutoModel.from_pretrained(tmp_path / "model"), UniForkForConditionalGeneration)
    main(["convert", "--vision-tower", str(tower), "--siglip-config", str(siglip), "--out", str(tmp_path / "rq")])
    assert "RQ image tokenizer written to" in capsys.readouterr().out
    tokenizer = UniForkRQImageTokenizer.from_pretrained(tmp_path / "rq")
    assert torch.equal(
        tokenizer.encode(records["tokenizer"]["images_4"]), records["tokenizer"]["codes_4"].reshape(2, 16, 4)
    )
    with pytest.raises(SystemExit):
        main(["convert", "--out", str(tmp_path / "x")])
    assert "pass --checkpoint (a whole official model) or --vision-tower alone" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["unifork-base", "no-such-org/unifork-7b"])
def test_a_name_that_is_no_checkpoint_says_how_to_get_a_model(name):

    for load in (UniForkForConditionalGeneration.from_pretrained, UniForkConfig.from_pretrained):
        with pytest.raises(OSError) as raised:
            load(name)
        message = str(raised.value)
        assert f"{name!r}" in message and "No official UniFork weights are published" in message
        assert "from_pretrained_llm(" in message and "unifork convert --checkpoint" in message
        assert message.count("No official UniFork weights") == 1  # the config's error is not wrapped twice
        assert ("a preset name" in message) == (name == "unifork-base")
