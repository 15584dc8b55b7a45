"""The fork-point ablation on Shapes: where should the Y split, and does the Y beat fair baselines?

    TQDM_MININTERVAL=60 nohup python examples/ablation_fork_point.py --vq runs/shapes/vq \
        --tokenizer runs/shapes/tokenizer --out docs/fork-point --max-steps 6000 --parallel 2 \
        > runs/fork-point.log 2>&1 &

Every run is `examples/shapes/train_unifork.py` with the demo recipe (the library's default batches and
loss balance, questions before the image), the demo's model size (Qwen2-style, hidden 128), its 6000 steps
and the same data; only the arm and the seed change. 6000 steps, not fewer: with 3000 (cosine schedule over
3000) the understanding loss was still falling when the learning rate ran out (K = 1: 0.45 at step 1300,
0.29 at 2800; docs/fork-point/budget-3000/), while the demo's learning curve over 6000 flattened (questions
96.2%, 97.8%, 98.4% at steps 4000, 5000, 6000). The arms, for L = 4 layers:

- the Y at K = 0, L/4, L/2, 3L/4 and L (K = L: one fully shared stack, only the final norms and heads
  differ). Every layer above the fork exists twice, so the Y at K = L/2 holds 2L - K = 6 layers;
- `shared6`: one fully shared stack of 6 layers, the Y at K = L/2's parameter count (deeper, not wider:
  the same layer shape, so the only difference is where the layers sit);
- `understanding-only3` + `generation-only3`: task-specific models of 3 layers each, trained on only
  their task's rows with the same batches and steps; together they hold the Y's 6 layers (and a second
  copy of the embeddings and image tables). Scored as one arm: each task by its own model.

Each arm runs with seeds 0, 1, 2 (model initialisation and data order), seed-major so an interrupted sweep
covers every arm before repeating. A run that already has its `metrics.json` is skipped and a run cut off
resumes from its last trainer checkpoint, so the command can simply be started again. After every run the
image-caption alignment of each task's path is measured (Finding 1) and each task's teacher-forced loss on test
and held-out scenes (`losses.json`: the judge puts every arm's images at 99-100% on test and 0% on held-out, the
loss still ranks them), and `OUT/summary.json`, `OUT/results.md` (mean and seed spread per cell, majority answers
beside the questions, the verdict on Finding 2), `OUT/tradeoff.png`, `OUT/loss-curves.png` (each task's training
loss per run) and `OUT/alignment-*.png` are rewritten. Keep each run's metrics.json, alignment.csv and losses.json
in git (OUT/.gitignore keeps out the weights).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import torch

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import QUESTION_TYPES, shapes_dataset, to_generation, to_understanding
from unifork_hf.evaluation.alignment import modality_alignment, plot_alignment
from unifork_hf.training import UniForkDataCollator, prepare_generation, prepare_understanding

ATTRIBUTES = ("colour", "shape", "size", "position", "count", "all")
TRAIN_SCRIPT = os.path.join(os.path.dirname(__file__), "shapes", "train_unifork.py")


def arms(layers: int) -> list[dict]:
    """Each arm: its name and its runs, {task scored: (run name, layers, K, generation share of the rows)}."""
    half = layers // 2
    deep = 2 * layers - half  # the parameter count of the Y at K = L/2, as one stack
    single = deep // 2
    y = [
        {"arm": f"K{k}", "runs": {"both": (f"K{k}", layers, k, 0.7)}}
        for k in (0, layers // 4, half, 3 * layers // 4, layers)
    ]
    return y + [
        {"arm": f"shared{deep}", "runs": {"both": (f"shared{deep}", deep, deep, 0.7)}},
        {
            "arm": f"task-specific{single}",
            "runs": {
                "understanding": (f"understanding-only{single}", single, single, 0.0),
                "generation": (f"generation-only{single}", single, single, 1.0),
            },
        },
    ]


def run_dir(args, spec, seed) -> str:
    return os.path.join(args.out, f"{spec[0]}-seed{seed}")


def train(args, spec, seed, threads):
    name, layers, k, ratio = spec
    out = run_dir(args, spec, seed)
    if not os.path.exists(os.path.join(out, "metrics.json")):
        command = [
            sys.executable,
            TRAIN_SCRIPT,
            "--vq",
            args.vq,
            "--tokenizer",
            args.tokenizer,
            "--out",
            out,
            "--vq-tile-size",
            str(args.vq_tile_size),
            "--layers",
            str(layers),
            "--num-shared-layers",
            str(k),
            "--generation-ratio",
            str(ratio),
            "--seed",
            str(seed),
            "--max-steps",
            str(args.max_steps),
            "--eval-n",
            str(args.eval_n),
            "--num-train",
            str(args.num_train),
            "--data-cache",
            os.path.join(args.out, "data"),
            "--device",
            args.device,
        ]
        if ratio in (0.0, 1.0):  # one task: its own token mean (a share would only rescale its loss)
            command += ["--understanding-loss-share", "tokens"]
        print("$", " ".join(command), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with open(out + ".log", "a") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    measure(args, spec, seed)
    return out


def measure(args, spec, seed):
    """What is measured on a trained run's weights: the alignment along each task's path and the test losses."""
    out = run_dir(args, spec, seed)
    alignment(out, args.eval_n)
    ratio = spec[3]
    tasks = [task for task, rows in (("understanding", 1 - ratio), ("generation", ratio)) if rows]
    measure_losses(out, args.eval_n, tasks)


def alignment(out, n):
    path = os.path.join(out, "alignment.csv")
    if not os.path.exists(path):
        test = shapes_dataset(num_train=0, num_test=n, num_heldout=0, seed=0)["test"]
        model = UniForkForConditionalGeneration.from_pretrained(out).eval()
        tables = [
            modality_alignment(model, test, task=task, k=10, num_samples=n, progress_bar=False)
            for task in ("understanding", "generation")
        ]
        pd.concat(tables).to_csv(path, index=False)


def measure_losses(out, n, tasks):
    """`out/losses.json`: each of `tasks`' teacher-forced loss on `n` test and `n` held-out scenes (skipped if the
    run's weights were not kept). Finer than the judge: images are 99-100% all-correct on test and 0% on held-out
    for every arm, so the judge cannot rank arms on generation; the loss still can."""
    path = os.path.join(out, "losses.json")
    if os.path.exists(path) or not os.path.exists(os.path.join(out, "model.safetensors")):
        return
    model = UniForkForConditionalGeneration.from_pretrained(out).eval()
    splits = shapes_dataset(num_train=0, num_test=n, num_heldout=n, seed=0)
    losses = {
        split: {task: teacher_forced_loss(model, splits[split], task) for task in tasks}
        for split in ("test", "heldout")
    }
    with open(path, "w") as f:
        json.dump(losses, f, indent=1)


@torch.no_grad()
def teacher_forced_loss(model, scenes, task, batch_size=64) -> float:
    """Mean cross-entropy per target token of `task` on `scenes`, as trained: image codes after the caption, or
    the answers of the scenes' questions as multi-turn rows, question before the image."""
    processor = model.processor
    if task == "generation":
        rows = prepare_generation(to_generation(scenes), processor)
    else:
        rows = prepare_understanding(to_understanding(scenes, conversation=True, seed=0), processor)
    collate = UniForkDataCollator(processor, cfg_dropout=0.0)
    total = count = 0.0
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        # num_items_in_batch=1: the summed loss, so batches weigh by their target tokens
        total += model(**batch, num_items_in_batch=1).loss.item()
        count += (batch["labels"][:, 1:] != -100).sum().item()
    return total / count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vq", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--vq-tile-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument("--num-train", type=int, default=25000, help="training scenes")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to train (the report covers every finished one)"
    )
    parser.add_argument("--runs", nargs="+", help="only these runs, by name (e.g. K4 generation-only3); default all")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where each run trains (train_unifork.py)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads per run (default: all cores for one run at a time, else 1)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: measure finished runs not yet measured (alignment, losses), rewrite the tables and plots",
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    jobs = [(spec, seed) for seed in args.seeds for arm in arms(args.layers) for spec in arm["runs"].values()]
    unknown = set(args.runs or ()) - {spec[0] for spec, _ in jobs}
    if unknown:
        parser.error(f"--runs: unknown {sorted(unknown)}; the runs are {sorted({spec[0] for spec, _ in jobs})}")
    jobs = [job for job in jobs if not args.runs or job[0][0] in args.runs]
    # unfinished runs first (stable: seed-major order kept), so the first job is one that writes the data cache
    jobs.sort(key=lambda job: os.path.exists(os.path.join(run_dir(args, *job), "metrics.json")))
    if args.report_only:
        for spec, seed in jobs:
            if os.path.exists(os.path.join(run_dir(args, spec, seed), "metrics.json")):
                measure(args, spec, seed)
    else:
        threads = args.threads or (os.cpu_count() if args.parallel == 1 else 1)
        cache = os.path.join(args.out, "data", "key.json")
        with ThreadPoolExecutor(args.parallel) as pool:
            # the first run writes the shared data cache that the others read: start them once it exists
            futures = [pool.submit(train, args, *jobs[0], threads)]
            while not os.path.exists(cache) and not futures[0].done():
                time.sleep(10)
            futures += [pool.submit(train, args, *job, threads) for job in jobs[1:]]
            for future in futures:
                print("done", future.result(), flush=True)
                report(args)
    report(args)


