"""Why decoding at ~100M stays far from the bandwidth roofline on CPU: the kernels, measured alone.

    python benchmarks/bench_skinny_matmul.py [--repeats 7] [--rows 2,8]

A decoding step multiplies a few rows (2 x batch with CFG) by every weight matrix of the generation
path. This times exactly that, without the model around it: the linear layers of 12 Llama/Qwen2
decoder layers at hidden 768, MLP 3072 (the ~100M config of bench_generate_vs_janus.py; 453 MB in
fp32, far beyond any cache), for each way torch offers to store and multiply them:

- `linear`: `F.linear(x, W)`, W row-major (out, in) as `nn.Linear` stores it: what the model runs;
- `linear_colmajor`: the same values stored column-major (`W.t().contiguous().t()`), so the kernel
  reads `W.T` contiguously;
- `int8_weight_only`: `torch._weight_int8pack_mm` on per-row int8 weights (a quarter of the bytes):
  the CPU kernel behind weight-only int8;
- `int8_dequantize`: dequantize each int8 weight to fp32, then `F.linear`;
- `onednn_packed`: oneDNN's linear on weights reordered once into its blocked layout
  (`mkldnn._reorder_linear_weight`): what `generate_image` runs on CPU (`PackedLinears`), eager or compiled;
- `inductor_frozen`: all the `F.linear`s as one function through `torch.compile` with inductor's
  weight freezing and `max_autotune` (what `generate_image(compile=True)` used on CPU until 2026-12-02): its C++ GEMM
  templates run on weights packed once at compile time (compiled before timing; `--no-compile` skips it).

Each prints the weight bytes it reads divided by its time, next to the bandwidth of a large copy
(STREAM's count: read + write) measured in the same run.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from bench_decode_roofline import copy_bandwidth

HIDDEN, MLP, LAYERS = 768, 3072, 12
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]  # q k v o, gate up down


def quantize(weight):
    scales = weight.abs().amax(1) / 127
    return (weight / scales[:, None]).round().to(torch.int8), scales


def compile_frozen(weights):
    """All the linears as one compiled pass (returns every output, so nothing is optimized away)."""
    linears = torch.nn.ModuleList(torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights).eval()
    for linear, w in zip(linears, weights):
        linear.weight.data = w
    compiled = torch.compile(
        lambda xs: [linear(xs[linear.in_features]) for linear in linears], dynamic=False, options={"max_autotune": True}
    )

    def run(xs):
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):  # (not honoured from `options`)
            return compiled(xs)

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", default="2,8", help="rows of x (2 x batch with CFG)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the inductor_frozen contender")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(out, inp) / inp**0.5 for _ in range(LAYERS) for out, inp in SHAPES]
    colmajor = [w.t().contiguous().t() for w in weights]
    int8 = [quantize(w) for w in weights]
    fp32_bytes = sum(w.numel() * 4 for w in weights)
    contenders = {
        "linear": (lambda x, i: F.linear(x, weights[i]), fp32_bytes),
        "linear_colmajor": (lambda x, i: F.linear(x, colmajor[i]), fp32_bytes),
        "int8_weight_only": (lambda x, i: torch._weight_int8pack_mm(x, *int8[i]), fp32_bytes // 4),
        "int8_dequantize": (lambda x, i: F.linear(x, int8[i][0].float() * int8[i][1][:, None]), fp32_bytes // 4),
    }
    x = torch.randn(1, HIDDEN)
    error = (torch._weight_int8pack_mm(x, *int8[0]) - F.linear(x, weights[0])).abs().max()
    print(
        f"{LAYERS} layers, hidden {HIDDEN}, MLP {MLP}: {fp32_bytes / 1e6:.0f} MB fp32; "
        f"int8 max abs error on one layer {error:.2e}; threads {torch.get_num_threads()}"
    )

    copy, read = copy_bandwidth(1024, args.repeats)
    print(f"copy {copy / 1e9:.1f} GB/s, read {read / 1e9:.1f} GB/s")
    result = {"copy_gb_s": copy / 1e9}
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {inp: torch.randn(rows, inp) for inp in (HIDDEN, MLP)}
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
        onednn = lambda x, i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")  # noqa: E731
        passes = {
            name: (lambda m=multiply: [m(inputs[w.shape[1]], i) for i, w in enumerate(weights)], nbytes)
            for name, (multiply, nbytes) in {**contenders, "onednn_packed": (onednn, fp32_bytes)}.items()
        }
        if not args.no_compile:
            frozen = compile_frozen(weights)
            reference = [F.linear(inputs[w.shape[1]], w) for w in weights]
            error = max((a - b).abs().max().item() for a, b in zip(frozen(inputs), reference))
            print(f"rows {rows:2d} inductor_frozen compiled; max abs difference from F.linear {error:.1e}")
            passes["inductor_frozen"] = (lambda: frozen(inputs), fp32_bytes)
        for name, (one_pass, nbytes) in passes.items():
            times = []
            for _ in range(args.repeats + 1):  # the first pass warms up
                start = time.perf_counter()
                one_pass()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times[1:])
            result[f"{name}_rows{rows}_gb_s"] = nbytes / seconds / 1e9
            print(
                f"rows {rows:2d} {name:17s} {seconds * 1e3:7.1f} ms per pass  "
                f"{nbytes / seconds / 1e9:5.1f} GB/s = {nbytes / seconds / copy:.0%} of copy"
            )
    print("RESULT " + " ".join(f"{key}={value:.2f}" for key, value in result.items()))


if __name__ == "__main__":
    main()
