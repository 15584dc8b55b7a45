"""Tiny random parts (LLM, tokenizer, VQ tokenizer) for tests and the offline quick-start.

Nothing here downloads anything: the tokenizer is trained in a fraction of a second on a
built-in corpus, the LLM and VQ are randomly initialised from a seed.
"""

import os

import torch
from diffusers import VQModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

_CORPUS = [
    "a red circle at the top left and a blue square at the bottom right",
    "a green triangle in the center",
    "two yellow squares",
    "a purple circle above an orange triangle",
    "What colour is the circle? red",
    "How many shapes are there? two",
    "Where is the square? top left",
    "What shape is at the bottom right? triangle",
    "Describe the image.",
    "Generate an image of a cat.",
]


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with `<|endoftext|>` as eos and `<|pad|>` as pad."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")


def tiny_llm(architecture: str = "qwen2", vocab_size: int = 384, num_hidden_layers: int = 4, seed: int = 0, **config):
    """A random ~0.1M-parameter Qwen2 or Llama causal LM; `config` overrides its config's fields."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    kwargs.update(config)
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if architecture not in classes:
        raise ValueError(f"architecture must be one of {sorted(classes)}, got {architecture!r}.")
    config_class, model_class = classes[architecture]
    torch.manual_seed(seed)
    return model_class(config_class(**kwargs)).eval()


def tiny_vq(sample_size: int = 32, num_vq_embeddings: int = 64, seed: int = 0) -> VQModel:
    """A random VQModel: `sample_size` px images -> (sample_size/4)^2 codes of an `num_vq_embeddings` codebook."""
    torch.manual_seed(seed)
    return VQModel(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=8,
        num_vq_embeddings=num_vq_embeddings,
        vq_embed_dim=8,
        norm_num_groups=8,
        sample_size=sample_size,
    ).eval()


def save_tiny_parts(directory: str, architecture: str = "qwen2", seed: int = 0) -> tuple[str, str]:
    """Write a tiny random LLM (with tokenizer) and VQModel under `directory`; returns (llm_dir, vq_dir)."""
    llm_dir, vq_dir = os.path.join(directory, f"tiny-{architecture}"), os.path.join(directory, "tiny-vq")
    tiny_llm(architecture, seed=seed).save_pretrained(llm_dir)
    tiny_tokenizer().save_pretrained(llm_dir)
    tiny_vq(seed=seed).save_pretrained(vq_dir)
    return llm_dir, vq_dir
