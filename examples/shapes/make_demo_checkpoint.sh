#!/usr/bin/env bash
# The bundled demo checkpoint, from scratch, on CPU (2 cores). Each stage prints its wall time; measured
# 2026-12-02: tokenizer 14 s, VQ 831 s, UniFork 73 min (data 3 min, 6000 steps 69 min, evaluation 1 min): 87 min.
#   nohup bash examples/shapes/make_demo_checkpoint.sh > runs/shapes/make.log 2>&1 &
# The VQ stage is skipped when runs/shapes/vq already holds a VQ (delete it to retrain).
set -euo pipefail
cd "$(dirname "$0")/../.."
export TQDM_MININTERVAL=20
mkdir -p runs/shapes
SECONDS=0
python examples/shapes/train_tokenizer.py --out runs/shapes/tokenizer --seed 0
echo "tokenizer done at ${SECONDS} s"
if [ ! -f runs/shapes/vq/config.json ]; then
    # one code per 4x4 patch: each code's colour is its own (2x2 codes decoded jointly hid colour from understanding)
    python examples/shapes/train_vq.py --out runs/shapes/vq --tile-size 4 --codebook-size 2048 --steps 12000 --seed 0 \
        | tee runs/shapes/vq.log
fi
echo "VQ done at ${SECONDS} s"
python examples/shapes/train_unifork.py --vq runs/shapes/vq --tokenizer runs/shapes/tokenizer --vq-tile-size 4 \
    --out runs/shapes/unifork --max-steps "${MAX_STEPS:-6000}" --eval-every 1000 --seed 0 | tee runs/shapes/unifork.log
echo "UniFork done at ${SECONDS} s"
# Package: weights, config, processor, card and metrics. The package's own code loads it: no .py copies, so
# no auto_map either (a portable copy with remote code: from_pretrained(DEMO_CHECKPOINT).save_pretrained(dir)).
target=src/unifork_hf/checkpoints/shapes-demo
rm -rf "$target" && mkdir -p "$target"
cp runs/shapes/unifork/{config.json,generation_config.json,model.safetensors,processor_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,README.md,metrics.json,learning_curve.jsonl} "$target"/
python - "$target" <<'PY'
import json, os, sys
for name in ("config.json", "processor_config.json"):
    path = os.path.join(sys.argv[1], name)
    config = json.load(open(path))
    for part in (config, config.get("image_processor", {})):
        part.pop("auto_map", None)
    open(path, "w").write(json.dumps(config, indent=2, sort_keys=True) + "\n")
PY
du -sh "$target"
