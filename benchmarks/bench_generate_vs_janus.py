"""UniFork generate_image vs transformers' Janus image generation, at equal language-model dims.

    python benchmarks/bench_generate_vs_janus.py [--sizes tiny,100m] [--repeats 5] [--batch 4] [--threads N]
        [--jacobi-window 16]

Both models have random weights and run in this process, with the same decoder layer class
(Llama), hidden size, depth on the generated path (UniFork: K shared + L-K generation layers =
Janus's L), heads, KV heads, MLP width, image tokens per image, codebook size, prompt length,
batch, CFG scale, dtype (fp32) and torch threads. Sampling is top-k=1 on both sides (CFG ->
top-k -> softmax -> multinomial), so each step does the same work; the tokens differ (different
weights), only speed is compared. Neither side decodes codes to pixels. Timings are medians over
alternating repeats after one warm-up each; ratio = ours / janus in image tokens per second.
On a machine that is busy with other work, `--threads 1` gives far steadier numbers (spinning
OpenMP threads that do not get a core slow every step several-fold).

A third contender, in the same alternation: UniFork with speculative Jacobi decoding
(`jacobi_window`); with top-k=1 its tokens must equal plain decoding's (checked), so only the
number of forwards differs, and that depends on how often drafts match: with random weights it
says little about a trained model (see benchmarks/README.md for the Shapes checkpoint).

A fourth: UniFork with `compile=True` (decoding steps through torch.compile: on CPU inductor with
frozen weights and its C++ GEMM templates). Its tokens must equal plain decoding's too (checked);
its one-time compilation is timed apart (the first call) and not counted. Janus's image loop calls
its language model eagerly every step and offers no compile option.
"""

import argparse
import statistics
import time

import torch
from bench_decode_roofline import copy_bandwidth
from bench_generate_image import build
from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration
from transformers.utils import logging

# Language-model geometry shared by both models. "tiny" is unifork-tiny with a Llama LLM (the
# preset's is Qwen2; Llama makes the decoder layers the same class as Janus's); "100m" is the
# ~100M-parameter generation path of bench_generate_image.py. Both keep unifork-tiny's VQ:
# 32 px images -> 8x8 = 64 codes of a 64-entry codebook.
TEXT = {
    "model_type": "llama",
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "eos_token_id": 0,
    "pad_token_id": 1,
}
SIZES = {
    "tiny": {
        "text_config": {
            **TEXT,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "num_shared_layers": 2,
    },
    "100m": {
        "text_config": {
            **TEXT,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
        },
        "num_shared_layers": 6,
    },
}
GUIDANCE = 3.0


def build_janus(unifork_config):
    """A Janus with UniFork's LLM geometry, image grid and codebook; its vision encoder and VQ
    decoder are minimal, as image generation never runs them."""
    text = unifork_config.text_config.to_dict()
    hidden, grid = text["hidden_size"], unifork_config.image_grid_size
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": unifork_config.image_size,
        "patch_size": unifork_config.image_size // grid,
        "num_image_tokens": grid**2,
        "projection_dim": hidden,
    }
    # The generation-side pieces mirror UniFork's: code embedding of dim vq_embed_dim, then an
    # aligner Linear(vq_embed_dim, H) -> GELU -> Linear(H, H) (= UniFork's image projector).
    # Janus's head is Linear(H, H) -> GELU -> Linear(H, codebook), one H x H matmul more per
    # step than UniFork's Linear(H, codebook): that is Janus's design and is kept.
    vq = {
        "embed_dim": unifork_config.vq_config["vq_embed_dim"],
        "num_embeddings": unifork_config.codebook_size,
        "latent_channels": 32,
        "base_channels": 32,
        "channel_multiplier": [1, 1, 1],
        "num_res_blocks": 1,
        "projection_dim": hidden,
        "image_token_embed_dim": hidden,
        "num_hidden_layers": 2,
        "hidden_act": "gelu",
    }
    config = JanusConfig(
        text_config=text, vision_config=vision, vq_config=vq, image_token_id=unifork_config.image_token_id
    )
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).eval()
    assert model.model.vision_model.config.num_image_tokens == unifork_config.num_image_tokens
    assert model.model.generation_head.vision_head.out_features == unifork_config.codebook_size
    return model


