"""Where a decoding step's time goes, eager against `compile=True`, at ~100M on the generation path.

    python benchmarks/profile_compiled_step.py [--threads N] [--batch 4]

The model and the call are bench_generate_vs_janus.py's (~100M, CFG 3, top-k 1). Times an eager and a compiled
`generate_image` call twice each, alternating, then profiles one of each (`torch.profiler`) and splits its CPU
time per decoding step into the packed matmuls (`mkldnn::_linear_pointwise`), attention
(`_scaled_dot_product_flash_attention_for_cpu`), the compiled graph's own kernels (`CompiledFxGraph` self time:
inductor's fused code) and the rest. Ends with
`RESULT eager_s=... compiled_s=... eager_matmul_ms=... compiled_matmul_ms=... eager_attention_ms=...
compiled_attention_ms=... compiled_graph_ms=... eager_other_ms=... compiled_other_ms=...` (ms per step).
"""

import argparse
import time

import torch
from bench_generate_image import build
from bench_generate_vs_janus import GUIDANCE, SIZES
from torch.profiler import ProfilerActivity, profile

MATMUL, ATTENTION = "mkldnn::_linear_pointwise", "aten::_scaled_dot_product_flash_attention_for_cpu"


def split(averages, steps: int) -> dict:
    """Self CPU time per decoding step (ms): matmuls, attention, the compiled graph's kernels, the rest."""
    self_us = {}
    for event in averages:
        key = "graph" if event.key.startswith("## Call CompiledFxGraph") else event.key
        self_us[key] = self_us.get(key, 0) + event.self_cpu_time_total
    total = sum(self_us.values())
    parts = {"matmul": self_us.get(MATMUL, 0), "attention": self_us.get(ATTENTION, 0), "graph": self_us.get("graph", 0)}
    parts["other"] = total - sum(parts.values())
    return {name: us / 1000 / steps for name, us in parts.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build("100m", SIZES)
    prompts = (
        ["a red circle at the top left", "two blue squares", "a green triangle", "a purple circle"] * args.batch
    )[: args.batch]

    def run(compiled):
        return model.generate_image(
            prompts, guidance_scale=GUIDANCE, top_k=1, output_type="tokens", progress_bar=False, compile=compiled
        )

    assert torch.equal(run(False), run(True)), "compiled decoding must not change greedy codes"  # warm-ups
    seconds = {False: [], True: []}
    for compiled in (False, True, False, True):
        start = time.perf_counter()
        run(compiled)
        seconds[compiled].append(time.perf_counter() - start)
    steps = model.config.num_image_tokens
    parts = {}
    for compiled in (False, True):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(compiled)
        print(f"compile={compiled}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        parts[compiled] = split(prof.key_averages(), steps)
    fields = [f"eager_s={min(seconds[False]):.3f}", f"compiled_s={min(seconds[True]):.3f}"]
    fields += [
        f"{'compiled' if compiled else 'eager'}_{name}_ms={value:.2f}"
        for compiled in (False, True)
        for name, value in parts[compiled].items()
        if compiled or name != "graph"
    ]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
