#!/usr/bin/env bash
# The whole chain on a synthetic set, offline, in a few minutes on a 2-core CPU:
# make-synthetic -> extract -> train-heads (full model and the meanP baseline) -> eval.
# Uses ViT-B-32 with OpenAI weights when they can be loaded (cached, or online), else a
# small open_clip config with random weights, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false

DEMO=${DEMO:-data/demo}
VIDEOS=${VIDEOS:-600}
MODEL=${MODEL:-ViT-B-32}
PRETRAINED=${PRETRAINED:-openai}
EPOCHS=${EPOCHS:-}

if ! python -c "import sys; from pipeline.encode import ModelSpec, load_clip; load_clip(ModelSpec(sys.argv[1], sys.argv[2]))" \
        "$MODEL" "$PRETRAINED" >/dev/null 2>&1; then
    echo "== No pretrained weights for $MODEL ($PRETRAINED) can be loaded here (offline?)."
    echo "== Using the small config ViT-Tiny-16 with RANDOM weights: the numbers show the chain works"
    echo "== and that the heads learn, not what CLIP can do. For real weights: PRETRAINED=/path/to/ckpt."
    MODEL=ViT-Tiny-16
    PRETRAINED=none
fi

if [ "$MODEL" != ViT-Tiny-16 ] && [ -z "$EPOCHS" ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    EPOCHS=10  # a 512-wide head on a CPU: keep the demo to minutes, not hours
fi

echo "== 1/4 make-synthetic: $VIDEOS videos in $DEMO/videos"
python cli.py make-synthetic "$DEMO/videos" --videos "$VIDEOS" --seed 0
echo "== 2/4 extract with $MODEL ($PRETRAINED)"
python cli.py extract "$DEMO/videos" --out "$DEMO/features" --model "$MODEL" --pretrained "$PRETRAINED" \
    --batch-size 128 --quiet
echo "== 3/4 train-heads: full model (S2-S5), then the meanP baseline (default settings)"
python cli.py train-heads --features "$DEMO/features" --out "$DEMO/runs/full" ${EPOCHS:+--epochs "$EPOCHS"}
python cli.py train-heads --features "$DEMO/features" --out "$DEMO/runs/meanp" --variant meanp ${EPOCHS:+--epochs "$EPOCHS"}
echo "== 4/4 eval on the test split (chance R@1 = 100 / number of test videos)"
echo "-- full model"
python cli.py eval --features "$DEMO/features" --run "$DEMO/runs/full"
echo "-- meanP baseline"
python cli.py eval --features "$DEMO/features" --run "$DEMO/runs/meanp"
echo
echo "shards:   $DEMO/features/shards (manifest.parquet, captions.parquet, failures.csv, config.json)"
echo "runs:     $DEMO/runs/full and $DEMO/runs/meanp (config.json, metrics.jsonl, curves.png, best.pt, eval_test.json)"
echo "curves:   $DEMO/runs/full/curves.png"
