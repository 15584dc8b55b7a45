"""Record the official RQ image tokenizer's and depth head's outputs on a tiny instance, as
tests/fixtures/official_rq_tokenizer.pt and tests/fixtures/official_rq_depth_head.pt.

Runs the official UniFork code (tliby/UniFork @ 2c5b757, not committed here) in its own environment:

    git --git-dir=<mirror of tliby/UniFork> archive HEAD | tar x -C /tmp/uf_src
    python3 -m venv /tmp/ufvenv && /tmp/ufvenv/bin/pip install torch==2.13.0 transformers==4.45.0 pillow
    UF_SRC=/tmp/uf_src /tmp/ufvenv/bin/python scripts/official_reference/make_rq_fixtures.py

The weights are not stored: every official tensor is `official_weight(key, shape)` below (seeded by its name), so the
test rebuilds the same official state dict from the recorded key list, converts it and compares outputs. Stored:
key names and shapes, configs, input images, and the official codes, summed code vectors and decoded pixels.

One deliberate change: the official `decode()` casts the decoder to bf16 (a precision choice of UniFork's release);
here the same decoder runs in float32 (its Upsample's bf16 cast is patched out) so that the test can hold the
converted tokenizer to float32 agreement.
"""

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..", "tests", "fixtures")]
from _paths import setup  # noqa: E402
from official_weights import official_weight  # noqa: E402

setup()
from rqvaesigliptransformer import RQVAESIGLIPTransformer, RQVAESIGLIPTransformerConfig  # noqa: E402
from rqvaesigliptransformer.rqvaesiglip import modules  # noqa: E402

FIXTURES = os.path.join(HERE, "..", "..", "tests", "fixtures")


def main():
    sig_dir = "/tmp/uf_tiny_siglip"
    os.makedirs(sig_dir, exist_ok=True)
    vision = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "image_size": 64,
        "patch_size": 16,
    }
    with open(os.path.join(sig_dir, "config.json"), "w") as f:
        json.dump(
            {
                "model_type": "siglip",
                "vision_config": vision,
                "text_config": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_attention_heads": 2,
                    "num_hidden_layers": 1,
                    "vocab_size": 100,
                    "max_position_embeddings": 8,
                },
            },
            f,
        )
    rq = dict(
        architectures=["RQVAESiglip"],
        embed_dim=64,
        n_embed=1024,
        latent_shape=[4, 4, 64],
        code_shape=[4, 4, 4],
        shared_codebook=True,
        restart_unused_codes=True,
        decay=0.99,
        latent_loss_weight=0.25,
        ddconfig=dict(
            attn_resolutions=[2],
            ch=32,
            ch_mult=[1, 1, 2, 2, 4],
            double_z=False,
            dropout=0.0,
            in_channels=3,
            num_res_blocks=1,
            out_ch=3,
            resolution=32,
            z_channels=16,
        ),
        pretrained_model=sig_dir,
        model_type="rqvaesiglip_model",
    )
    head = dict(
        architectures=["RQTransformer"],
        block_size=[4, 4, 4],
        embed_dim=64,
        embed_dim_out=896,
        head={"block": {"n_head": 4}, "n_layer": 1},
        input_embed_dim_1=64,
        input_embed_dim_2=896,
        vocab_size=1024,
        model_type="rqtransformer_model",
    )
    model = RQVAESIGLIPTransformer(RQVAESIGLIPTransformerConfig(rqvaesiglip=rq, rqtransformer=head, hidden_size=64))
    tower = model.rqvaesiglip.eval()
    shapes = {key: list(value.shape) for key, value in tower.state_dict().items()}
    tower.load_state_dict({key: official_weight(key, shape) for key, shape in shapes.items()})
    # float32 decoding (see the docstring)
    modules.Upsample.forward = lambda self, x: self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0))
    record = {"shapes": shapes, "vision_config": vision, "rq_config": rq}
    torch.manual_seed(0)
    with torch.no_grad():
        for side in (4, 6):  # a 6 x 6 grid interpolates the 4 x 4 position table (bicubic)
            images = torch.rand(2, 3, 16 * side, 16 * side) * 2 - 1
            codes, summed = tower.encode_image(images)
            z = tower.post_quant_conv(summed.permute(0, 3, 1, 2))
            record[f"images_{side}"], record[f"codes_{side}"] = images, codes
            record[f"summed_{side}"], record[f"pixels_{side}"] = summed, tower.decoder(z)
    torch.save(record, os.path.join(FIXTURES, "official_rq_tokenizer.pt"))

    # the depth head (rqtransformer; its blocks are 896 wide whatever the config: a constant in the official code)
    depth_head = model.rqtransformer.eval()
    head_shapes = {key: list(value.shape) for key, value in depth_head.state_dict().items()}
    depth_head.load_state_dict({key: official_weight("rqtransformer." + key, s) for key, s in head_shapes.items()})
    head_record = {"shapes": head_shapes, "head_config": head}
    with torch.no_grad():
        hidden = torch.randn(2, 3, 896)
        codes = record["codes_4"].reshape(2, 16, 4)[:, :3]
        head_record["hidden"], head_record["codes"] = hidden, codes
        head_record["logits"] = depth_head(hidden, codes, tower)  # teacher forcing: (2, 3, 4, 1024)
        torch.manual_seed(123)
        cfg_hidden = torch.randn(4, 1, 896)  # rows 0-1 conditional, 2-3 unconditional
        summed, sampled = depth_head.generate(cfg_hidden, tower, cfg=3.0)  # temperature 1, top-k 900, top-p 0.96
        head_record["cfg_hidden"], head_record["cfg_codes"], head_record["cfg_summed"] = cfg_hidden, sampled, summed
    torch.save(head_record, os.path.join(FIXTURES, "official_rq_depth_head.pt"))
    for name, r in (("tokenizer", record), ("depth head", head_record)):
        tensors = ", ".join(f"{k} {tuple(v.shape)}" for k, v in r.items() if torch.is_tensor(v))
        print(f"{name}: {len(r['shapes'])} keys, {tensors}")


if __name__ == "__main__":
    main()
