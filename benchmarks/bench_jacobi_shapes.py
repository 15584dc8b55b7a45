"""Speculative Jacobi decoding on the bundled Shapes checkpoint: forwards, speed and judged quality.

    python benchmarks/bench_jacobi_shapes.py [-n 500] [--windows 4,8,16] [--batch 10] [--threads N] [--compile]

The same test captions, with the same per-image seeds and the benchmark's sampling (temperature
0.1, no guidance), are drawn with plain decoding (one code per forward) and with each
`jacobi_window`; every run's images are scored by the Shapes judge. Speculative sampling keeps the
codes' distribution, so the judged accuracy should only move by sampling noise (with n=500 images
the standard error of an accuracy near 77% is about 1.9 points). A batch advances by the fewest
codes any of its images accepted, so larger batches accept less per forward; `--batch` sets it.
Ratio = plain time / jacobi time, measured in this process, runs alternating, median of repeats.
`--compile` adds plain decoding with `compile=True` (compiled in an untimed warm-up run; its
compiled steps run no hooks, so its forwards are not counted).
"""

import argparse
import statistics
import time

import torch

import unifork_hf
from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import shapes_dataset
from unifork_hf.evaluation import score_images


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=500, help="test captions")
    parser.add_argument("--windows", default="4,8,16")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each run (quality from the first)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also plain decoding with compile=True")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT).eval()
    test = shapes_dataset(num_train=0, num_test=500, num_heldout=0, seed=0)["test"].select(range(args.n))
    captions, objects = list(test["caption"]), test["asked"]
    settings = model.image_generation_settings()  # the checkpoint's own sampling
    forwards = []

    def run(window, compile=False):
        images = []
        # (counting forwards with a hook would put the hook inside a compiled step)
        hook = None if compile else model.generation_head.register_forward_hook(lambda *_: forwards.append(1))
        for start in range(0, len(captions), args.batch):
            batch = captions[start : start + args.batch]
            generators = [torch.Generator().manual_seed(start + i) for i in range(len(batch))]
            images += model.generate_image(
                batch, generator=generators, jacobi_window=window, progress_bar=False, compile=compile, **settings
            )
        if hook is not None:
            hook.remove()
        return images

    windows = [None] + [int(w) for w in args.windows.split(",")] + (["compiled"] if args.compile else [])
    times, quality, steps = {w: [] for w in windows}, {}, {}
    with torch.no_grad():
        if args.compile:
            run(None, compile=True)  # compiles (untimed)
        for repeat in range(args.repeats):
            for window in windows:  # alternate, so drifting machine load hits all alike
                forwards.clear()
                start = time.perf_counter()
                images = run(None, compile=True) if window == "compiled" else run(window)
                times[window].append(time.perf_counter() - start)
                if repeat == 0:
                    quality[window], steps[window] = score_images(images, objects), len(forwards)

    num_batches = -(-len(captions) // args.batch)
    plain = statistics.median(times[None])
    print(
        f"{len(captions)} test captions, batch {args.batch}, {model.config.num_image_tokens} codes per image, "
        f"sampling {settings}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print("| decoding | forwards per batch | time | speedup | all correct | colour | shape | size | position | count |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for window in windows:
        q, seconds = quality[window], statistics.median(times[window])
        name = {None: "plain", "compiled": "plain, compile=True"}.get(window, f"jacobi_window={window}")
        forwards_per_batch = f"{steps[window] / num_batches:.1f}" if window != "compiled" else "64"
        print(
            f"| {name} | {forwards_per_batch} | {seconds:.1f} s | {plain / seconds:.2f}x | "
            + " | ".join(f"{100 * q[k]:.1f}%" for k in ("all", "colour", "shape", "size", "position", "count"))
            + " |"
        )
    jacobi = [w for w in windows if isinstance(w, int)]
    best = max(jacobi, key=lambda w: plain / statistics.median(times[w]))
    print(
        f"RESULT best_window={best} speedup={plain / statistics.median(times[best]):.2f} "
        f"forwards_per_batch_plain={steps[None] / num_batches:.1f} forwards_per_batch_jacobi={steps[best] / num_batches:.1f} "
        f"all_plain={quality[None]['all']:.3f} all_jacobi={quality[best]['all']:.3f}"
        + (
            f" speedup_compiled={plain / statistics.median(times['compiled']):.2f} "
            f"all_compiled={quality['compiled']['all']:.3f}"
            if args.compile
            else ""
        )
    )


if __name__ == "__main__":
    main()
