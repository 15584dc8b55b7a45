"""Fork an LLM into a UniFork, save it, reload it with the Auto classes, and run both tasks.

    python examples/build_and_generate.py                      # tiny random parts, offline, seconds
    python examples/build_and_generate.py --llm Qwen/Qwen2.5-0.5B --vq path/to/vqmodel --out unifork-0.5b

With random or untrained parts the outputs are noise: this shows the API, not a trained model.
"""

import argparse
import tempfile

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

import unifork_hf  # noqa: F401  (registers "unifork" with the Auto classes)
from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.tiny import save_tiny_parts

parser = argparse.ArgumentParser()
parser.add_argument("--llm", help="causal LM path or Hub id (default: a tiny random Qwen2)")
parser.add_argument("--vq", help="diffusers VQModel path or Hub id (default: a tiny random VQModel)")
parser.add_argument("--out", default=tempfile.mkdtemp(prefix="unifork-"))
args = parser.parse_args()
if not (args.llm and args.vq):
    args.llm, args.vq = save_tiny_parts(tempfile.mkdtemp())

# 1. Build the Y the paper's way: layers K..L-1 and the final norm are copied into the generation branch.
model = UniForkForConditionalGeneration.from_pretrained_llm(args.llm, args.vq)
model.save_pretrained(args.out)
print(f"K={model.config.num_shared_layers} of {model.config.text_config.num_hidden_layers} layers shared -> {args.out}")

# 2. Reload with the Auto classes: the processor saved beside the weights is attached.
model = AutoModel.from_pretrained(args.out).eval()
processor = AutoProcessor.from_pretrained(args.out)

# 3. Text -> image: batched classifier-free guidance, one generator per image for reproducibility.
images = model.generate_image(
    ["a red circle at the top left", "two blue squares"],
    num_images_per_prompt=2,
    guidance_scale=3.0,
    top_k=50,
    generator=[torch.Generator().manual_seed(i) for i in range(4)],
)
images[0].save(f"{args.out}/sample.png")
print(f"{len(images)} images of {images[0].size} -> {args.out}/sample.png")

# 4. Image -> text through transformers' generate, with the KV cache.
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
text = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=Image.new("RGB", (64, 64), "red"), text=text, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
print("answer:", processor.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
