#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, on one host of 2 (or 4) GPUs, in two calls (each
# under the lent machine's 10-minute command limit). Each step has its own time limit, so a
# slow step loses only itself; logs and JSON land in OUTDIR.
#   bash benchmarks/run_gpu.sh OUTDIR one     # 1-GPU DiT jobs (4K step, attention fusion, 720P training)
#   bash benchmarks/run_gpu.sh OUTDIR vae     # the 4K VAE decodes, two side by side on GPUs 0 and 1
#   bash benchmarks/run_gpu.sh OUTDIR multi   # sequence/guidance parallel, training on all GPUs
#   bash benchmarks/run_gpu.sh OUTDIR stages  # pipelined head groups, with and without XLA's
#                                             # latency-hiding scheduler; 4K training again
#   bash benchmarks/run_gpu.sh OUTDIR train4k # 4K training with 95% of each GPU's memory
#   bash benchmarks/run_gpu.sh OUTDIR four    # the multi phase, trimmed, for a 4-GPU host
#   bash benchmarks/run_gpu.sh OUTDIR h100_4k # 4 x H100: 4K training, XLA's default memory, else 95%
#   bash benchmarks/run_gpu.sh OUTDIR h100    # 4 x H100: 720P training on 1 and 2 GPUs and the 4K VAE
#                                             # decode, side by side on GPUs 0 / 2-3 / 1
#   bash benchmarks/run_gpu.sh OUTDIR full4k  # one GPU: the 4K forwards with the GEMM yardstick, and
#                                             # sample.py at 4K with full-size random models, 3 steps
set -u
out=${1:-out}
phase=${2:-a}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1  # a step past its limit gets SIGABRT: Python prints where it was
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, print its last lines
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout -s ABRT -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"
  grep -v '^ \|^[{}]\|^\[' "$out/$name.log" | grep -v 'converting\|it/s\]\|^W0\|^I0' | tail -n 8
}
train() {  # train NAME GPUS BATCH LIMIT VARIANT [extra flags]: 6 steps, synthetic latents, random init
  # on GPUs FIRST_GPU.. (default 0)
  local name=$1 gpus=$2 batch=$3 limit=$4 variant=$5 first=${FIRST_GPU:-0}; shift 5
  step "$name" "$limit" env CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + gpus - 1))) python3 train.py \
    --config=configs/t3_wan.py:"$variant" --workdir="/tmp/$name" --config.total_steps=6 \
    --config.model.init_checkpoint= --config.data.kind=synthetic --config.batch_size="$batch" \
    --config.checkpoint.every=0 --config.checkpoint.final=False --config.progress=False "$@"
  cp "/tmp/$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null && tail -n 3 "$out/$name.metrics.jsonl"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ngpu=$(nvidia-smi -L | wc -l)

if [ "$phase" = one ]; then
  export CUDA_VISIBLE_DEVICES=1   # the 4K forward and one guided denoising step; attention fused vs not
  step dit4k 180 python3 benchmarks/dit_forward.py --preset wan2.1-t2v-1.3b --grid 21,136,240 --forward-only \
    --guided-step --repeats 3 --json "$out/wan21_4k_step.json"
  step fusion4k 100 python3 benchmarks/dit_forward.py --preset wan2.1-t2v-1.3b --grid 21,136,240 --attention-only \
    --repeats 5 --json "$out/wan21_4k_fusion.json"
  train train720_1gpu 1 1 150 stage1
elif [ "$phase" = vae ]; then
  # The 4K VAE decode with the release's tiles (GPU 0) and with fewer overlaps (GPU 1), side by side.
  ( export CUDA_VISIBLE_DEVICES=0; step vae21_release 420 python3 benchmarks/vae_decode.py --version wan2.1 --repeats 1 \
    --tile 68,120 --stride 34,60 ) &
  ( export CUDA_VISIBLE_DEVICES=1; step vae21_fast 420 python3 benchmarks/vae_decode.py --version wan2.1 --repeats 2 \
    --tile 68,120 --stride 56,104 ) &
  wait
elif [ "$phase" = stages ]; then
  step stages 150 python3 benchmarks/multi_gpu.py --preset wan2.1-t2v-1.3b --grid 21,136,240 --layers 10 \
    --relayouts heads,heads/3 --repeats 3 --json "$out/multi_gpu_stages.json"
  ( export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true
    step stages_lhs 120 python3 benchmarks/multi_gpu.py --preset wan2.1-t2v-1.3b --grid 21,136,240 --layers 10 \
      --min-devices 2 --relayouts heads,heads/3 --repeats 3 --json "$out/multi_gpu_stages_lhs.json" )
  train "train4k_${ngpu}gpu" "$ngpu" 1 200 stage2 --config.mesh.sequence="$ngpu"
