#!/usr/bin/env bash
# The GPU check a session runs when it is lent an accelerator (one H200 so far): parity of
# jaxtune's GPU path (fp32 and bf16 with cuDNN attention) with transformers, and tools/bench.py
# on models sized for the chip. Random weights (no download): a BERT-base-shaped classifier and a
# ~1.2B Llama-shaped causal LM, written by transformers on the machine.
#
#   OUT=/tmp/gpu bash tools/gpu_check.sh     # writes $OUT/log.txt and bench_*.json
#
# Runs with the machine's own jax/flax/transformers/torch. The H200 image has no grain or
# tensorflow-datasets (jaxtune.data imports them): carry their cp312 wheels unpacked into a folder
# on PYTHONPATH (grain, array_record, dm_tree, tensorflow_datasets, tensorflow_metadata, promise,
# simple_parsing, immutabledict, termcolor, toml, portpicker, googleapis_common_protos).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT" /tmp/ckpt
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# JAX takes 75% of the GPU at start by default; PyTorch's side of the bench then runs out of memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
jaxtune=("$py" -c "import sys; from jaxtune.cli import entry; sys.argv[0] = 'jaxtune'; entry()")
step() { echo; echo "=== $* ($(date +%T))"; }
{
step versions
nvidia-smi -L
"$py" -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

step random checkpoints
"$py" - <<'PY'
import torch, transformers as t
torch.manual_seed(0)
bert = t.BertConfig(num_labels=3)  # BERT-base: 12 x 768, 110M
t.BertForSequenceClassification(bert).save_pretrained("/tmp/ckpt/bert-base")
llama = t.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=4096)
t.LlamaForCausalLM(llama).save_pretrained("/tmp/ckpt/llama-1b")
print("written")
PY

step "verify on the GPU, fp32, JAX's default matmul precision (bert-base, llama-1b)"
timeout 150 "${jaxtune[@]}" verify /tmp/ckpt/bert-base --task sequence-classification --atol 1e-4
timeout 150 "${jaxtune[@]}" verify /tmp/ckpt/llama-1b --task causal-lm --atol 1e-4
step "bench: BERT-base sequence classification, bf16 compute, batch 64 x seq 512"
timeout 200 "$py" tools/bench.py --model /tmp/ckpt/bert-base --dtype bfloat16 --batch 64 --seq 512 --rounds 5 --steps 5 --json "$OUT/bench_bert_bf16.json"
step "bench: Llama 1.2B causal LM, bf16 compute, batch 8 x seq 1024"
timeout 300 "$py" tools/bench.py --task causal-lm --model /tmp/ckpt/llama-1b --dtype bfloat16 --batch 8 --seq 1024 --rounds 3 --steps 3 --warmup 2 --json "$OUT/bench_llama_bf16.json"
step "verify, fp32, JAX_DEFAULT_MATMUL_PRECISION=highest"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 "${jaxtune[@]}" verify /tmp/ckpt/bert-base --task sequence-classification --atol 1e-4
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 "${jaxtune[@]}" verify /tmp/ckpt/llama-1b --task causal-lm --atol 1e-4

step "bench: BERT-base, fp32, batch 64 x seq 512"
timeout 300 "$py" tools/bench.py --model /tmp/ckpt/bert-base --batch 64 --seq 512 --rounds 3 --steps 5 --json "$OUT/bench_bert_fp32.json"
step done
} 2>&1 | tee "$OUT/log.txt"
