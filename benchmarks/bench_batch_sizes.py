"""Image tokens per second across batch sizes at ~100M, against the roofline of each batch.

    python benchmarks/bench_batch_sizes.py [--batches 1,4,16,64] [--repeats 1]

The models, prompts and sampler of bench_generate_vs_janus.py ("100m": Llama layers, hidden 768, 12 layers on the
generated path, CFG 3, top-k 1, 64 image tokens, fp32). For each batch: `generate_image` as called plainly (eager),
with `compile=True`, and Janus's `generate(generation_mode="image")`, each run once untimed (compiling, packing)
and then timed (the best of `--repeats`); the greedy codes of both UniFork paths are checked equal.

The roofline of a batch: a decoding step must read the generation path's weights once (bytes / copy bandwidth) and
do 2 x parameters x rows FLOPs (rows = 2 x batch with CFG; / the FLOP rate of a large float32 matmul); measured in
the same run. Its tokens/s = batch / max(the two) per step (attention and the prefill are left out, so the bound
is a little loose). Small batches are bound by bandwidth, large ones by FLOPs.

Ends with `RESULT` holding, per batch N: `ours_bN_tok_s`, `compiled_bN_tok_s`, `janus_bN_tok_s`, `roofline_bN_tok_s`.
"""

import argparse
import time

import torch
from bench_decode_roofline import copy_bandwidth
from bench_generate_image import build
from bench_generate_vs_janus import GUIDANCE, SIZES, build_janus, janus_inputs
from transformers import GenerationConfig
from transformers.utils import logging


def matmul_flops(n=2048, repeats=3):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    logging.set_verbosity_error()
    ours = build("100m", SIZES)
    janus = build_janus(ours.config)
    inner = ours.model
    path = (inner.shared_layers, inner.generation_layers, inner.generation_norm, ours.generation_head)
    params = sum(p.numel() for m in path for p in m.parameters())
    bandwidth, _ = copy_bandwidth(1024, 3)
    flops = matmul_flops()
    print(
        f"generation path {params / 1e6:.1f}M parameters ({params * 4 / 1e6:.0f} MB); copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; float32 matmul {flops / 1e9:.0f} GFLOP/s; {torch.get_num_threads()} threads"
    )
    base = ["a red circle at the top left", "two blue squares", "a green triangle", "a purple circle"]
    fields = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = (base * batch)[:batch]
        ids = ours.processor.image_generation_inputs(prompts + [""] * batch).input_ids
        janus_ids, mask = janus_inputs(ids, ours.config.boi_token_id, bos_token_id=2, batch=batch)
        janus_config = GenerationConfig(
            guidance_scale=GUIDANCE, do_sample=True, top_k=1, bos_token_id=2,
            pad_token_id=ours.config.text_config.pad_token_id,
            generation_kwargs={"boi_token_id": ours.config.boi_token_id},
        )  # fmt: skip
        kwargs = dict(guidance_scale=GUIDANCE, top_k=1, output_type="tokens", progress_bar=False)
        runs = {
            "ours": lambda: ours.generate_image(prompts, **kwargs),
            "compiled": lambda: ours.generate_image(prompts, compile=True, **kwargs),
            "janus": lambda: janus.generate(
                janus_ids, attention_mask=mask, generation_mode="image", generation_config=janus_config
            ),
        }
        first = {key: run() for key, run in runs.items()}  # compiling, packing, warming up
        assert torch.equal(first["ours"], first["compiled"]), "compiled decoding must not change greedy codes"
        tokens = batch * ours.config.num_image_tokens
        rates = {key: tokens / min(_timed(run) for _ in range(args.repeats)) for key, run in runs.items()}
        rows = 2 * batch
        step_s = max(params * 4 / bandwidth, 2 * params * rows / flops)
        bound = "bandwidth" if params * 4 / bandwidth > 2 * params * rows / flops else "FLOPs"
        roofline = batch / step_s
        print(
            f"batch {batch:3d}: eager {rates['ours']:7.1f} | compiled {rates['compiled']:7.1f} | janus "
            f"{rates['janus']:7.1f} tok/s | roofline {roofline:7.1f} ({bound}-bound): eager at "
            f"{rates['ours'] / roofline:.0%}, compiled at {rates['compiled'] / roofline:.0%}",
            flush=True,
        )
        fields += [f"{key}_b{batch}_tok_s={rate:.1f}" for key, rate in rates.items()]
        fields.append(f"roofline_b{batch}_tok_s={roofline:.1f}")
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
