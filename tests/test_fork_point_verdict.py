"""The fork-point sweep's verdict (examples/ablation_fork_point.py): a difference counts as beyond the seed
spread only when both arms have seeds and their ranges do not overlap."""

import argparse
import importlib.util
import json
import os

spec = importlib.util.spec_from_file_location(
    "ablation_fork_point", os.path.join(os.path.dirname(__file__), "..", "examples", "ablation_fork_point.py")
)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def runs(arm, scores):
    return [{"arm": arm, "metrics": {"test": {"generation": {"all": s}}}} for s in scores]


def test_one_seed_has_no_spread_so_the_verdict_is_not_known():
    v = ablation.verdict(runs("K2", [0.9]) + runs("K0", [0.5]), "K2", "K0", "generation", ablation.judged("test"))
    assert v["exceeds_seed_spread"] is None and v["difference"] == 0.4
    assert ablation.SPREAD_VERDICT[v["exceeds_seed_spread"]] == "not known (one seed)"


def test_ranges_apart_or_overlapping():
    apart = ablation.verdict(
        runs("K2", [0.8, 0.82, 0.85]) + runs("K0", [0.7, 0.75, 0.79]), "K2", "K0", "generation", ablation.judged("test")
    )
    assert apart["exceeds_seed_spread"] is True and apart["seeds"] == {"K2": 3, "K0": 3}
    overlap = ablation.verdict(
        runs("K2", [0.8, 0.82, 0.85]) + runs("K0", [0.7, 0.81, 0.79]), "K2", "K0", "generation", ablation.judged("test")
    )
    assert overlap["exceeds_seed_spread"] is False
    nothing_to_compare_with_yet = ablation.verdict(runs("K2", [0.8]), "K2", "K0", "generation", ablation.judged("test"))
    assert nothing_to_compare_with_yet is None


def test_alignment_table_averages_seeds_and_marks_branch_layers():
    def alignment(values):
        return {
            "both": [
                {"task": task, "layer": layer, "branch": "shared" if layer < 2 else task, "alignment": value}
                for task in ("understanding", "generation")
                for layer, value in enumerate(values)
            ]
        }

    rows = [{"arm": "K2", "alignment": alignment(v)} for v in ([0.1, 0.2, 0.3], [0.3, 0.2, 0.5])]
    rows.append({"arm": "shared6", "alignment": alignment([0.1, 0.2, 0.3, 0.4])})
    lines = ablation.alignment_table(rows, ["K2", "shared6"])
    assert "| arm | path | emb. | layer 1 | layer 2 | layer 3 |" in lines
    # mean and sample sd of (0.1, 0.3) is 0.2 ± 0.141; layer 2 lies in the branch
    assert "| K2 | understanding | 0.200 ± 0.141 | 0.200 ± 0.000 | *0.400 ± 0.141* |  |" in lines
    assert "| shared6 | generation | 0.100 | 0.200 | *0.300* | *0.400* |" in lines


def test_the_report_covers_every_finished_seed_not_only_those_being_trained(tmp_path):
    """A sweep started with `--seeds 1` rewrites the report: seed 0's finished runs must stay in it."""
    scores = {"all": 0.9}
    split = {"understanding": scores, "generation": scores, "understanding_baselines": {"majority": scores}}
    metrics = {"metrics": {"test": split, "heldout": split, "paraphrase": {"generation": scores}}}
    metrics |= {"num_parameters": 10, "train_minutes": 1.0, "loss_curve": []}
    for seed in (0, 1):
        run = tmp_path / f"K2-seed{seed}"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "alignment.csv").write_text("task,layer,branch,alignment\nunderstanding,0,shared,0.1\n")
    (tmp_path / "K2-seed7.log").write_text("a log, not a run")
    (tmp_path / "K0-seed2").mkdir()  # a run cut off before it finished
    args = argparse.Namespace(out=str(tmp_path), layers=4, seeds=[1])
    assert [(row["arm"], row["seed"]) for row in ablation.finished(args)] == [("K2", 0), ("K2", 1)]


