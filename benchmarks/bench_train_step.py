"""Cost of the Y at training time: one optimizer step of the routed Y vs a fully shared model vs a naive Y.

    python benchmarks/bench_train_step.py [--repeats 5] [--warmup 1] [--sizes small,medium] [--batch 16] [--threads N]

One step = forward with labels, backward, AdamW step (fused, the Trainer's default), zero_grad, on the same mixed batch: half the
samples understanding (task 0, loss on the answer text after the image), half generation (task 1,
loss on the 64 image positions, targets = the VQ codes in `image_ids`), interleaved, a few rows left
padded. The VQ is frozen (as in the "joint" training stage). Variants:

  y       K = L/2, the routed Y: each sample runs the shared layers, then its own branch only.
  shared  K = L, one stack: the branches are empty and both heads read the shared output. It has
          L/2 fewer decoder layers of parameters (no duplicated upper half), so its AdamW step is
          cheaper too: the ratio y/shared is the full price of the Y, not only of the routing.
  naive   the Y's own modules (same weights as `y`), but BOTH branches run on every sample and each
          sample keeps its own branch's output; its loss is checked equal to `y`'s before timing.

Timings are medians over `--repeats` steps after `--warmup` untimed steps each (default 1), with the
variants alternating. The loss check also compares all gradients (naive vs routed).
Sizes: "small" (hidden 256, 8 layers, 4 heads: 12.9M params in the Y, 8.7M with K = L), "medium"
(hidden 512, 8 layers, 8 heads: 48.0M / 32.3M; ~5 s a step on one free core) and "100m" (hidden 768,
12 layers: bench_generate_image.py's ~100M generation path, 157M / 105M; ~16-19 s a step on one
core, so it is not run by default: the in-between "medium" stands for it). The RESULT line reports
the last size run. On a machine that is busy with other work, pass `--threads 1`: torch's two
OpenMP threads then spin-wait for each other and a medium step took 24 s instead of 6 s.
"""

import argparse
import statistics
import time

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from unifork_hf import UniForkConfig, UniForkForConditionalGeneration

IMG, BOI, EOI = 500, 501, 502  # image placeholder / begin / end ids (text vocabulary of 512)
UNDERSTANDING, GENERATION = 0, 1

SIZES = {
    "small": {
        "model_type": "qwen2",
        "vocab_size": 512,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
    },
    "medium": {
        "model_type": "qwen2",
        "vocab_size": 512,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
    },
    "100m": {
        "model_type": "qwen2",
        "vocab_size": 512,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
    },
}


def build(text_config, num_shared_layers, seed=0):
    # unifork-tiny's VQ: 32 px images -> 8x8 = 64 image tokens, 64-entry codebook.
    config = UniForkConfig.from_preset(
        "unifork-tiny",
        text_config=text_config,
        num_shared_layers=num_shared_layers,
        image_token_id=IMG,
        boi_token_id=BOI,
        eoi_token_id=EOI,
    )
    torch.manual_seed(seed)
    model = UniForkForConditionalGeneration(config).train()
    model.model.image_tokenizer.requires_grad_(False)  # the VQ is never trained
    return model


