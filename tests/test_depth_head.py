"""The RQ depth head against the official `rqtransformer`, and its sampling loop.

tests/fixtures/official_rq_depth_head.pt holds the official head's outputs on weights rebuilt from key names
(scripts/official_reference/make_rq_fixtures.py ran the official code).
"""

import os
import sys

import pytest
import torch
from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from unifork_hf.conversion import convert_depth_head_state_dict
from unifork_hf.modeling.depth_head_unifork import UniForkDepthHead

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "fixtures"))
from official_weights import official_weight  # noqa: E402


@pytest.fixture(scope="module")
def official():
    return torch.load(os.path.join(HERE, "fixtures", "official_rq_depth_head.pt"))


@pytest.fixture(scope="module")
def codebook():
    """The fixture tokenizer's codebook, as the tokenizer converter gives it."""
    record = torch.load(os.path.join(HERE, "fixtures", "official_rq_tokenizer.pt"))
    weight = official_weight("quantizer.codebooks.0.weight", record["shapes"]["quantizer.codebooks.0.weight"])
    return weight[:-1]


def head_like(record) -> UniForkDepthHead:
    config = record["head_config"]
    return UniForkDepthHead(
        hidden_size=config["input_embed_dim_2"],
        code_dim=config["input_embed_dim_1"],
        codebook_size=config["vocab_size"],
        depth=config["block_size"][-1],
        width=config["embed_dim_out"],
        attention_width=config["embed_dim"],
        num_heads=config["head"]["block"]["n_head"],
        num_layers=config["head"]["n_layer"],
    ).eval()


@pytest.fixture(scope="module")
def converted(official):
    head = head_like(official)
    state = {"rqtransformer." + k: official_weight("rqtransformer." + k, s) for k, s in official["shapes"].items()}
    head.load_state_dict(convert_depth_head_state_dict(state, head))
    return head


def test_teacher_forced_logits_are_the_official_ones(official, converted, codebook):
    vectors = codebook[official["codes"]]  # (2, 3, 4, code_dim)
    with torch.no_grad():
        logits = converted(official["hidden"], vectors[..., :-1, :])
    torch.testing.assert_close(logits, official["logits"], atol=1e-4, rtol=1e-4)


def test_cfg_sampling_through_transformers_warpers_draws_the_official_codes(official, converted, codebook):
    """The official sampler: CFG 3 at every depth, then temperature 1, top-k 900, top-p 0.96 and one multinomial;
    here the same through transformers' TopK / TopP warpers, from the same random stream."""
    warpers = LogitsProcessorList([TopKLogitsWarper(900), TopPLogitsWarper(0.96)])

    def pick(logits, depth):  # rows: 2 conditional, then 2 unconditional; both halves get the conditional draw
        cond, uncond = logits.view(4, -1).chunk(2)
        guided = warpers(None, uncond + 3.0 * (cond - uncond))
        drawn = torch.multinomial(guided.softmax(-1), 1).view(2, 1)
        return drawn.repeat(2, 1)

    torch.manual_seed(123)
    hidden = torch.randn(4, 1, 896)
    assert torch.equal(hidden, official["cfg_hidden"])
    with torch.no_grad():
        codes = converted.sample(hidden, codebook, pick)
    assert torch.equal(codes, official["cfg_codes"])
    torch.testing.assert_close(codebook[codes].sum(-2), official["cfg_summed"])


def test_greedy_sampling_is_argmax_at_every_depth_and_batch_independent(converted, codebook):
    torch.manual_seed(0)
    hidden = torch.randn(3, 2, 896)
    with torch.no_grad():
        greedy = lambda logits, depth: logits.argmax(-1)  # noqa: E731
        codes = converted.sample(hidden, codebook, greedy)
        for depth in range(4):  # each code is the argmax given the codes before it
            logits = converted(hidden, codebook[codes[..., :depth]])[..., -1, :]
            assert torch.equal(logits.argmax(-1), codes[..., depth])
        alone = torch.cat([converted.sample(row, codebook, greedy) for row in hidden.split(1)])
    assert torch.equal(alone, codes)
    assert len(codes.unique()) > 3


def test_bad_prefixes_and_keys_are_named(official, converted):
    with pytest.raises(ValueError, match=r"code_vectors must be \(..., n < 4, code_dim\)"):
        converted(torch.zeros(2, 896), torch.zeros(2, 4, 64))
    state = {k: official_weight("rqtransformer." + k, s) for k, s in official["shapes"].items()}
    del state["classifier_mlp.linear.bias"]
    with pytest.raises(KeyError, match=r"no official source: \['classifier.bias'\]"):
        convert_depth_head_state_dict(state, converted)
    state = {**{k: official_weight("rqtransformer." + k, s) for k, s in official["shapes"].items()}, "x.y": 1}
    with pytest.raises(KeyError, match=r"no place in UniForkDepthHead: \['x.y'\]"):
        convert_depth_head_state_dict(state, converted)
    with pytest.raises(KeyError, match="checkpoint of the official RQTransformer depth head"):
        convert_depth_head_state_dict({"post_quant_conv.weight": 1}, converted)
