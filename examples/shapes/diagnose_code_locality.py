"""Diagnostic: how much does the image tokenization decide Shapes generation quality?

Trains the same plain Qwen2 decoder (hidden 128, 4 layers, AdamW 2e-3, cosine, batch 64, 5000 scenes)
on caption -> 64 image codes, with the codes from either
  vq:    a whole-image VQModel (each code depends on the whole image): the demo's VQ before it was
         tiled, made by train_vq.py at commit 6f91f3a (`git show 6f91f3a:examples/shapes/train_vq.py`), or
  patch: the id of each exact 4x4-pixel patch in a dictionary of the training images' distinct
         patches (perfectly local and lossless; not a usable tokenizer for real images),
then greedily generates 200 test captions and judges them with the Shapes judge.

    python examples/shapes/diagnose_code_locality.py vq 800      # reads runs/shapes/{tokenizer,vq}
    python examples/shapes/diagnose_code_locality.py patch 800
"""

import math
import sys
import time

import numpy as np
import PIL.Image
import torch
from diffusers import VQModel
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from unifork_hf.data.shapes import shapes_dataset
from unifork_hf.evaluation import score_images

torch.set_num_threads(1)
torch.manual_seed(0)
mode, steps = sys.argv[1], int(sys.argv[2])
tok = PreTrainedTokenizerFast.from_pretrained("runs/shapes/tokenizer")
data = shapes_dataset(num_train=5000, num_test=500, num_heldout=10, seed=0)


def arr(images):
    return np.stack([np.asarray(i) for i in images])


def patches(x):
    return x.reshape(-1, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(len(x), 64, 48)


train_x = arr(data["train"]["image"])
if mode == "patch":
    dictionary = np.unique(patches(train_x).reshape(-1, 48), axis=0)

    def encode(x):
        p = patches(x).reshape(-1, 48)
        index = {row.tobytes(): i for i, row in enumerate(dictionary)}
        return torch.tensor([index[row.tobytes()] for row in p]).reshape(len(x), 64)

    def decode(codes):
        p = dictionary[codes.numpy()].reshape(-1, 8, 8, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 32, 32, 3)
        return [PIL.Image.fromarray(a.astype(np.uint8)) for a in p]

    ncodes = len(dictionary)
else:
    vq = VQModel.from_pretrained("runs/shapes/vq").eval()

    def encode(x):
        with torch.no_grad():
            t = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
            return torch.cat([vq.quantize(vq.encode(c).latents)[2][2].reshape(len(c), 64) for c in t.split(500)])

    def decode(codes):
        with torch.no_grad():
            lat = vq.quantize.get_codebook_entry(codes.flatten(), (len(codes), 8, 8, 32))
            img = vq.decode(lat, force_not_quantize=True).sample.clamp(-1, 1)
        return [PIL.Image.fromarray(a) for a in ((img + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()]

    ncodes = 512
boi, off = len(tok), len(tok) + 1
train_codes = encode(train_x)
caps = [tok(c)["input_ids"] for c in data["train"]["caption"]]
width = max(map(len, caps))


def batch_of(cap_ids, codes=None):
    ids = torch.full((len(cap_ids), width + 1 + (64 if codes is not None else 0)), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(cap_ids):
        ids[i, width - len(c) : width] = torch.tensor(c)
        mask[i, width - len(c) :] = 1
    ids[:, width] = boi
    if codes is not None:
        ids[:, width + 1 :] = codes + off
    return ids, mask


model = Qwen2ForCausalLM(
    Qwen2Config(
        vocab_size=off + ncodes,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
    )
)
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)


def sched(s):
    return min(1, s / 200) * 0.5 * (1 + math.cos(math.pi * min(1, max(0, s - 200) / (steps - 200))))


lr = torch.optim.lr_scheduler.LambdaLR(opt, sched)
g = torch.Generator().manual_seed(0)
start = time.time()
for step in range(1, steps + 1):
    rows = torch.randint(0, len(caps), (64,), generator=g)
    ids, mask = batch_of([caps[r] for r in rows], train_codes[rows])
    labels = ids.clone()
    labels[:, : width + 1] = -100
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    loss = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    lr.step()
    if step % 100 == 0:
        print(f"{mode} step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
model.eval()
n = 200
test_caps = [tok(c)["input_ids"] for c in data["test"]["caption"][:n]]
ids, mask = batch_of(test_caps)
with torch.no_grad():
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=64,
        do_sample=False,
        suppress_tokens=list(range(off)),
        pad_token_id=tok.pad_token_id,
    )
codes = (out[:, -64:] - off).clamp(0, ncodes - 1)
print(
    mode,
    "test generation (greedy):",
    {k: round(v, 3) for k, v in score_images(decode(codes), data["test"]["objects"][:n]).items()},
)