def of_task(by_run: dict, task: str):
    """An arm's value for `task` (e.g. its metrics): its `task`-specific run's, else its one run's for "both"."""
    return by_run.get(task, by_run.get("both"))


def finished(args) -> list[dict]:
    """One row per (arm, seed) whose runs have all finished: its metrics, losses and alignment. Every seed with a
    run folder counts, not only this call's `--seeds`: a sweep of seed 1 must not drop seed 0 from the report."""
    seeds = {int(m.group(1)) for name in os.listdir(args.out) if (m := re.fullmatch(r".+-seed(\d+)", name))}
    rows = []
    for arm in arms(args.layers):
        for seed in sorted(seeds):
            outs = {task: run_dir(args, spec, seed) for task, spec in arm["runs"].items()}
            if not all(os.path.exists(os.path.join(out, "alignment.csv")) for out in outs.values()):
                continue
            results = {task: json.load(open(os.path.join(out, "metrics.json"))) for task, out in outs.items()}
            source = {task: of_task(results, task) for task in ("understanding", "generation")}
            metrics = {
                split: {task: source[task]["metrics"][split][task] for task in source}
                | {"understanding_baselines": source["understanding"]["metrics"][split]["understanding_baselines"]}
                for split in ("test", "heldout")
            }
            metrics["paraphrase"] = {"generation": source["generation"]["metrics"]["paraphrase"]["generation"]}
            rows.append(
                {
                    "arm": arm["arm"],
                    "seed": seed,
                    "metrics": metrics,
                    "num_parameters": sum(r["num_parameters"] for r in results.values()),
                    "train_minutes": sum(r["train_minutes"] for r in results.values()),
                    "loss_curves": {task: r.get("loss_curve") for task, r in results.items()},
                    "alignment": {
                        task: pd.read_csv(os.path.join(out, "alignment.csv")).to_dict("records")
                        for task, out in outs.items()
                    },
                    "losses": losses_of(outs),
                }
            )
    return rows


