#!/usr/bin/env bash
# The bundled demo checkpoint, from scratch, on CPU (2 cores; measured: tokenizer 15 s, VQ 23 min on one thread beside another run, UniFork 45 min including data and eval: ~68 min):
#   nohup bash examples/shapes/make_demo_checkpoint.sh > runs/shapes/make.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
export TQDM_MININTERVAL=20
mkdir -p runs/shapes
python examples/shapes/train_tokenizer.py --out runs/shapes/tokenizer --seed 0
python examples/shapes/train_vq.py --out runs/shapes/vq --steps 5000 --seed 0 | tee runs/shapes/vq.log
python examples/shapes/train_unifork.py --vq runs/shapes/vq --tokenizer runs/shapes/tokenizer \
    --out runs/shapes/unifork --max-steps "${MAX_STEPS:-6000}" --seed 0 | tee runs/shapes/unifork.log
# Package: weights, config, processor, card and metrics (the package's own code loads it: no .py copies).
target=src/unifork_hf/checkpoints/shapes-demo
rm -rf "$target" && mkdir -p "$target"
cp runs/shapes/unifork/{config.json,generation_config.json,model.safetensors,processor_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,README.md,metrics.json} "$target"/
du -sh "$target"
