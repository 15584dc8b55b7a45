"""A small, deterministic UniFork training run, for the distributed and resume tests.

    python tests/train_script.py OUT [--per-device-batch 8] [--grad-accum 1] [--max-steps 12] [--save-steps 0]
                                     [--cfg-dropout 0.0] [--resume]
    torchrun --nproc_per_node 2 tests/train_script.py OUT --per-device-batch 4

Writes OUT/final.safetensors (the trained weights) and OUT/losses.json (the logged losses).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from unifork_hf import UniForkForConditionalGeneration  # noqa: E402
from unifork_hf.data.tiny import tiny_llm, tiny_tokenizer, tiny_vq  # noqa: E402
from unifork_hf.training import (  # noqa: E402
    UniForkTrainer,
    UniForkTrainingArguments,
    colour_dataset,
    mix_tasks,
    prepare_generation,
    prepare_understanding,
    pretokenize_images,
)


class Sleep(TrainerCallback):
    def __init__(self, seconds):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--cfg-dropout", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0, help="sleep after each step (to be killed mid-run)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer())
    processor = model.processor
    parts = colour_dataset(48, seed=0)
    train = mix_tasks(
        prepare_understanding(parts["understanding"], processor),
        prepare_generation(parts["generation"], processor),
        0.5,
    )
    train = pretokenize_images(train, processor)
    training_args = UniForkTrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        cfg_dropout=args.cfg_dropout,
        seed=0,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    trainer = UniForkTrainer(model=model, args=training_args, train_dataset=train, processing_class=processor)
    if args.step_delay:
        trainer.add_callback(Sleep(args.step_delay))
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if trainer.is_world_process_zero():
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        state.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
        save_file(state, os.path.join(args.out, "final.safetensors"))
        logs = [log for log in trainer.state.log_history if "loss" in log]
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump(logs, f)
    if torch.distributed.is_initialized():
        # Leave without running destructors: when the DDP wrapper is freed, ~Reducer -> ~ProcessGroupGloo joins
        # gloo's worker thread while holding the GIL, and that thread may still be freeing the last all-gather's
        # tensors, which needs the GIL: a deadlock (torch 2.13 on CPU, about 1 run in 10 on 2 cores, with or
        # without destroy_process_group; without it, interpreter shutdown can abort a rank instead).
        # Everything this script writes is written by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
