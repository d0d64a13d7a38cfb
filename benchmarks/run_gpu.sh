#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md that needs several GPUs or the VAE, in one lease
# (a 4-GPU host). Each step has its own time limit, so one slow step loses only itself;
# logs and JSON land in $1 (default: out/).
#   bash benchmarks/run_gpu.sh OUTDIR
set -u
out=${1:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, print its last lines
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T))"
  timeout -s KILL "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $?"; grep -v '^ \|^[{}]\|^\[' "$out/$name.log" | grep -v 'converting\|it/s\]' | tail -n 6
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ngpu=$(nvidia-smi -L | wc -l)

# 1. The 4K forward of Wan2.1-1.3B, one GPU: time and peak memory (FFN over token chunks).
step forward4k 70 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/dit_forward.py --preset wan2.1-t2v-1.3b \
  --grid 21,136,240 --forward-only --repeats 3 --json "$out/wan21_4k_forward.json"
# 2. The 4K VAE decode, 81 frames, one GPU.
step vae21 90 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/vae_decode.py --version wan2.1 --repeats 1 \
  --tile 68,120 --stride 34,60   # the tiles sample.py uses (the release's command line)
# 3. Sequence- and guidance-parallel forwards on 1, 2, 4 GPUs (10 of the 30 layers: the
#    per-layer work and exchanges are the same; the whole model is 3x).
step multi_gpu 120 python3 benchmarks/multi_gpu.py --preset wan2.1-t2v-1.3b --grid 21,136,240 --layers 10 \
  --repeats 3 --json "$out/multi_gpu.json"
# 4. Training steps/s at 720P (stage 1: full fine-tune, synthetic latents, random init),
#    data parallel over fsdp: 1 GPU (batch 1) and all GPUs (batch = GPUs).
train() {  # train NAME GPUS BATCH LIMIT [extra flags]
  local name=$1 gpus=$2 batch=$3 limit=$4; shift 4
  step "$name" "$limit" env CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1))) python3 train.py \
    --config=configs/t3_wan.py:stage1 --workdir="/tmp/$name" --config.total_steps=3 \
    --config.model.init_checkpoint= --config.data.kind=synthetic --config.batch_size="$batch" \
    --config.checkpoint.every=1000 --config.progress=False "$@"
  cp "/tmp/$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null && tail -n 2 "$out/$name.metrics.jsonl"
}
train train720_1gpu 1 1 100
train "train720_${ngpu}gpu" "$ngpu" "$ngpu" 100
echo "== done ($(date -u +%T))"
