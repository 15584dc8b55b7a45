"""The fork-point ablation on Shapes: where should the Y split?

    nohup python examples/ablation_fork_point.py --vq runs/shapes/vq --tokenizer runs/shapes/tokenizer \
        --out docs/ablation --max-steps 2000 > runs/ablation.log 2>&1 &

Trains the Shapes configuration of the demo checkpoint (Qwen2-style, hidden 128, L = 4) with the fork
at K = 0 (two separate stacks over shared embeddings), L/4, L/2, 3L/4 and L (one fully shared
stack), same data, steps and seed; K = L/2 and K = L also with a second seed. Each run is
`examples/shapes/train_unifork.py` (which evaluates the test and held-out splits with the Shapes
judge), then the image-caption alignment of each task's path is measured on the test split.
Runs that already have their metrics are skipped, so the script can be restarted; the summary,
tables and plots are rewritten after every run. Writes `OUT/summary.json`, `OUT/alignment-*.png`
and the markdown tables to `OUT/results.md` (docs/ablation keeps these and each run's metrics.json
and alignment.csv in git, not the weights).
"""

import argparse
import json
import os
import subprocess
import sys

import pandas as pd

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import QUESTION_TYPES, shapes_dataset
from unifork_hf.evaluation.alignment import modality_alignment, plot_alignment

ATTRIBUTES = ("colour", "shape", "size", "position", "count", "all")


def runs(layers: int):
    """(K, seed) pairs: every fork point with seed 0 first, so a cut-off run still covers all K."""
    forks = (0, layers // 4, layers // 2, 3 * layers // 4, layers)
    return [(k, 0) for k in forks] + [(k, 1) for k in (layers // 2, layers)]


def train(args, k, seed, out):
    if os.path.exists(os.path.join(out, "metrics.json")):
        return
    command = [
        sys.executable,
        os.path.join(os.path.dirname(__file__), "shapes", "train_unifork.py"),
        "--vq",
        args.vq,
        "--tokenizer",
        args.tokenizer,
        "--out",
        out,
        "--layers",
        str(args.layers),
        "--num-shared-layers",
        str(k),
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
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def alignment(out, test, n):
    path = os.path.join(out, "alignment.csv")
    if not os.path.exists(path):
        model = UniForkForConditionalGeneration.from_pretrained(out).eval()
        tables = [
            modality_alignment(model, test, task=task, k=10, num_samples=n, progress_bar=False)
            for task in ("understanding", "generation")
        ]
        pd.concat(tables).to_csv(path, index=False)
    return pd.read_csv(path)


def percent(value):
    return f"{100 * value:.1f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vq", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument("--num-train", type=int, default=25000, help="training scenes")
    args = parser.parse_args()
    test = shapes_dataset(num_train=0, num_test=args.eval_n, num_heldout=0, seed=0)["test"]

    summary = []
    for k, seed in runs(args.layers):
        out = os.path.join(args.out, f"K{k}-seed{seed}")
        train(args, k, seed, out)
        result = json.load(open(os.path.join(out, "metrics.json")))
        summary.append(
            {
                "K": k,
                "seed": seed,
                "metrics": result["metrics"],
                "losses": result.get("final_losses"),
                "num_parameters": result.get("num_parameters"),
                "train_minutes": result["train_minutes"],
                "alignment": alignment(out, test, args.eval_n).to_dict("records"),
            }
        )
        report(sorted(summary, key=lambda row: (row["K"], row["seed"])), args)  # after every run: partial results


def run_cells(row):
    return f"| {row['K']} | {row['seed']} | {row['num_parameters'] / 1e6:.2f}M | "


def loss_cells(row):
    losses = row["losses"] or {}
    return (
        " | "
        + " | ".join(f"{float(losses.get(f'loss_{task}') or 'nan'):.3f}" for task in ("understanding", "generation"))
        + " |"
    )


def report(summary, args):
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    lines = [
        "### Summary (all-correct images / answered questions, %; final training losses)",
        "",
        "| K | seed | params | test gen. | test und. | held-out gen. | held-out und. | loss und. | loss gen. |",
        "|" + " ---: |" * 9,
    ]
    for row in summary:
        lines.append(
            run_cells(row)
            + " | ".join(
                percent(row["metrics"][split][task]["all"])
                for split in ("test", "heldout")
                for task in ("generation", "understanding")
            )
            + loss_cells(row)
        )
    lines.append("")
    for split in ("heldout", "test"):
        lines += [
            f"### {split} split ({args.eval_n} scenes, {5 * args.eval_n} questions)",
            "",
            "| K | seed | params | und. "
            + " | und. ".join(QUESTION_TYPES)
            + " | und. all | gen. "
            + " | gen. ".join(ATTRIBUTES)
            + " | loss und. | loss gen. |",
            "|" + " ---: |" * (5 + len(QUESTION_TYPES) + len(ATTRIBUTES) + 1),
        ]
        for row in summary:
            und, gen = row["metrics"][split]["understanding"], row["metrics"][split]["generation"]
            lines.append(
                run_cells(row)
                + " | ".join(percent(und[t]) for t in (*QUESTION_TYPES, "all"))
                + " | "
                + " | ".join(percent(gen[a]) for a in ATTRIBUTES)
                + loss_cells(row)
            )
        lines.append("")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))

    for task in ("understanding", "generation"):
        curves = {}
        for row in summary:
            table = pd.DataFrame(row["alignment"])
            curves[f"K={row['K']} seed {row['seed']}"] = table[table["task"] == task].reset_index(drop=True)
        plot_alignment(
            curves,
            os.path.join(args.out, f"alignment-{task}.png"),
            title=f"{task}: image-caption alignment along the path",
        )


if __name__ == "__main__":
    main()