def test_the_report_tables_and_plots_carry_the_seed_spread(tmp_path):
    """Two arms with two seeds each: the summary shows mean ± sd, the verdict reads the ranges, the plots are drawn."""
    types = ("colour", "shape", "position", "size", "count")
    for arm, scores in {"K2": (0.90, 0.92), "shared6": (0.96, 0.98)}.items():
        for seed, score in enumerate(scores):
            per_type = {t: score for t in types} | {"all": score}
            split = {
                "understanding": per_type,
                "generation": per_type,
                "understanding_baselines": {"majority": per_type},
            }
            # held-out: ranges that overlap (K2 0.75-0.87, shared6 0.86-0.98), so a different verdict than test
            held = {"all": score - 0.1 + 0.1 * seed - 0.05 * (arm == "K2")}
            heldout = split | {"understanding": per_type | held, "generation": per_type | held}
            metrics = {"metrics": {"test": split, "heldout": heldout, "paraphrase": {"generation": per_type}}}
            curve = [{"step": 10, "loss_understanding": 1.0, "loss_generation": 2.0}]
            metrics |= {"num_parameters": 2_490_000, "train_minutes": 1.0, "loss_curve": curve}
            run = tmp_path / f"{arm}-seed{seed}"
            run.mkdir()
            (run / "metrics.json").write_text(json.dumps(metrics))
            rows = [
                f"{task},{layer},shared,{score / (layer + 1)}"
                for task in ("understanding", "generation")
                for layer in range(3)
            ]
            (run / "alignment.csv").write_text("task,layer,branch,alignment\n" + "\n".join(rows) + "\n")
            if arm == "K2" or seed == 0:  # shared6 seed 1 kept no weights, so no losses
                losses = {"understanding": 1 - score, "generation": 2 - 2 * score}
                (run / "losses.json").write_text(json.dumps({"test": losses, "heldout": losses}))
    ablation.report(argparse.Namespace(out=str(tmp_path), layers=4, seeds=[0, 1], max_steps=10))

    results = (tmp_path / "results.md").read_text()
    assert "| K2 | 2.49M | 2 | 91.0 ± 1.4 |" in results
    assert "| shared6 | understanding | test | -6.0 | 2 vs 2 | yes |" in results
    assert "| shared6 | generation | heldout | -11.0 | 2 vs 2 | no |" in results
    # losses: K2 from its two seeds (2 - 1.8, 2 - 1.84), shared6 from its one seed with weights
    assert "| K2 | 2 | 0.0900 ± 0.0141 | 0.1800 ± 0.0283 | 0.0900 ± 0.0141 |" in results
    assert "| shared6 | 1 | 0.0400 | 0.0800 | 0.0400 | 0.0800 |" in results
    assert "| shared6 | heldout | +0.1000 | 2 vs 1 | not known (one seed) |" in results
    for plot in ("tradeoff.png", "loss-curves.png", "alignment-understanding.png", "alignment-generation.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG"), plot


def test_teacher_forced_loss_weighs_every_target_token_once(built_model):
    """Batched over rows of different lengths (padded), the loss must equal the token-weighted mean of each row's
    own loss: a mean of batch means, or padding counted as targets, would not."""
    from unifork_hf.data.shapes import shapes_dataset, to_understanding
    from unifork_hf.training import UniForkDataCollator, prepare_understanding

    scenes = shapes_dataset(num_train=0, num_test=5, num_heldout=0, seed=0)["test"]
    rows = prepare_understanding(to_understanding(scenes, conversation=True, seed=0), built_model.processor)
    collate = UniForkDataCollator(built_model.processor, cfg_dropout=0.0)
    total = count = 0.0
    for row in rows:
        batch = collate([row])
        tokens = (batch["labels"][:, 1:] != -100).sum().item()
        total += built_model(**batch).loss_understanding.item() * tokens
        count += tokens
    lengths = {len(row["input_ids"]) for row in rows}
    assert len(lengths) > 1 and len(rows) > 3  # padding and more than one batch below
    batched = ablation.teacher_forced_loss(built_model, scenes, "understanding", batch_size=3)
    assert abs(batched - total / count) < 1e-5
    assert ablation.teacher_forced_loss(built_model, scenes, "generation", batch_size=2) > 0
