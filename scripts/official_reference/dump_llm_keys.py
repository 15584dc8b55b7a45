"""Instantiate the official LlavaQwen2ForCausalLM (UniFork Y-shaped Qwen2) for the Qwen2.5-0.5B geometry on the
meta device and dump its state-dict keys (vision tower is delay-loaded, so it is listed separately)."""

import sys

import torch
from _paths import setup

setup()
from unifork.model.language_model.llava_llama import LlavaConfig, LlavaQwen2ForCausalLM  # noqa: E402

qwen25_05b = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
    use_sliding_window=False,
    sliding_window=None,
    max_window_layers=24,
    bos_token_id=151643,
    eos_token_id=151643,
)
cfg = LlavaConfig(**qwen25_05b)
cfg.mm_vision_tower = "/tmp/unifork-official/work/vision_tower"  # must exist (builder.py checks os.path.exists)
cfg.mm_projector_type = "mlp2x_gelu"
cfg.mm_patch_merge_type = "flat"
cfg._attn_implementation = "eager"
with torch.device("meta"):
    model = LlavaQwen2ForCausalLM(cfg)
sd = model.state_dict()
alias = {}
for k, v in model.state_dict(keep_vars=True).items():
    alias.setdefault(id(v), []).append(k)
print("ALIASES:", [ks for ks in alias.values() if len(ks) > 1])
with open(sys.argv[1], "w") as f:
    for k, v in sd.items():
        f.write(f"{k}\t{tuple(v.shape)}\n")
print("n_keys", len(sd), "vision tower loaded:", model.get_model().vision_tower.is_loaded)
print("gen_fork_layers layer_idx:", [l.self_attn.layer_idx for l in model.model.gen_fork_layers])  # noqa: E741
