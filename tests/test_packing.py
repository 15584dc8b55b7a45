"""Eager decoding on packed oneDNN weights (`modeling/packing_unifork.py`): same codes, current weights, clean exit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import swap_head_rows
from torch import nn
from transformers import AttentionInterface, CompileConfig

from unifork_hf.modeling import generation_unifork, packing_unifork
from unifork_hf.modeling.packing_unifork import PackedLinears


def test_packed_linear_equals_the_plain_one_and_restores_its_forward(monkeypatch):
    monkeypatch.setattr(packing_unifork, "MIN_PACKED_ELEMENTS", 0)
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 32, bias=False), nn.LayerNorm(32))
    x = torch.randn(3, 5, 64)[..., 7:55]  # 3-d and not contiguous, as a layer's input can be
    expected = block(x)
    packed = PackedLinears([block], rows=3)
    assert packed.linears == [block[0], block[2]]  # linears only, bias or not
    with torch.no_grad(), packed.active():
        assert all("forward" in linear.__dict__ for linear in packed.linears)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert not any("forward" in linear.__dict__ for linear in packed.linears)
    with pytest.raises(RuntimeError, match="inside"), packed.active():
        raise RuntimeError("inside")
    assert not any("forward" in linear.__dict__ for linear in packed.linears)
    assert packed.is_current([block])
    with torch.no_grad():
        block[2].weight[[0, 1]] = block[2].weight[[1, 0]]  # the same values, two rows swapped
    assert not packed.is_current([block])


def test_only_large_float32_cpu_linears_are_packed():
    small, large = nn.Linear(16, 16), nn.Linear(1024, 256)
    assert not packing_unifork.packable(small) and packing_unifork.packable(large)
    assert not packing_unifork.packable(large.to(torch.bfloat16))
    assert not packing_unifork.packable(nn.Conv1d(1024, 256, 1))


def generation_linears(model):
    parts = (model.model.shared_layers, model.model.generation_layers, model.generation_head)
    return [m for part in parts for m in part.modules() if type(m) is nn.Linear]


def test_packed_decoding_gives_eagers_codes_and_follows_weight_changes(built_model, monkeypatch):
    model = built_model
    kwargs = dict(guidance_scale=3.0, top_k=1, output_type="tokens", progress_bar=False)
    prompts = ["a red circle", "two blue squares at the bottom right and a green triangle"]  # left padding
    plain = model.generate_image(prompts, **kwargs)  # the tiny model's linears are too small to be packed
    assert model not in generation_unifork._PACKED_LINEARS or not generation_unifork._PACKED_LINEARS[model].linears

    monkeypatch.setattr(packing_unifork, "MIN_PACKED_ELEMENTS", 0)
    linears = generation_linears(model)
    seen, onednn_calls = [], []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: onednn_calls.append(1) or onednn(*a))
    packed = model.generate_image(
        prompts, callback=lambda n, c: seen.append(all("forward" in m.__dict__ for m in linears)), **kwargs
    )
    assert torch.equal(packed, plain)
    assert len(onednn_calls) == len(linears) * model.config.num_image_tokens  # each linear, each forward: oneDNN's
    state = generation_unifork._PACKED_LINEARS[model]
    assert state.linears == linears and len(linears) == 7 * model.config.text_config.num_hidden_layers + 1
    assert all(seen) and len(seen) == model.config.num_image_tokens  # every step ran on packed weights...
    assert not any("forward" in m.__dict__ for m in linears)  # ...and the linears are plain again after
    assert not any("forward" in m.__dict__ for m in model.model.understanding_layers.modules())
    model.generate_image(prompts, **kwargs)
    assert generation_unifork._PACKED_LINEARS[model] is state  # the same weights: packed once

    swap_head_rows(model, plain)  # the packed copy is out of date and redone
    changed = model.generate_image(prompts, **kwargs)
    assert not torch.equal(changed, plain)
    assert generation_unifork._PACKED_LINEARS[model] is not state
    monkeypatch.setattr(packing_unifork, "MIN_PACKED_ELEMENTS", 2**62)
    assert torch.equal(model.generate_image(prompts, **kwargs), changed)  # as the plain linears give

    copy.deepcopy(model)  # the packed copy lives beside the model, not in it


def test_a_failing_step_leaves_plain_linears(built_model, monkeypatch):
    monkeypatch.setattr(packing_unifork, "MIN_PACKED_ELEMENTS", 0)

    def stop(n, codes):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        built_model.generate_image("a red circle", callback=stop, progress_bar=False)
    assert not any("forward" in m.__dict__ for m in generation_linears(built_model))
    head = built_model.generation_head
    x = torch.randn(2, head.in_features)
    assert torch.equal(head(x), F.linear(x, head.weight))  # torch's own kernel again, bit for bit


def test_compiled_decoding_runs_the_packed_linears_as_one_op_each(built_model, monkeypatch):
    model = built_model
    monkeypatch.setattr(packing_unifork, "MIN_PACKED_ELEMENTS", 0)
    kwargs = dict(guidance_scale=3.0, top_k=1, output_type="tokens", progress_bar=False)
    prompts = ["a red circle", "two blue squares at the bottom right and a green triangle"]
    eager = model.generate_image(prompts, **kwargs)
    calls = []
    monkeypatch.setattr(packing_unifork, "_ACTIVE", CountingDict(calls))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    config = CompileConfig(fullgraph=True, dynamic=False, mode=None)  # as compile=True on CPU, no graph break allowed
    assert model._decoding_compile_config(True) == CompileConfig(dynamic=False, mode=None)
    assert torch.equal(model.generate_image(prompts, compile=config, **kwargs), eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert model.config.text_config._attn_implementation == "sdpa"  # `one_token_sdpa` only within the call
    # every linear of every step (the prefill's and the compiled ones) found its packed weight
    linears = len(generation_linears(model))
    assert calls == [True] * linears * model.config.num_image_tokens
    assert not packing_unifork._ACTIVE and not any("forward" in m.__dict__ for m in generation_linears(model))

    # The weights are inputs of the compiled graph, not frozen into it: after a change the packed copy is redone
    # and the same compiled step runs on it.
    swap_head_rows(model, eager)
    changed = model.generate_image(prompts, **kwargs)
    assert not torch.equal(changed, eager)
    assert torch.equal(model.generate_image(prompts, compile=config, **kwargs), changed)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1

    # The compiled steps attend with `one_token_sdpa`: a version of it that is blind for one token (the compiled
    # steps' queries; the eager prefill's are longer) changes their codes.
    attention = AttentionInterface._global_mapping["unifork_one_token_sdpa"]

    def blind(module, query, *args, **kwargs):
        output, _ = attention(module, query, *args, **kwargs)
        return (output * 0 if query.shape[2] == 1 else output), None

    monkeypatch.setitem(AttentionInterface._global_mapping, "unifork_one_token_sdpa", blind)
    assert not torch.equal(model.generate_image(prompts, compile=config, **kwargs), changed)


class CountingDict(dict):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def get(self, key, default=None):
        value = super().get(key, default)
        self.calls.append(value is not None)
        return value


class Attention(nn.Module):
    """What transformers' attention functions read of their module."""

    def __init__(self, num_key_value_groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal = num_key_value_groups, True


def test_one_token_sdpa_equals_attention_by_hand_and_copies_no_cache_when_compiled():
    from torch._dynamo.testing import EagerAndRecordGraphs
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = Attention(num_key_value_groups=3)
    query, key, value = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    # by hand: query head h reads key/value head h // 3
    scores = query @ key.repeat_interleave(3, dim=1).transpose(-1, -2) * 0.3
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = (weights @ value.repeat_interleave(3, dim=1)).transpose(1, 2)
    output, _ = generation_unifork.one_token_sdpa(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(output, expected)
    longer = torch.randn(2, 6, 3, 8)  # more than one token: transformers' own function
    torch.testing.assert_close(
        generation_unifork.one_token_sdpa(module, longer, key, value, None, scaling=0.3)[0],
        sdpa_attention_forward(module, longer, key, value, None, scaling=0.3)[0],
    )

    def expands(function):
        backend = EagerAndRecordGraphs()
        compiled = torch.compile(function, backend=backend, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(module, query, key, value, mask, scaling=0.3)[0], expected)
        return sum("expand" in str(node.target) for node in backend.graphs[0].graph.nodes)

    assert expands(sdpa_attention_forward) > 0  # transformers' function copies the cache's heads when compiled
    assert expands(generation_unifork.one_token_sdpa) == 0
