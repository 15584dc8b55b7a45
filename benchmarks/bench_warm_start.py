"""How long a NEW process waits for its first compiled image, once another process has compiled the same model.

    python benchmarks/bench_warm_start.py [--size 100m] [--batch 4]

`generate_image(compile=True)` compiles its decoding step on the first call of a batch shape. torch keeps what it
compiled on disk (inductor's FX graph cache, AOTAutograd's cache and the GEMM autotuning results, under
`TORCHINDUCTOR_CACHE_DIR`, by default `/tmp/torchinductor_$USER`), so a later process with the same model,
shapes and torch skips most of the work. This runs three fresh Python processes one after the other, each
building the same random model (bench_generate_image.py's sizes, seed 0) and timing its first
`generate_image(..., compile=True)` call (batch 4 with CFG, top-k 1) and then its second one:

  cold    with an empty cache directory of its own (what the first process on a machine pays);
  warm    the same cache directory, now filled by `cold`;
  eager   no compile: the first call of the default (eager) path, for scale.

The compiled codes are checked equal to the eager ones. Ends with
`RESULT second_process_first_image_s=... cold_first_image_s=... eager_first_image_s=... compiled_image_s=...`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
import torch
sys.path.insert(0, {bench_dir!r})
from bench_generate_image import build
start = time.perf_counter()
model = build({size!r})
built = time.perf_counter() - start
prompts = (["a red circle at the top left", "two blue squares", "a green triangle", "a purple circle"] * 16)[:{batch}]
kwargs = dict(guidance_scale=3.0, top_k=1, output_type="tokens", progress_bar=False, compile={compile})
times = []
for _ in range(2):
    start = time.perf_counter()
    codes = model.generate_image(prompts, **kwargs)
    times.append(time.perf_counter() - start)
print("CHILD " + json.dumps({{"build_s": built, "first_s": times[0], "second_s": times[1], "codes": codes.tolist()}}))
"""


def child(size, batch, compile, cache_dir):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    code = CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), size=size, batch=batch, compile=compile)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    line = next(line for line in out.stdout.splitlines() if line.startswith("CHILD "))
    return {**json.loads(line[6:]), "process_s": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="100m", choices=["tiny", "100m"])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        runs = {
            "cold": child(args.size, args.batch, True, cache_dir),
            "warm": child(args.size, args.batch, True, cache_dir),
            "eager": child(args.size, args.batch, False, cache_dir),
        }
    assert runs["cold"]["codes"] == runs["warm"]["codes"] == runs["eager"]["codes"], "compiled codes must equal eager"
    for name, run in runs.items():
        print(
            f"{name:5s}: first image {run['first_s']:6.1f} s, second {run['second_s']:5.2f} s "
            f"(model built in {run['build_s']:.1f} s; whole process {run['process_s']:.1f} s)"
        )
    print(
        f"RESULT second_process_first_image_s={runs['warm']['first_s']:.1f} "
        f"cold_first_image_s={runs['cold']['first_s']:.1f} eager_first_image_s={runs['eager']['first_s']:.2f} "
        f"compiled_image_s={runs['warm']['second_s']:.2f} eager_image_s={runs['eager']['second_s']:.2f}"
    )


if __name__ == "__main__":
    main()