def make_batch(batch, num_image_tokens, codebook_size, prefix_len=16, suffix_len=16, seed=0):
    """[text prefix][<boi>][image x N][<eoi>][text suffix] for every row; tasks alternate 0, 1, 0, 1, ..."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, 400, (batch, prefix_len), generator=g)
    suffix = torch.randint(2, 400, (batch, suffix_len), generator=g)
    ids = torch.cat(
        [
            prefix,
            torch.full((batch, 1), BOI),
            torch.full((batch, num_image_tokens), IMG),
            torch.full((batch, 1), EOI),
            suffix,
        ],
        1,
    )
    image_ids = torch.randint(0, codebook_size, (batch, num_image_tokens), generator=g)
    task = torch.arange(batch) % 2
    mask = torch.ones_like(ids)
    for row, pad in zip(range(batch), (0, 0, 3, 5, 0, 7, 2, 0)):  # left padding: shorter prompts
        mask[row, :pad] = 0
        ids[row, :pad] = 1
    is_image = ids == IMG
    labels = torch.full_like(ids, -100)
    und = task == UNDERSTANDING
    # Understanding rows: the answer (text after the image). Generation rows: the image positions.
    labels[und, -suffix_len:] = ids[und, -suffix_len:]
    labels[~und] = torch.where(is_image[~und], ids[~und], -100)
    return {"input_ids": ids, "image_ids": image_ids, "attention_mask": mask, "labels": labels, "task": task}


def shifted_ce_sum(logits, labels):
    total = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return total, (labels[:, 1:] != -100).sum()


def naive_loss(model, input_ids, image_ids, attention_mask, labels, task):
    """The Y without routing: both branches on the full batch, then each row keeps its own task's output."""
    inner, text = model.model, model.config.text_config
    assert set(inner.layer_types) == {"full_attention"}, "the naive Y here handles full attention only"
    embeds = inner.embed_tokens(input_ids)
    is_image = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1), inner.embed_image_codes(image_ids).to(embeds.dtype))
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    mask = create_causal_mask(
        config=text, inputs_embeds=embeds, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    layer_kwargs = {
        "attention_mask": mask,
        "position_embeddings": inner.rotary_emb(embeds, position_ids),
        "position_ids": position_ids,
        "cache": None,
        "use_cache": False,
    }

    def run(layers, hidden):
        for layer in layers:
            hidden = layer(hidden, **layer_kwargs)
        return hidden

    shared = run(inner.shared_layers, embeds)
    und_out = inner.understanding_norm(run(inner.understanding_layers, shared))  # every row
    gen_out = inner.generation_norm(run(inner.generation_layers, shared))  # every row
    und_rows, gen_rows = (task == UNDERSTANDING).nonzero().squeeze(1), (task == GENERATION).nonzero().squeeze(1)
    logits = model.lm_head(und_out[und_rows])
    image_logits = model.generation_head(gen_out[gen_rows])
    gen_targets = torch.full_like(labels, -100)
    gen_targets[is_image] = image_ids.reshape(-1)
    gen_targets = gen_targets.masked_fill(labels == -100, -100)
    und_total, und_count = shifted_ce_sum(logits, labels[und_rows])
    gen_total, gen_count = shifted_ce_sum(image_logits, gen_targets[gen_rows])
    return (und_total + gen_total) / (und_count + gen_count).clamp(min=1)


def routed_loss(model, **batch):
    return model(**batch).loss


def make_step(model, loss_fn, batch):
    # fused, as transformers' Trainer runs it by default (optim="adamw_torch_fused")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step():
        """One optimizer step; returns the seconds spent in (forward, backward, AdamW step + zero_grad)."""
        t0 = time.perf_counter()
        loss = loss_fn(model, **batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return step


def check_naive_matches(model, batch):
    """Same loss and same gradients as the routed forward (before any optimizer step)."""
    routed = model(**batch).loss
    routed.backward()
    routed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    naive = naive_loss(model, **batch)
    naive.backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    routed, naive = routed.item(), naive.item()
    loss_diff = abs(routed - naive)
    assert loss_diff < 1e-5, f"naive Y loss {naive} != routed Y loss {routed}"
    assert routed_grads.keys() == naive_grads.keys(), "naive and routed Y train different parameters"
    grad_diff = max(float((routed_grads[n] - naive_grads[n]).abs().max()) for n in routed_grads)
    assert grad_diff < 1e-4, f"naive and routed Y gradients differ by {grad_diff}"
    return routed, loss_diff, grad_diff


def n_params(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--sizes", default="small,medium", help=f"comma-separated, from {list(SIZES)}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r}; choose from {list(SIZES)}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, batch {args.batch}, "
        f"{args.repeats} timed steps per variant (medians) after {args.warmup} warm-up"
    )

    results = {}
    for size in sizes:
        text_config = SIZES[size]
        num_layers = text_config["num_hidden_layers"]
        y = build(text_config, num_layers // 2)
        shared = build(text_config, num_layers)
        batch = make_batch(args.batch, y.config.num_image_tokens, y.config.codebook_size)
        loss, loss_diff, grad_diff = check_naive_matches(y, batch)
        und_tokens = int((batch["labels"][batch["task"] == UNDERSTANDING, 1:] != -100).sum())
        gen_tokens = int((batch["labels"][batch["task"] == GENERATION, 1:] != -100).sum())
        print(
            f"\n[{size}] hidden {text_config['hidden_size']}, L={num_layers}, seq {batch['input_ids'].shape[1]}, "
            f"labelled tokens: {und_tokens} text + {gen_tokens} image | naive vs routed Y: loss {loss:.4f}, "
            f"|diff| {loss_diff:.1e}, max |grad diff| {grad_diff:.1e}"
        )
        print(
            f"  trainable params: y (K={num_layers // 2}) {n_params(y, True) / 1e6:.1f}M, shared (K={num_layers}) "
            f"{n_params(shared, True) / 1e6:.1f}M: K=L has no duplicated upper half, so fewer parameters "
            f"(and a cheaper AdamW step); per sample both run L={num_layers} layers"
        )

        steps = {
            "y": make_step(y, routed_loss, batch),
            "shared": make_step(shared, routed_loss, batch),
            "naive": make_step(y, naive_loss, batch),  # same model, same weights as "y"
        }
        times = {name: [] for name in steps}  # per step: (forward, backward, optimizer)
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        for _ in range(args.repeats):
            for name, step in steps.items():
                times[name].append(step())
        med = {name: statistics.median(sum(parts) for parts in t) for name, t in times.items()}
        for name, t in times.items():
            fwd, bwd, opt = (statistics.median(parts[i] for parts in t) for i in range(3))
            print(
                f"  {name:<6} median {med[name]:.3f} s/step (forward {fwd:.3f}, backward {bwd:.3f}, "
                f"AdamW+zero_grad {opt:.3f}) | steps: " + ", ".join(f"{sum(parts):.3f}" for parts in t)
            )
        results[size] = (med["y"] / med["shared"], med["naive"] / med["y"])
        print(f"  y/shared {results[size][0]:.2f}x, naive/y {results[size][1]:.2f}x")

    ratio_y_vs_shared, ratio_naive_vs_y = results[sizes[-1]]
    print(f"\n(RESULT is for size {sizes[-1]!r})")
    print(f"RESULT ratio_y_vs_shared={ratio_y_vs_shared:.2f} ratio_naive_vs_y={ratio_naive_vs_y:.2f}")


if __name__ == "__main__":
    main()
