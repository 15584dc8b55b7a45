"""Joint (multi-task) training with UniForkTrainer, in ~30 lines.

    python examples/train_joint.py                 # tiny random UniFork + built-in colour data, offline
    python examples/train_joint.py --model DIR     # any UniFork checkpoint

Swap `colour_dataset` for your own `datasets` tables: understanding rows `{"images": [PIL], "messages": [...]}`,
generation rows `{"image": PIL, "caption": str}`.
"""

import argparse

import torch

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.tiny import tiny_llm, tiny_tokenizer, tiny_vq
from unifork_hf.training import (
    UniForkTrainer,
    UniForkTrainingArguments,
    colour_dataset,
    mix_tasks,
    prepare_generation,
    prepare_understanding,
    pretokenize_images,
)

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="a UniFork checkpoint (default: a tiny random one)")
parser.add_argument("--output-dir", default="runs/joint")
parser.add_argument("--max-steps", type=int, default=100)
args = parser.parse_args()

torch.manual_seed(0)
if args.model:
    model = UniForkForConditionalGeneration.from_pretrained(args.model)
else:
    model = UniForkForConditionalGeneration.from_pretrained_llm(tiny_llm(), tiny_vq(), tokenizer=tiny_tokenizer())
processor = model.processor

data = colour_dataset(128, image_size=processor.image_processor.size["height"])
understanding = prepare_understanding(data["understanding"], processor)  # loss on the answers only
generation = prepare_generation(data["generation"], processor)  # loss on every image token
train = pretokenize_images(mix_tasks(understanding, generation, generation_ratio=0.5), processor)

training_args = UniForkTrainingArguments(
    output_dir=args.output_dir,
    freeze="joint",  # or "align", "generation_branch", "understanding_branch"
    cfg_dropout=0.1,  # empty prompt for 10% of generation samples, for classifier-free guidance
    max_steps=args.max_steps,
    per_device_train_batch_size=8,
    learning_rate=3e-3,
    logging_steps=20,
    save_strategy="no",
    report_to=[],
)
trainer = UniForkTrainer(model=model, args=training_args, train_dataset=train, processing_class=processor)
trainer.train()
trainer.save_model()  # weights + processor + model card
for log in trainer.state.log_history:
    if "loss" in log:
        print(
            f"step {log['step']}: understanding {log.get('loss_understanding')}, generation {log.get('loss_generation')}"
        )
