"""Peak resident memory (RSS) of loading a UniFork and running `generate_image`, relative to the weights.

    python benchmarks/bench_memory.py [--sizes 100m] [--batch 4] [--compile]

For each size a random UniFork (with its tiny tokenizer + UniForkProcessor) is saved with
`save_pretrained` to a temporary directory; then a FRESH Python subprocess (so the peak is that of
this one job) imports the package, loads it with `UniForkForConditionalGeneration.from_pretrained`
and runs `generate_image(prompts, guidance_scale=3, top_k=1, output_type="tokens")` for a batch of
prompts (8 sequences with CFG). It reports:

  weights       sum of parameter + buffer nbytes (tied tensors once)
  baseline      RSS after the imports (torch, transformers, diffusers, unifork_hf)
  after load    RSS after `from_pretrained`; "load peak" is the high-water mark up to then
  generate peak the high-water mark during `generate_image` alone (VmHWM reset after loading)
  peak          the job's peak RSS over load and generation: `resource.getrusage(RUSAGE_SELF).ru_maxrss`
                (KiB on Linux; the larger of it and /proc/self/status VmHWM); the RESULT line uses it.
                The parent never imports torch: a child's ru_maxrss starts at the RSS of the process
                it was forked from, so a parent holding the model would inflate it (to ~984 MB here)

and checks the goal `peak <= 1.3 * weights + 200 MB` (MB = 2**20 bytes). RssAnon / RssFile tell where
the memory is: `from_pretrained` leaves the weights memory-mapped from the safetensors file (file-backed
pages, read in on first touch), so the RSS grows during the first forward and only by the weights that
image generation reads (not the understanding branch or the LM head). The RSS after every forward
of the decoding loop is sampled too (prefill, then one cached step per image token), to show
whether the KV cache makes it grow. Sizes: "100m" is bench_generate_image.py's ~100M-parameter
generation path (hidden 768, 12 layers, K=6: 157M parameters in the whole Y), "tiny" is unifork-tiny.
On CPU both paths run the generation path's large linears on a oneDNN-packed copy of their weights
(`PackedLinears`), so expect about one more generation path than the weights read. `--compile` runs
`generate_image(compile=True)` instead, its compilation included (the compiled steps are not sampled: a hook
inside them would split the compiled graph); its RESULT line adds `compiled_peak_mb=` and `compiled_bound_mb=`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

MB = 2**20
SIZES = ("tiny", "100m")  # bench_generate_image.py's sizes
PROMPTS = ["a red circle at the top left", "two blue squares", "a green triangle", "a purple circle"]


def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); ru_maxrss cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def save_model(size: str, directory: str) -> None:
    from bench_generate_image import build

    build(size).save_pretrained(directory)  # weights, config, and the processor (tokenizer included)


def child(directory: str, batch: int, compile: bool = False) -> None:
    """The measured job: imports, load, generate; prints one JSON line."""
    import torch

    from unifork_hf import UniForkForConditionalGeneration

    report = {"baseline": proc_status()}
    model = UniForkForConditionalGeneration.from_pretrained(directory).eval()
    assert model.processor is not None, "from_pretrained did not attach the saved processor"
    assert model.processor.image_tokenizer is model.model.image_tokenizer, "the processor has its own VQ copy"
    report["after_load"] = proc_status()

    seen, weights = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            weights += tensor.nbytes
    report["weights"] = weights
    report["vq_weights"] = sum(t.nbytes for t in model.model.image_tokenizer.state_dict().values())
    inner = model.model  # what image generation reads (the VQ only for its codebook, unless decoding pixels)
    path = [
        inner.embed_tokens,
        inner.image_projector,
        inner.shared_layers,
        inner.generation_layers,
        inner.generation_norm,
        model.generation_head,
    ]
    report["generation_path_weights"] = sum(p.nbytes for module in path for p in module.parameters())
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    samples = []  # RSS after each forward of the decoding loop (on the backbone, which every step calls)
    # (not when compiling: the hook would run inside the compiled step and split its graph)
    hook = model.model.register_forward_hook(lambda module, args, output: samples.append(proc_status()["VmRSS"]))
    if compile:
        hook.remove()
    report["peak_reset"] = reset_peak()
    prompts = (PROMPTS * batch)[:batch]
    with torch.inference_mode():
        codes = model.generate_image(
            prompts, guidance_scale=3, top_k=1, output_type="tokens", progress_bar=False, compile=compile
        )
    hook.remove()
    assert codes.shape == (batch, model.config.num_image_tokens), codes.shape
    report["after_generate"] = proc_status()
    report["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    report["samples"] = samples
    prompt_len = model.processor.image_generation_inputs(prompts + [""] * batch).input_ids.shape[1]
    tokens = prompt_len + model.config.num_image_tokens
    # KV cache at the end (a DynamicCache, or a StaticCache of this length):
    # 2 (K, V) x L layers x 2*batch rows (CFG) x kv heads x tokens x head_dim x fp32.
    report["kv_cache"] = 2 * text.num_hidden_layers * 2 * batch * text.num_key_value_heads * tokens * head_dim * 4
    report["params"] = sum(p.numel() for p in model.parameters())
    print("CHILD_REPORT " + json.dumps(report))


def run_python(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"subprocess {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def measure(size: str, batch: int, compile: bool = False) -> dict:
    # Both the saving and the measured job run in subprocesses of this small parent, which never
    # imports torch: on Linux a child's ru_maxrss starts from the RSS of the process it was forked
    # from (the pre-exec copy), so forking from a parent holding a model would report its memory.
    with tempfile.TemporaryDirectory() as directory:
        run_python("--save", directory, "--size", size)
        files = {name: os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)}
        proc = run_python("--child", directory, "--batch", str(batch), *(["--compile"] if compile else []))
    line = [line for line in proc.stdout.splitlines() if line.startswith("CHILD_REPORT ")][-1]
    report = json.loads(line.removeprefix("CHILD_REPORT "))
    report["safetensors_bytes"] = sum(n for name, n in files.items() if name.endswith(".safetensors"))
    return report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100m", help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="generate_image(compile=True), compilation included")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch, args.compile)
    if args.save:
        return save_model(args.size, args.save)
    parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r}; choose from {list(SIZES)}")

    result = None
    for size in sizes:
        r = measure(size, args.batch, args.compile)
        weights, base, load, gen = r["weights"], r["baseline"], r["after_load"], r["after_generate"]
        # The job's peak: ru_maxrss (at least the tiny parent's RSS it was forked from) and VmHWM agree
        # up to rounding; take the larger.
        peak = max(r["ru_maxrss"], gen["VmHWM"], load["VmHWM"])
        limit = 1.3 * weights + 200 * MB
        samples = r["samples"]
        print(
            f"[{size}] {r['params'] / 1e6:.1f}M params, batch {args.batch} prompts (x2 with CFG), "
            f"{len(samples)} forwards (prefill + 1 per image token)"
        )
        print(
            f"  weights_mb             {weights / MB:8.1f}  (safetensors on disk {r['safetensors_bytes'] / MB:.1f}; "
            f"VQ {r['vq_weights'] / MB:.1f}; generation path {r['generation_path_weights'] / MB:.1f})"
        )
        print(
            f"  baseline_rss_mb        {base['VmRSS'] / MB:8.1f}  (after imports; anon {base['RssAnon'] / MB:.1f}, "
            f"file {base['RssFile'] / MB:.1f})"
        )
        print(
            f"  after_load_rss_mb      {load['VmRSS'] / MB:8.1f}  (+{(load['VmRSS'] - base['VmRSS']) / MB:.1f}; "
            f"anon {load['RssAnon'] / MB:.1f}, file {load['RssFile'] / MB:.1f}); load peak {load['VmHWM'] / MB:.1f} "
            f"(+{(load['VmHWM'] - base['VmRSS']) / MB:.1f} over baseline)"
        )
        if r["peak_reset"]:
            grown = (gen["VmHWM"] - load["VmRSS"]) / MB
            print(
                f"  generate_peak_rss_mb   {gen['VmHWM'] / MB:8.1f}  (+{grown:.1f} over after-load); after generate: "
                f"anon {gen['RssAnon'] / MB:.1f}, file {gen['RssFile'] / MB:.1f}, shmem {gen['RssShmem'] / MB:.1f}"
            )
        if samples:
            print(
                f"  rss during decoding    after prefill {samples[0] / MB:.1f}, after step 1 "
                f"{samples[min(1, len(samples) - 1)] / MB:.1f}, last step {samples[-1] / MB:.1f}, "
                f"max {max(samples) / MB:.1f}; final KV cache ~{r['kv_cache'] / MB:.1f} MB"
            )
        print(
            f"  peak_rss_mb            {peak / MB:8.1f}  (whole job, load + generate: ru_maxrss "
            f"{r['ru_maxrss'] / MB:.1f}, VmHWM {max(gen['VmHWM'], load['VmHWM']) / MB:.1f}; parent was "
            f"{parent_rss / MB:.1f})"
        )
        print(f"  peak_minus_baseline_mb {(peak - base['VmRSS']) / MB:8.1f}")
        print(f"  limit_mb               {limit / MB:8.1f}  (1.3 x weights + 200 MB)")
        print(f"  peak_over_weights      {peak / weights:8.2f}   within goal: {peak <= limit}")
        result = (peak, weights, limit)

    peak, weights, limit = result
    print(
        f"RESULT peak_rss_mb={peak / MB:.1f} weights_mb={weights / MB:.1f} limit_mb={limit / MB:.1f} "
        f"peak_over_weights={peak / weights:.2f} within_goal={str(peak <= limit).lower()}"
        + (f" compiled_peak_mb={peak / MB:.1f} compiled_bound_mb={limit / MB:.1f}" if args.compile else "")
    )


if __name__ == "__main__":
    main()
