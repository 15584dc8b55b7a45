import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

import unifork_hf  # noqa: E402,F401  (registers the Auto classes)
from unifork_hf import UniForkConfig, UniForkForConditionalGeneration  # noqa: E402
from unifork_hf.data.tiny import save_tiny_parts  # noqa: E402


def tiny_config(**overrides) -> UniForkConfig:
    """unifork-tiny with a 16 px VQ (4x4 = 16 image tokens) so loops stay fast."""
    vq = dict(UniForkConfig.from_preset("unifork-tiny").vq_config, sample_size=16)
    kwargs = dict(vq_config=vq, image_token_id=500, boi_token_id=501, eoi_token_id=502)
    kwargs.update(overrides)
    return UniForkConfig.from_preset("unifork-tiny", **kwargs)


def tiny_model(seed: int = 0, **overrides) -> UniForkForConditionalGeneration:
    torch.manual_seed(seed)
    return UniForkForConditionalGeneration(tiny_config(**overrides)).eval()


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """(llm_dir, vq_dir) of a tiny random Qwen2 with tokenizer and a random VQModel."""
    return save_tiny_parts(str(tmp_path_factory.mktemp("parts")))


@pytest.fixture(scope="session")
def built_dir(tiny_parts, tmp_path_factory):
    """A checkpoint directory (model + processor) built from the tiny parts the paper's way."""
    model = UniForkForConditionalGeneration.from_pretrained_llm(*tiny_parts)
    out = str(tmp_path_factory.mktemp("unifork"))
    model.save_pretrained(out)
    return out


@pytest.fixture()
def built_model(built_dir):
    return UniForkForConditionalGeneration.from_pretrained(built_dir).eval()


def swap_head_rows(model, codes: torch.Tensor) -> None:
    """Swap, in place and behind autograd's back, the generation head's rows of the most drawn code and the next: the
    weights' sums stay the same, and greedy decoding of `codes`' prompts changes."""
    code = int(codes.flatten().mode().values)
    with torch.no_grad():
        weight = model.generation_head.weight.data
        weight[[code, code + 1]] = weight[[code + 1, code]]
