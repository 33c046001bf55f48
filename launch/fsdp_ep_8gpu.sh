#!/usr/bin/env bash
# A ~16B-total DeepSeek-style MoE (configs/model/deepseek_16b.yaml) on one node of 8 GPUs:
# FSDP2 over all 8 ranks for the dense weights, experts split 8 ways (ep=8, 8 experts per GPU),
# bf16 compute with fp32 master weights, every block recomputed in backward.
#
# Per GPU, from `WORLD_SIZE=8 python -m moetrain.train dry_run=true model=deepseek_16b
# parallel.ep=8`: parameters 7.5 GiB + gradients 7.5 GiB + AdamW 15.1 GiB = 30.2 GiB of fp32
# state (DDP with ep=8 would need 46.5 GiB), plus activations and one block's unsharded bf16
# weights; fits 80 GB GPUs at micro-batch 1 x 4096 tokens with activation checkpointing.
# Not run by us: we have had one GPU at most (see the README's "Limitations").
#   launch/fsdp_ep_8gpu.sh data=local_text data.path=corpus.txt data.tokenizer=tok.json \
#       model.vocab_size=<the tokenizer's size>   (data=local_text sets 2,048, its BPE's)
set -euo pipefail
NPROC=8 exec "$(dirname "$0")/torchrun.sh" model=deepseek_16b balance=aux_free \
    parallel.ep=8 parallel.data_parallel=fsdp train.activation_checkpointing=full \
    train.micro_batch_size=1 data.seq_len=4096 "$@"