def param_counts(ours, janus):
    """Parameters that one image-token step reads (plus the text embeddings the prompt uses)."""
    inner = ours.model
    ours_path = [
        inner.embed_tokens,
        inner.image_projector,
        inner.shared_layers,
        inner.generation_layers,
        inner.generation_norm,
        ours.generation_head,
    ]
    n_ours = sum(p.numel() for m in ours_path for p in m.parameters()) + inner.image_tokenizer.codebook.numel()
    jm = janus.model
    janus_path = [jm.language_model, jm.generation_embeddings, jm.generation_aligner, jm.generation_head]
    n_janus = sum(p.numel() for m in janus_path for p in m.parameters())
    return n_ours, n_janus


def janus_inputs(ours_ids, boi_token_id, bos_token_id, batch, seed=0):
    """Janus prompts as long as UniFork's (which are left-padded to a common length):
    bos, fixed random text tokens, then begin-of-image. Janus builds its unconditional rows itself
    (everything but bos/boi replaced by pad), as UniFork runs [cond; uncond] as one batch."""
    length = ours_ids.shape[1]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (batch, length), generator=generator)
    ids[:, 0], ids[:, -1] = bos_token_id, boi_token_id
    return ids, torch.ones_like(ids)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="tiny,100m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--jacobi-window", type=int, default=16, help="for the speculative Jacobi contender")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    if unknown := [s for s in sizes if s not in SIZES]:
        parser.error(f"unknown sizes {unknown}; choose from {sorted(SIZES)}")
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()  # Janus's generate warns about defaults on every call
    prompts = ["a red circle at the top left", "two blue squares", "a green triangle", "a purple circle"]
    prompts = (prompts * args.batch)[: args.batch]

    results, ceilings = {}, {}
    for name in sizes:
        ours = build(name, SIZES)
        config = ours.config
        janus = build_janus(config)
        n_ours, n_janus = param_counts(ours, janus)
        ours_ids = ours.processor.image_generation_inputs(prompts + [""] * len(prompts)).input_ids
        # bos: any id that is not the pad (Janus keeps bos and boi in the unconditional rows).
        ids, mask = janus_inputs(ours_ids, config.boi_token_id, bos_token_id=2, batch=args.batch)

        # boi goes through generation_kwargs, which only a GenerationConfig carries (as a kwarg
        # to generate it would be rejected as an unused model kwarg).
        janus_config = GenerationConfig(
            guidance_scale=GUIDANCE,
            do_sample=True,
            top_k=1,
            bos_token_id=2,
            pad_token_id=config.text_config.pad_token_id,
            generation_kwargs={"boi_token_id": config.boi_token_id},
        )

        def run_ours():
            return ours.generate_image(
                prompts, guidance_scale=GUIDANCE, top_k=1, output_type="tokens", progress_bar=False
            )

        def run_jacobi():
            return ours.generate_image(
                prompts,
                guidance_scale=GUIDANCE,
                top_k=1,
                output_type="tokens",
                progress_bar=False,
                jacobi_window=args.jacobi_window,
            )

        def run_compiled():
            return ours.generate_image(
                prompts, guidance_scale=GUIDANCE, top_k=1, output_type="tokens", progress_bar=False, compile=True
            )

        def run_janus():
            return janus.generate(ids, attention_mask=mask, generation_mode="image", generation_config=janus_config)

        tokens = args.batch * config.num_image_tokens
        plain = run_ours()  # warm-ups
        forwards = []
        hook = ours.generation_head.register_forward_hook(lambda *_: forwards.append(1))
        assert torch.equal(run_jacobi(), plain), "speculative Jacobi decoding must not change greedy tokens"
        hook.remove()
        start = time.perf_counter()
        assert torch.equal(run_compiled(), plain), "compiled decoding must not change greedy tokens"
        compile_s = time.perf_counter() - start
        shapes = (plain.shape, run_janus().shape)
        assert shapes[0] == shapes[1] == (args.batch, config.num_image_tokens), shapes
        contenders = {"ours": run_ours, "jacobi": run_jacobi, "compiled": run_compiled, "janus": run_janus}
        times = {key: [] for key in contenders}
        for _ in range(args.repeats):  # alternate, so drifting machine load hits all alike
            for key, fn in contenders.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        ours_s, jacobi_s, compiled_s, janus_s = (statistics.median(times[k]) for k in contenders)
        results[name] = (tokens / ours_s, tokens / janus_s, tokens / jacobi_s, tokens / compiled_s)
        text = config.text_config
        print(
            f"{name}: llama H={text.hidden_size} L={text.num_hidden_layers} (UniFork K={config.num_shared_layers}) "
            f"heads={text.num_attention_heads} kv={text.num_key_value_heads} I={text.intermediate_size} | "
            f"{config.num_image_tokens} image tokens x batch {args.batch}, codebook {config.codebook_size}, "
            f"prompt {ours_ids.shape[1]} tokens, CFG {GUIDANCE}, fp32, {torch.get_num_threads()} threads"
        )
        print(f"  params on the generation path: unifork {n_ours / 1e6:.2f}M, janus {n_janus / 1e6:.2f}M")
        print(
            f"  unifork generate_image {tokens / ours_s:.1f} tok/s ({ours_s:.2f} s) | janus generate "
            f"{tokens / janus_s:.1f} tok/s ({janus_s:.2f} s) | ratio=ours/janus {janus_s / ours_s:.2f}"
        )
        print(
            f"  unifork jacobi_window={args.jacobi_window}: {len(forwards)} forwards for {config.num_image_tokens} "
            f"tokens, {tokens / jacobi_s:.1f} tok/s ({jacobi_s:.2f} s) | ratio=jacobi/janus {janus_s / jacobi_s:.2f}"
        )
        print(
            f"  unifork compile=True: {tokens / compiled_s:.1f} tok/s ({compiled_s:.2f} s; compiling took "
            f"{compile_s:.0f} s once) | ratio=compiled/janus {janus_s / compiled_s:.2f}"
        )
        # The roofline: a step must read Janus's decoder + head weights once. At the copy bandwidth
        # measured now, how much faster than Janus could any loop at this dtype decode?
        jm = janus.model
        step_bytes = sum(
            p.numel() * p.element_size()
            for m in (jm.language_model.layers, jm.language_model.norm, jm.generation_head)
            for p in m.parameters()
        )
        bandwidth, _ = copy_bandwidth(1024, 3)
        janus_bytes_s = step_bytes * config.num_image_tokens / janus_s  # steps/s x bytes per step (whole run)
        ceilings[name] = bandwidth / janus_bytes_s
        print(
            f"  janus reads {step_bytes / 1e6:.1f} MB of weights per step -> {janus_bytes_s / 1e9:.2f} GB/s; copy "
            f"bandwidth {bandwidth / 1e9:.2f} GB/s: no loop reading these weights can beat janus by more than "
            f"{ceilings[name]:.2f}x"
        )
        del ours, janus

    fields = [f"ratio_{k}={o / j:.2f}" for k, (o, j, _, _) in results.items()]
    fields += [f"ratio_jacobi_{k}={sj / j:.2f}" for k, (_, j, sj, _) in results.items()]
    fields += [f"ratio_compiled_{k}={c / j:.2f}" for k, (_, j, _, c) in results.items()]
    fields += [
        f"{side}_{k}_tok_s={v:.1f}"
        for k, values in results.items()
        for side, v in zip(("ours", "janus", "jacobi", "compiled"), values)
    ]
    fields += [f"ceiling_ratio_{k}={v:.2f}" for k, v in ceilings.items()]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
