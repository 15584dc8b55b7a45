"""Fine-tune UniFork's image understanding with TRL's SFTTrainer and a LoRA on the understanding branch.

    python examples/sft_trl_lora.py                                   # tiny random UniFork, offline, CPU
    python examples/sft_trl_lora.py --model unifork-0.5b --out my-adapter --steps 200 --lr 2e-4

LoRA adapters go on the understanding layers K..L-1 only (`lora_config(branch="understanding")`), so
image generation, which runs the shared layers and the generation branch, is left exactly as it was.
The data is an in-memory `datasets.Dataset` of `images` + `messages` rows: TRL's vision collator
tokenizes them on the fly, and `assistant_only_loss` trains on the answers only (the processor's chat
template marks them with `{% generation %}`). `--train-head` also trains `lm_head` and the branch's
norm in full; the tiny model needs it to get far (its random LM head gives near-uniform logits).
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from unifork_hf import UniForkForConditionalGeneration  # noqa: E402
from unifork_hf.data.tiny import save_tiny_parts  # noqa: E402
from unifork_hf.training.peft_utils import lora_config  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="a saved UniFork directory (default: build a tiny random one)")
parser.add_argument("--out", default=tempfile.mkdtemp(prefix="unifork-lora-"), help="where the adapter goes")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--lr", type=float, default=5e-3)
parser.add_argument("--rank", type=int, default=8)
parser.add_argument("--train-head", action="store_true", help="also train lm_head + understanding_norm in full")
args = parser.parse_args()

if args.model:
    model = UniForkForConditionalGeneration.from_pretrained(args.model)
else:
    model = UniForkForConditionalGeneration.from_pretrained_llm(*save_tiny_parts(tempfile.mkdtemp()))
processor = model.processor

# A small in-memory dataset: flat-coloured images, two phrasings of the question.
colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}
questions = ["What colour is the image?", "Which colour fills the picture?"]
size = model.config.image_size
dataset = datasets.Dataset.from_list(
    [
        {
            "images": [Image.new("RGB", (size, size), rgb)],
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": name}],
        }
        for q in questions
        for name, rgb in colours.items()
    ]
)

on_gpu = torch.cuda.is_available()
trainer = SFTTrainer(
    model=model,
    args=SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=len(dataset),
        learning_rate=args.lr,
        logging_steps=5,
        max_length=None,  # never cut image tokens
        assistant_only_loss=True,  # the loss covers the answers (+ eos) only
        use_cpu=not on_gpu,
        bf16=on_gpu,  # SFTConfig would otherwise use bf16 autocast on CPU too
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    ),
    train_dataset=dataset,
    processing_class=processor,
    peft_config=lora_config(branch="understanding", r=args.rank, train_head=args.train_head),
)
trainer.model.print_trainable_parameters()


def answer_loss() -> float:
    """The model's own understanding loss on the whole dataset, collated as in training."""
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))]).to(trainer.model.device)
    trainer.model.eval()
    with torch.no_grad():
        return trainer.model(**batch).loss.item()


before = answer_loss()
trainer.train()
after = answer_loss()
print(f"answer loss: {before:.4f} before -> {after:.4f} after {args.steps} steps")

trainer.save_model(args.out)  # adapter_config.json + adapter_model.safetensors (+ the processor)
print(f"adapter saved to {args.out}: {sorted(os.listdir(args.out))}")
print("reload: PeftModel.from_pretrained(UniForkForConditionalGeneration.from_pretrained(BASE), OUT)")