elif [ "$phase" = train4k ]; then
  # 4K training needs ~100 GiB per device on 2 GPUs: let XLA take 95% of an H200 (MEM_FRACTION).
  ( export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.95}
    train "train4k_${ngpu}gpu" "$ngpu" 1 300 stage2 --config.mesh.sequence="$ngpu" )
elif [ "$phase" = h100_4k ]; then
  train "train4k_${ngpu}gpu" "$ngpu" 1 280 stage2 --config.mesh.sequence="$ngpu"
  if grep -q RESOURCE_EXHAUSTED "$out/train4k_${ngpu}gpu.log"; then
    mv "$out/train4k_${ngpu}gpu.log" "$out/train4k_${ngpu}gpu_default_memory.log"
    ( export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
      train "train4k_${ngpu}gpu" "$ngpu" 1 280 stage2 --config.mesh.sequence="$ngpu" )
  fi
elif [ "$phase" = h100 ]; then
  ( FIRST_GPU=0 train train720_1gpu 1 1 200 stage1 ) &
  ( FIRST_GPU=2 train train720_2gpu 2 2 200 stage1 ) &
  ( export CUDA_VISIBLE_DEVICES=1; step vae21_release 260 python3 benchmarks/vae_decode.py --version wan2.1 \
    --repeats 1 --tile 68,120 --stride 34,60 ) &
  wait
elif [ "$phase" = full4k ]; then
  step dit4k 210 python3 benchmarks/dit_forward.py --preset wan2.1-t2v-1.3b --grid 21,136,240 --no-full \
    --repeats 3 --json "$out/h200_wan21_4k_yardstick.json"
  step sample4k 300 python3 benchmarks/sample_stages.py --json "$out/h200_sample4k_random_3steps.json" -- \
    --config=configs/t3_wan.py --config.sample.random_init=wan2.1-t2v-1.3b --steps=3 --output_dir=/tmp/sample4k
  step dit5b 110 python3 benchmarks/dit_forward.py --preset wan2.2-ti2v-5b --grid 21,68,120 --forward-only \
    --repeats 3 --json "$out/h200_wan22_4k_yardstick.json"
elif [ "$phase" = four ]; then
  step multi_gpu4 130 python3 benchmarks/multi_gpu.py --preset wan2.1-t2v-1.3b --grid 21,136,240 --layers 10 \
    --relayouts heads/3 --repeats 3 --json "$out/multi_gpu4.json"
  train "train720_${ngpu}gpu" "$ngpu" "$ngpu" 90 stage1
  train "train4k_${ngpu}gpu" "$ngpu" 1 110 stage2 --config.mesh.sequence="$ngpu"
  step guided_all4 90 python3 benchmarks/multi_gpu.py --preset wan2.1-t2v-1.3b --grid 21,136,240 \
    --min-devices "$ngpu" --relayouts heads/3 --repeats 3 --json "$out/multi_gpu4_30layers.json"
else
  # Sequence- and guidance-parallel forwards on 1..N GPUs, both re-layouts (10 of the 30 layers:
  # the per-layer work and exchanges are the same; the whole model is 3x).
  step multi_gpu 150 python3 benchmarks/multi_gpu.py --preset wan2.1-t2v-1.3b --grid 21,136,240 --layers 10 \
    --repeats 3 --json "$out/multi_gpu.json"
  # Training steps/s: 720P (stage 1) data parallel over fsdp, batch = GPUs; 4K (stage 2), the
  # 685,440 tokens of one sample split over all GPUs ("sequence").
  train "train720_${ngpu}gpu" "$ngpu" "$ngpu" 120 stage1
  train "train4k_${ngpu}gpu" "$ngpu" 1 200 stage2 --config.mesh.sequence="$ngpu"
  # The whole 30-layer forward on all GPUs, batch 1 (sequence) and batch 2 (guidance): the
  # 50-step denoising time.
  step guided_all 130 python3 benchmarks/multi_gpu.py --preset wan2.1-t2v-1.3b --grid 21,136,240 \
    --min-devices "$ngpu" --relayouts heads --repeats 3 --json "$out/multi_gpu_30layers.json"
fi
echo "== done ($(date -u +%T))"