def losses_of(outs: dict) -> dict:
    """{split: {task: loss}} of an arm's runs (`{task scored: run folder}`), from each task's own run; {} while a run
    has no `losses.json` (weights not kept)."""
    paths = {task: os.path.join(out, "losses.json") for task, out in outs.items()}
    if not all(os.path.exists(path) for path in paths.values()):
        return {}
    losses = {task: json.load(open(path)) for task, path in paths.items()}
    return {
        split: {task: of_task(losses, task)[split][task] for task in ("understanding", "generation")}
        for split in ("test", "heldout")
    }


def loss_of(row, task, split):
    return row["losses"].get(split, {}).get(task)


def spread(values, scale=100, digits=1):
    """'mean ± sd' of `values` times `scale` (default: percent; sd over seeds, a single seed has none)."""
    mean = f"{scale * statistics.mean(values):.{digits}f}"
    return f"{mean} ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean


SPREAD_VERDICT = {True: "yes", False: "no", None: "not known (one seed)"}


def judged(split):
    """A run's judge score on `split` for a task (images all-correct, questions exact match), for `verdict`."""
    return lambda row, task: row["metrics"][split][task]["all"]


def verdict(rows, reference, other, task, score):
    """Whether `reference` and `other` differ on `task` by more than the seed spread: their seed ranges do not
    overlap. `score(row, task)`: a run's value (runs giving None are left out). None (not known) while either arm
    has one seed, which has no spread."""
    values = {
        arm: [v for r in rows if r["arm"] == arm and (v := score(r, task)) is not None] for arm in (reference, other)
    }
    if not values[reference] or not values[other]:
        return None
    difference = statistics.mean(values[reference]) - statistics.mean(values[other])
    apart = min(values[reference]) > max(values[other]) or max(values[reference]) < min(values[other])
    if min(len(v) for v in values.values()) < 2:
        apart = None
    return {
        "task": task,
        "reference": reference,
        "other": other,
        "difference": round(difference, 4),
        "seeds": {arm: len(v) for arm, v in values.items()},
        "exceeds_seed_spread": apart,
    }


