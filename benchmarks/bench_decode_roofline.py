"""How close image-token decoding gets to the memory-bandwidth roofline, at ~100M parameters.

    python benchmarks/bench_decode_roofline.py [--repeats 5] [--batch 1] [--compile]

Past the loop's overhead, a decoding step is bound by reading every weight on the generation path
once (shared layers, generation branch and head; the code embeddings are a table lookup). So

    achieved bandwidth = bytes of those weights x decoding steps per second
    fraction_of_bandwidth = achieved / bandwidth of a large tensor copy measured in the same run

Steps per second come from the decoding steps only (timestamps of the generation head's calls after
the prompt's prefill), greedy (`top_k=1`) with CFG, so each step is one forward of 2 x batch rows.
The copy moves 2 x its size (read + write), as STREAM's copy counts it; a read-only pass (sum) is
printed too. `--compile` measures `generate_image(compile=True)` (its one-time compilation is a
warm-up call, not counted); its steps are timed from the compiled step's returns.
"""

import argparse
import statistics
import time

import torch
from bench_generate_image import build


def copy_bandwidth(size_mb: int, repeats: int):
    src = torch.ones(size_mb * 2**20 // 4)
    dst = torch.zeros_like(src)  # pages touched now, so the timed copies do not fault them in
    copies, reads = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        reads.append(time.perf_counter() - start)
    nbytes = src.numel() * 4
    return 2 * nbytes / statistics.median(copies), nbytes / statistics.median(reads)


def decode_steps_per_second(model, prompts, repeats, compile=False):
    """Median over repeats of the decoding-step rate of one `generate_image` call."""
    stamps = []
    if compile:  # a hook inside the compiled step would not run: stamp the compiled step's returns
        compiled_decoding = model._compiled_decoding

        def stamped_decoding(*args):
            forward, cache = compiled_decoding(*args)
            return lambda *inputs: (forward(*inputs), stamps.append(time.perf_counter()))[0], cache

        model._compiled_decoding = stamped_decoding
    else:
        hook = model.generation_head.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    rates = []
    try:
        for _ in range(repeats + 1):  # the first call warms up (and compiles)
            stamps.clear()
            model.generate_image(
                prompts, guidance_scale=3.0, top_k=1, output_type="tokens", progress_bar=False, compile=compile
            )
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))  # eager stamps[0]: end of the prefill
    finally:
        if compile:
            del model._compiled_decoding
        else:
            hook.remove()
    return statistics.median(rates[1:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--copy-mb", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="generate_image(compile=True)")
    args = parser.parse_args()

    model = build("100m")
    inner = model.model
    path = [inner.shared_layers, inner.generation_layers, inner.generation_norm, model.generation_head]
    weight_bytes = sum(p.numel() * p.element_size() for module in path for p in module.parameters())
    prompts = (
        ["a red circle at the top left", "two blue squares", "a green triangle", "a purple circle"] * args.batch
    )[: args.batch]

    # Interleave the two measurements so both see the same machine state.
    bandwidths, reads, rates = [], [], []
    for _ in range(2):
        copy_bw, read_bw = copy_bandwidth(args.copy_mb, args.repeats)
        bandwidths.append(copy_bw), reads.append(read_bw)
        rates.append(decode_steps_per_second(model, prompts, args.repeats, args.compile))
    bandwidth, read_bandwidth, rate = max(bandwidths), max(reads), statistics.median(rates)
    achieved = weight_bytes * rate
    fraction = achieved / bandwidth
    print(
        f"generation path: {weight_bytes / 1e6:.0f} MB of fp32 weights read per step; batch {args.batch} with CFG "
        f"({2 * args.batch} rows per step), torch threads {torch.get_num_threads()}, compile={args.compile}"
    )
    print(
        f"decoding: {rate:.1f} steps/s = {args.batch * rate:.1f} image tokens/s -> {achieved / 1e9:.2f} GB/s of weights"
    )
    print(f"memory: copy {bandwidth / 1e9:.2f} GB/s (read+write), read-only {read_bandwidth / 1e9:.2f} GB/s")
    print(f"fraction of copy bandwidth {fraction:.2f}, of read bandwidth {achieved / read_bandwidth:.2f}")
    print(
        f"RESULT fraction_of_bandwidth={fraction:.2f} steps_per_s={rate:.1f} weights_mb={weight_bytes / 1e6:.0f} "
        f"bandwidth_gb_s={bandwidth / 1e9:.2f} achieved_gb_s={achieved / 1e9:.2f}"
    )


if __name__ == "__main__":
    main()
