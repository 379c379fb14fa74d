#!/usr/bin/env bash
# Reproduce the offline models `blip2-tiny` and `blip2-tiny-llm` (qformer/weights/blip2-tiny/MODEL_CARD.md):
# BLIP-2 stage 1 (ITC + ITM + ITG) of blip2-tiny-init on Flickr8k train; export int8+fp16; dev recall;
# then stage 2 (blip2-tiny's query path -> frozen SmolLM2-135M) on the same pairs; export; dev BLEU-4 / CIDEr.
#   bash scripts/train_blip2_tiny.sh                       (the shipped CPU recipe; re-running resumes)
#   DEVICE=cuda STAGE1_STEPS=4000 bash scripts/train_blip2_tiny.sh   (a longer run on a GPU)
# Both stages run under bf16 autocast wherever the device has native bf16 (--precision auto): recent GPUs, and
# CPUs with AVX512-BF16/AMX, where a step costs half its fp32 time. Elsewhere they run in fp32.
#   INIT=blip2-tiny-init-lite2 RUN=runs/blip2-tiny-lite2 bash scripts/train_blip2_tiny.sh   (the Lite2 tower:
#     better than Lite0 at equal steps, see the model card; its own run directory, as the feature cache differs)
set -euo pipefail
# python -m qformer.train|stage2 (not `qsearch train`): their mains call qformer.malloc.keep_freed_memory
F8K=${F8K:-../shared/data/flickr8k}
RUN=${RUN:-runs/blip2-tiny}
BIN=${BIN:-.venv/bin}
DEVICE=${DEVICE:-auto}
INIT=${INIT:-blip2-tiny-init}  # the untrained starting point; its frozen tower: Lite0, or Lite2 with -lite2
STAGE1_STEPS=${STAGE1_STEPS:-2000}  # 2.1 epochs; 68.7 min on a 2-core Zen 4, about 126 on a 2-core Xeon (model card)
STAGE1_LR=${STAGE1_LR:-5e-4}  # peak; 1e-4 (LAVIS, for batch 1680 over 250k steps) learns 1.6x less mean recall in 100 steps here
TEXT_LR_SCALE=${TEXT_LR_SCALE:-1.0}  # lr factor on the MiniLM-initialised text path (--text-lr-scale; model card)
CACHE_VIEWS=${CACHE_VIEWS:-4}  # cached views per image, the plain one + augmented ones (--cache-views; v7; 1 = v5)
STAGE2_STEPS=${STAGE2_STEPS:-200}
K_TEST=${K_TEST:-8}  # ITM re-ranking depth of the dev evaluation (the paper's 128 takes hours on a CPU)
export HF_HUB_OFFLINE=1
"$BIN/python" -m qformer.train --data-root "$F8K" --split train --model "$INIT" --device "$DEVICE" \
  --batch-size 32 --max-steps "$STAGE1_STEPS" --warmup-steps 50 --lr "$STAGE1_LR" --min-lr 1e-5 --seed 0 \
  --text-lr-scale "$TEXT_LR_SCALE" --cache-views "$CACHE_VIEWS" --checkpoint-every 50 --out-dir "$RUN/stage1" --cache-dir "$RUN/features" --no-progress --resume
"$BIN/python" - "$RUN/stage1/checkpoints/step_$(printf %07d "$STAGE1_STEPS")" <<'PY'
import sys
from qformer.factory import WEIGHTS_DIR, create_model
model = create_model(sys.argv[1])
model.name = "blip2-tiny"
print("wrote", model.save_pretrained(WEIGHTS_DIR / "blip2-tiny", compact=True))
PY
"$BIN/qsearch" bench retrieval --dataset flickr8k --root "$F8K" --split dev --model blip2-tiny --k-test "$K_TEST" \
  --device "$DEVICE" --out out/blip2-tiny-dev.json
"$BIN/python" -m qformer.stage2 --data-root "$F8K" --split train --model blip2-tiny --llm smollm2 --device "$DEVICE" \
  --batch-size 32 --max-steps "$STAGE2_STEPS" --warmup-steps 20 --lr 1e-4 --min-lr 1e-5 --seed 0 \
  --checkpoint-every 25 --log-every 5 --out-dir "$RUN/stage2" --cache-dir "$RUN/features" --no-progress --resume
"$BIN/python" - "$RUN/stage2/checkpoints/step_$(printf %07d "$STAGE2_STEPS")" <<'PY'
import sys
from qformer.factory import WEIGHTS_DIR
from qformer.stage2 import Blip2LLM
model = Blip2LLM.from_pretrained(sys.argv[1])
model.name = "blip2-tiny-llm"
print("wrote", model.save_pretrained(WEIGHTS_DIR / "blip2-tiny-llm", compact=True))
PY
for kind_model in itg:blip2-tiny llm:blip2-tiny-llm; do
  "$BIN/qsearch" bench captions --dataset flickr8k --root "$F8K" --split dev --model "${kind_model#*:}" \
    --device "$DEVICE" --quiet --out "out/captions_${kind_model%%:*}_dev.json"
done
