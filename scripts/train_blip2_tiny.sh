#!/usr/bin/env bash
# Reproduce the offline default model `blip2-tiny` (qformer/weights/blip2-tiny/MODEL_CARD.md):
# BLIP-2 stage 1 (ITC + ITM + ITG) of blip2-tiny-init on Flickr8k train, on CPU; export int8+fp16; dev recall.
#   bash scripts/train_blip2_tiny.sh            (re-running resumes from the newest checkpoint)
set -euo pipefail
F8K=${F8K:-../shared/data/flickr8k}
RUN=${RUN:-runs/blip2-tiny}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1
"$BIN/qsearch" train stage1 --data-root "$F8K" --split train --model blip2-tiny-init \
  --batch-size 32 --max-steps 400 --warmup-steps 50 --lr 1e-4 --min-lr 1e-5 --seed 0 \
  --checkpoint-every 50 --out-dir "$RUN/stage1" --cache-dir "$RUN/features" --no-progress --resume
"$BIN/python" - "$RUN/stage1/checkpoints/step_0000400" <<'PY'
import sys
from qformer.factory import WEIGHTS_DIR, create_model
model = create_model(sys.argv[1])
model.name = "blip2-tiny"
print("wrote", model.save_pretrained(WEIGHTS_DIR / "blip2-tiny", compact=True))
PY
"$BIN/qsearch" bench retrieval --dataset flickr8k --root "$F8K" --split dev --model blip2-tiny --k-test 8 \
  --out out/blip2-tiny-dev.json
