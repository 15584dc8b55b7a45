"""The model needs none of the training or evaluation libraries: `pip install unifork-hf` without extras loads,
samples, answers and saves a checkpoint."""

import subprocess
import sys
import textwrap

# what the `train` and `eval` extras add
EXTRAS_ONLY = ("datasets", "peft", "trl", "pandas", "matplotlib")  # (pyyaml comes with huggingface_hub)

SCRIPT = textwrap.dedent(
    """
    import sys, tempfile
    for name in {blocked!r}:
        sys.modules[name] = None  # `import name` now raises ImportError, as if not installed
    import torch
    from PIL import Image
    from transformers import AutoModel
    import unifork_hf

    model = AutoModel.from_pretrained(unifork_hf.DEMO_CHECKPOINT).eval()
    codes = model.generate_image("a small red circle at the top left", top_k=1, output_type="tokens", progress_bar=False)
    processor = model.processor
    text = processor.apply_chat_template(
        [{{"role": "user", "content": [{{"type": "text", "text": "How many shapes are there?"}}, {{"type": "image"}}]}}],
        add_generation_prompt=True,
    )
    inputs = processor(images=Image.new("RGB", (32, 32), "white"), text=text, return_tensors="pt")
    answer = model.generate(**inputs, max_new_tokens=2)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        again = AutoModel.from_pretrained(directory)
    print("OK", tuple(codes.shape), answer.shape[1] > inputs.input_ids.shape[1], sorted(set({blocked!r}) & set(k for k, v in sys.modules.items() if v is not None)))
    """
)


def test_the_model_works_without_the_training_and_evaluation_extras():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=EXTRAS_ONLY)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "OK (1, 64) True []"
