"""generate_image (KV cache, batched CFG) vs the naive loop that re-runs the whole sequence per token.

    python benchmarks/bench_generate_image.py [--repeats 3]

Both produce the same image tokens (greedy, top_k=1); timings are medians over repeats in one
process. Sizes: unifork-tiny and a ~100M-parameter generation path (hidden 768, 12 layers, K=6).
"""

import argparse
import statistics
import time

import torch

from unifork_hf import UniForkConfig, UniForkForConditionalGeneration
from unifork_hf.data.tiny import tiny_tokenizer
from unifork_hf.modeling.image_processing_unifork import UniForkImageProcessorPil
from unifork_hf.modeling.processing_unifork import UniForkProcessor

SIZES = {
    "tiny": {},
    "100m": {
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": 512,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
        },
        "num_shared_layers": 6,
    },
}


def build(name, sizes=SIZES):
    """A random UniFork of size `sizes[name]` (overrides of unifork-tiny) with a tiny tokenizer + processor."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<image>", "<begin_of_image>", "<end_of_image>"], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(["<image>", "<begin_of_image>", "<end_of_image>"])
    config = UniForkConfig.from_preset(
        "unifork-tiny", image_token_id=ids[0], boi_token_id=ids[1], eoi_token_id=ids[2], **sizes[name]
    )
    torch.manual_seed(0)
    model = UniForkForConditionalGeneration(config).eval()
    model.processor = UniForkProcessor(UniForkImageProcessorPil(), tokenizer, image_seq_length=config.num_image_tokens)
    return model


@torch.no_grad()
def naive(model, prompts, scale):
    """No cache: every step re-runs [cond; uncond] prompts plus all codes so far."""
    inputs = model.processor.image_generation_inputs(prompts + [""] * len(prompts))
    ids, mask = inputs.input_ids, inputs.attention_mask
    embeds = model.get_input_embeddings()(ids)
    codes = ids.new_empty((len(prompts), 0))
    for _ in range(model.config.num_image_tokens):
        logits = (
            model(inputs_embeds=embeds, attention_mask=mask, task="generation", use_cache=False, logits_to_keep=1)
            .image_logits[:, -1]
            .log_softmax(-1)
        )
        cond, uncond = logits.chunk(2)
        next_codes = (uncond + scale * (cond - uncond)).argmax(-1)
        codes = torch.cat([codes, next_codes[:, None]], 1)
        step = model.model.embed_image_codes(next_codes[:, None])
        embeds = torch.cat([embeds, torch.cat([step, step])], 1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
    return codes


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    prompts = ["a red circle at the top left", "two blue squares", "a green triangle", "a purple circle"]
    prompts = (prompts * args.batch)[: args.batch]
    results = {}
    for name in SIZES:
        model = build(name)
        inner = model.model
        path = [
            inner.embed_tokens,
            inner.image_projector,
            inner.shared_layers,
            inner.generation_layers,
            inner.generation_norm,
            model.generation_head,
        ]  # what one image-token step reads
        n_params = sum(p.numel() for module in path for p in module.parameters())
        tokens = args.batch * model.config.num_image_tokens
        fast_s, fast = median_time(
            lambda: model.generate_image(
                prompts, guidance_scale=3.0, top_k=1, output_type="tokens", progress_bar=False
            ),
            args.repeats,
        )
        slow_s, slow = median_time(lambda: naive(model, prompts, 3.0), args.repeats)
        assert torch.equal(fast, slow), "cached and uncached loops disagree"
        results[name] = slow_s / fast_s
        print(
            f"{name}: {n_params / 1e6:.1f}M params on the generation path, {tokens} image tokens, batch {args.batch}, CFG on | "
            f"generate_image {tokens / fast_s:.0f} tok/s ({fast_s:.2f} s) | naive no-cache {tokens / slow_s:.0f} tok/s "
            f"({slow_s:.2f} s) | speedup {slow_s / fast_s:.2f}x"
        )
    print("RESULT " + " ".join(f"speedup_vs_nocache_{k}={v:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
