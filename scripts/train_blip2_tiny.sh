#!/usr/bin/env bash
# Train the offline models `blip2-tiny` and `blip2-tiny-llm` (qformer/weights/blip2-tiny/MODEL_CARD.md) into
# $RUN/blip2-tiny and $RUN/blip2-tiny-llm; ship one by copying it over qformer/weights/<name>/ once it measures better.
# Every phase resumes where it stopped: re-run the script after a kill or on a new day.
#   0. stage 1, ITC + ITM + ITG from the untrained INIT on 4 cached views, one lr (BLIP-2's recipe); exported
#      int8+fp16. It teaches ITM to compare queries with text (a warm-up from INIT itself leaves ITM at
#      "always no match" for over a thousand steps) and trains the text path for ITC;
#   1. locked-text warm-up from phase 0: the text path frozen, its [CLS] states computed once; ITC alone trains
#      what sees the image, on batches of images carrying all their captions, over CACHE_VIEWS cached views;
#   2. ITC + ITM + ITG from the warm-up: the embeddings and text FFNs at TEXT_LR_SCALE times the lr, the
#      self-attention that queries and text share (ITM's only query-text path) at ATTN_LR_SCALE times; ITM on
#      in-batch negatives, the share ITM_UNIFORM of them uniformly random, or with ITM_NEGATIVES=K on negatives
#      mined over the train set;
#   3. export int8+fp16 to $RUN/blip2-tiny; dev recall;
#   4. stage 2 ($RUN/blip2-tiny's query path -> frozen SmolLM2-135M); export; dev BLEU-4 / CIDEr.
#   bash scripts/train_blip2_tiny.sh
#   DEVICE=cuda STAGE1_STEPS=6000 bash scripts/train_blip2_tiny.sh   (longer, on a GPU)
set -euo pipefail
F8K=${F8K:-../shared/data/flickr8k}
RUN=${RUN:-runs/v8b}
BIN=${BIN:-.venv/bin}
DEVICE=${DEVICE:-auto}
INIT=${INIT:-blip2-tiny-init}  # the untrained starting point; its frozen tower: Lite0, or Lite2 with -lite2
CACHE_VIEWS=${CACHE_VIEWS:-8}  # cached views per image: the plain one + augmented crops and flips
STAGE0_STEPS=${STAGE0_STEPS:-2000}  # 2.1 epochs of 32-pair batches
WARMUP_STEPS=${WARMUP_STEPS:-230}  # 10 epochs of 256-image batches
STAGE1_STEPS=${STAGE1_STEPS:-1200}  # 1.28 epochs of 32-pair batches
STAGE1_LR=${STAGE1_LR:-3e-4}
TEXT_LR_SCALE=${TEXT_LR_SCALE:-0.1}
ATTN_LR_SCALE=${ATTN_LR_SCALE:-1.0}
ITM_UNIFORM=${ITM_UNIFORM:-0.5}
ITM_NEGATIVES=${ITM_NEGATIVES:-0}
STAGE2_STEPS=${STAGE2_STEPS:-800}  # 0.85 epoch of 32-pair batches
K_TEST=${K_TEST:-16}  # ITM re-ranking depth of the dev evaluation (the paper's 128 takes hours on a CPU)
export HF_HUB_OFFLINE=1
common=(--data-root "$F8K" --split train --device "$DEVICE" --seed 0 --cache-dir "$RUN/features" --no-progress --resume)
itm=(--itm-uniform "$ITM_UNIFORM")
if [ "$ITM_NEGATIVES" -gt 0 ]; then itm=(--itm-negatives "$ITM_NEGATIVES"); fi
step() { printf '%s/checkpoints/step_%07d' "$1" "$2"; }
compact() {  # compact CHECKPOINT DIR [NAME]: the stage-1 checkpoint as an int8+fp16 model directory
  "$BIN/python" - "$@" <<'PY'
import sys
from qformer.factory import create_model
model = create_model(sys.argv[1])
model.name = sys.argv[3] if len(sys.argv) > 3 else model.name
print("wrote", model.save_pretrained(sys.argv[2], compact=True))
PY
}

"$BIN/python" -m qformer.train "${common[@]}" --model "$INIT" --cache-views 4 --batch-size 32 \
  --max-steps "$STAGE0_STEPS" --warmup-steps 50 --lr 5e-4 --min-lr 1e-5 --checkpoint-every 50 --out-dir "$RUN/stage0"
compact "$(step "$RUN/stage0" "$STAGE0_STEPS")" "$RUN/stage0_compact"
"$BIN/python" -m qformer.train "${common[@]}" --model "$RUN/stage0_compact" --lock-text --objectives itc --cache-views "$CACHE_VIEWS" \
  --batch-size 256 --max-steps "$WARMUP_STEPS" --warmup-steps 10 --lr 1e-3 --min-lr 1e-5 --log-every 5 \
  --checkpoint-every 23 --out-dir "$RUN/warmup"
"$BIN/python" -m qformer.train "${common[@]}" --model "$(step "$RUN/warmup" "$WARMUP_STEPS")" \
  --cache-views "$CACHE_VIEWS" "${itm[@]}" --text-lr-scale "$TEXT_LR_SCALE" --attn-lr-scale "$ATTN_LR_SCALE" --batch-size 32 \
  --max-steps "$STAGE1_STEPS" --warmup-steps 50 --lr "$STAGE1_LR" --min-lr 1e-5 --log-every 10 --checkpoint-every 50 \
  --eval-split dev --eval-k-test 16 --eval-max-images 200 --eval-every-epochs 0.5 --out-dir "$RUN/stage1"
compact "$(step "$RUN/stage1" "$STAGE1_STEPS")" "$RUN/blip2-tiny" blip2-tiny
"$BIN/qsearch" bench retrieval --dataset flickr8k --root "$F8K" --split dev --model "$RUN/blip2-tiny" --k-test "$K_TEST" \
  --device "$DEVICE" --out "$RUN/blip2-tiny-dev.json"
"$BIN/python" -m qformer.train --stage 2 "${common[@]}" --model "$RUN/blip2-tiny" --llm smollm2 --cache-views "$CACHE_VIEWS" \
  --batch-size 32 --max-steps "$STAGE2_STEPS" --warmup-steps 50 --lr 3e-4 --min-lr 1e-5 \
  --checkpoint-every 100 --log-every 10 --out-dir "$RUN/stage2"
"$BIN/python" - "$(step "$RUN/stage2" "$STAGE2_STEPS")" "$RUN/blip2-tiny-llm" <<'PY'
import sys
from qformer.blip2_llm import Blip2LLM
model = Blip2LLM.from_pretrained(sys.argv[1])
model.name = "blip2-tiny-llm"
print("wrote", model.save_pretrained(sys.argv[2], compact=True))
PY
for kind_model in itg:"$RUN/blip2-tiny" llm:"$RUN/blip2-tiny-llm"; do
  "$BIN/qsearch" bench captions --dataset flickr8k --root "$F8K" --split dev --model "${kind_model#*:}" \
    --device "$DEVICE" --quiet --out "$RUN/captions_${kind_model%%:*}_dev.json"
done
