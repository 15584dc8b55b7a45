"""Instantiate the official RQVAESIGLIPTransformer (configs/config.json) with random weights on CPU and
dump every state-dict key with shape. Usage: python dump_vision_tower_keys.py OUT.txt"""

import json
import sys

import torch
from _paths import UF_SRC, setup

setup()
from rqvaesigliptransformer import RQVAESIGLIPTransformer, RQVAESIGLIPTransformerConfig  # noqa: E402

cfg = json.load(open(f"{UF_SRC}/configs/config.json"))
cfg["rqvaesiglip"]["pretrained_model"] = "/tmp/unifork-official/work/siglip-large-patch16-256"
config = RQVAESIGLIPTransformerConfig(
    **{k: v for k, v in cfg.items() if k in ("rqvaesiglip", "rqtransformer", "hidden_size", "architectures")}
)
torch.manual_seed(0)
with torch.device("meta"):
    model = RQVAESIGLIPTransformer(config)
sd = model.state_dict()
lines = []
total = 0
for k, v in sd.items():
    lines.append(f"{k}\t{tuple(v.shape)}\t{str(v.dtype).replace('torch.', '')}")
params = {id(p): p for p in model.parameters()}
print("n_keys", len(sd), "unique params", sum(p.numel() for p in params.values()))
for name in (
    "rqvaesiglip.siglip_model.text_model",
    "rqvaesiglip.siglip_model.vision_model",
    "rqvaesiglip.quantizer",
    "rqvaesiglip.decoder",
    "rqvaesiglip.post_quant_conv",
    "rqtransformer",
):
    n = sum(v.numel() for k, v in sd.items() if k.startswith(name))
    print(name, n)
# which keys share storage (tied / aliases)
seen = {}
for k, v in model.state_dict(keep_vars=True).items():
    seen.setdefault(id(v), []).append(k)
print("ALIASES:", [ks for ks in seen.values() if len(ks) > 1])
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