def report(args):
    rows = finished(args)
    names = [arm["arm"] for arm in arms(args.layers)]
    present = [name for name in names if any(r["arm"] == name for r in rows)]
    reference = f"K{args.layers // 2}"
    verdicts = [
        {**v, "split": split}
        for other in present
        if other != reference
        for task in ("understanding", "generation")
        for split in ("test", "heldout")
        if (v := verdict(rows, reference, other, task, judged(split)))
    ]
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"runs": rows, "verdicts": verdicts, "max_steps": args.max_steps}, f, indent=1)

    def cells(arm, get):
        return spread([get(r["metrics"]) for r in rows if r["arm"] == arm])

    seeds = {name: sum(r["arm"] == name for r in rows) for name in present}
    params = {name: next(r["num_parameters"] for r in rows if r["arm"] == name) for name in present}
    lines = [
        f"### Summary ({args.max_steps} steps; mean ± sd over seeds, %)",
        "",
        "| arm | params | seeds | test images | test questions | paraphrase images | held-out images | held-out questions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in present:
        lines.append(
            f"| {name} | {params[name] / 1e6:.2f}M | {seeds[name]} | "
            + " | ".join(
                cells(name, lambda m, s=split, t=task: m[s][t]["all"])
                for split, task in (
                    ("test", "generation"),
                    ("test", "understanding"),
                    ("paraphrase", "generation"),
                    ("heldout", "generation"),
                    ("heldout", "understanding"),
                )
            )
            + " |"
        )
    for split in ("test", "heldout"):
        majority = next(r["metrics"][split]["understanding_baselines"]["majority"] for r in rows) if rows else {}
        lines += [
            "",
            f"### {split}: questions by type (exact match %; the majority answer in the last row)",
            "",
            "| arm | " + " | ".join(QUESTION_TYPES) + " | all |",
            "| --- |" + " ---: |" * (len(QUESTION_TYPES) + 1),
        ]
        for name in present:
            lines.append(
                f"| {name} | "
                + " | ".join(
                    cells(name, lambda m, s=split, t=t: m[s]["understanding"][t]) for t in (*QUESTION_TYPES, "all")
                )
                + " |"
            )
        if majority:
            lines.append(
                "| majority answer | " + " | ".join(f"{100 * majority[t]:.1f}" for t in (*QUESTION_TYPES, "all")) + " |"
            )
        lines += [
            "",
            f"### {split}: images by attribute (judged correct %)",
            "",
            "| arm | " + " | ".join(ATTRIBUTES) + " |",
            "| --- |" + " ---: |" * len(ATTRIBUTES),
        ]
        for name in present:
            lines.append(
                f"| {name} | "
                + " | ".join(cells(name, lambda m, s=split, a=a: m[s]["generation"][a]) for a in ATTRIBUTES)
                + " |"
            )
    lines += [
        "",
        f"### Verdict: the Y at K = {args.layers // 2} against each arm (judge; positive: the Y better)",
        "",
        "| other arm | task | split | difference (points) | seeds | beyond the seed spread |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for v in verdicts:
        lines.append(
            f"| {v['other']} | {v['task']} | {v['split']} | {100 * v['difference']:+.1f} | "
            f"{v['seeds'][v['reference']]} vs {v['seeds'][v['other']]} | {SPREAD_VERDICT[v['exceeds_seed_spread']]} |"
        )
    lines += loss_tables(rows, present, reference)
    lines += alignment_table(rows, present)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    if rows:
        plot_tradeoff(rows, os.path.join(args.out, "tradeoff.png"))
        plot_loss_curves(rows, os.path.join(args.out, "loss-curves.png"))
        for task in ("understanding", "generation"):
            curves = {}
            for row in rows:
                table = pd.DataFrame(of_task(row["alignment"], task))
                curves[f"{row['arm']} seed {row['seed']}"] = table[table["task"] == task].reset_index(drop=True)
            plot_alignment(
                curves,
                os.path.join(args.out, f"alignment-{task}.png"),
                title=f"{task}: image-caption alignment along the path",
            )


def loss_tables(rows, present, reference) -> list[str]:
    """Markdown lines: each arm's teacher-forced test and held-out losses (mean ± sd over the seeds that have them),
    and the verdict on generation by its loss, where the judge cannot separate the arms."""
    columns = [(split, task) for split in ("test", "heldout") for task in ("understanding", "generation")]
    lines = [
        "",
        "### Teacher-forced loss per target token (500 scenes; mean ± sd over the seeds whose weights were kept)",
        "",
        "| arm | seeds | test questions | test images | held-out questions | held-out images |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm in present:
        measured = [r for r in rows if r["arm"] == arm and r["losses"]]
        if measured:
            cells = [spread([loss_of(r, task, split) for r in measured], 1, 4) for split, task in columns]
            lines.append(f"| {arm} | {len(measured)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"### Verdict on generation by its loss: the Y at K = {reference[1:]} against each arm (negative: the Y lower)",
        "",
        "| other arm | split | loss difference | seeds | beyond the seed spread |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for other in (arm for arm in present if arm != reference):
        for split in ("test", "heldout"):
            v = verdict(rows, reference, other, "generation", lambda row, task, s=split: loss_of(row, task, s))
            if v:
                lines.append(
                    f"| {other} | {split} | {v['difference']:+.4f} | {v['seeds'][reference]} vs {v['seeds'][other]} | "
                    f"{SPREAD_VERDICT[v['exceeds_seed_spread']]} |"
                )
    return lines


def alignment_table(rows, present) -> list[str]:
    """Markdown lines: each arm's alignment along each task's path, layer by layer, mean ± sd over seeds (in
    italics: layers of a task branch; plain: the embeddings and shared layers)."""
    cells = {}  # (arm, task) -> layer -> (values, branch)
    for row in rows:
        for task in ("understanding", "generation"):
            for point in of_task(row["alignment"], task):
                if point["task"] == task:
                    cell = cells.setdefault((row["arm"], task), {}).setdefault(point["layer"], ([], point["branch"]))
                    cell[0].append(point["alignment"])
    depth = max((max(layers) for layers in cells.values()), default=0)
    lines = [
        "",
        "### Alignment along each task's path (mutual k-NN, k = 10, test; mean ± sd over seeds; *italic*: branch layers)",
        "",
        "| arm | path | emb. | " + " | ".join(f"layer {i}" for i in range(1, depth + 1)) + " |",
        "| --- | --- |" + " ---: |" * (depth + 1),
    ]
    for arm in present:
        for task in ("understanding", "generation"):
            layers = cells.get((arm, task), {})
            row = []
            for layer in range(depth + 1):
                if layer not in layers:
                    row.append("")
                    continue
                values, branch = layers[layer]
                text = spread(values, 1, 3)
                row.append(f"*{text}*" if branch != "shared" else text)
            lines.append(f"| {arm} | {task} | " + " | ".join(row) + " |")
    return lines


def plot_tradeoff(rows, path):
    """Understanding exact match against generation all-correct on test, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    points = {}  # arm -> [(generation, understanding)], one per seed
    for row in rows:
        points.setdefault(row["arm"], []).append(
            tuple(100 * row["metrics"]["test"][task]["all"] for task in ("generation", "understanding"))
        )
    for i, (arm, xy) in enumerate(points.items()):
        marker = "o" if arm.startswith("K") else "s^"[i % 2]
        axes.scatter(*zip(*xy), marker=marker, color=f"C{i}", label=f"{arm}, {len(xy)} seed{'s' * (len(xy) > 1)}")
        # one label per arm, at its seeds' mean (a label per point piles up where seeds and arms coincide), with
        # bars over the seeds' range: bars that do not overlap are what `verdict` calls beyond the seed spread
        x, y = (statistics.mean(v) for v in zip(*xy))
        if len(xy) > 1:
            xerr, yerr = ([[mean - min(v)], [max(v) - mean]] for mean, v in zip((x, y), zip(*xy)))
            axes.errorbar(x, y, xerr=xerr, yerr=yerr, color=f"C{i}", capsize=2, linewidth=0.8)
        axes.annotate(arm, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=f"C{i}")
    axes.set_xlabel("test images all correct (%)")
    axes.set_ylabel("test questions exact match (%)")
    axes.set_title(
        "Fork point: understanding vs generation, one point per run\n(bars: the range over seeds, around their mean)",
        fontsize=10,
    )
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_loss_curves(rows, path):
    """Each task's training loss against the step, one line per run (the budget's evidence: flat by the end?)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    arms_seen = list(dict.fromkeys(row["arm"] for row in rows))
    for axes, task in zip(panels, ("understanding", "generation")):
        for row in rows:
            # (a task-specific model logs its own task's loss by name too: UniForkTrainer's per-task logs)
            curve = of_task(row["loss_curves"], task) or []
            points = [(p["step"], p[f"loss_{task}"]) for p in curve if p.get(f"loss_{task}") is not None]
            if points:
                axes.plot(
                    *zip(*points),
                    color=f"C{arms_seen.index(row['arm'])}",
                    linestyle=("-", "--", ":")[row["seed"] % 3],
                    linewidth=1,
                    label=f"{row['arm']} seed {row['seed']}",
                )
        axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_title(f"{task} loss (training batches)")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("cross-entropy")
    panels[1].legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
