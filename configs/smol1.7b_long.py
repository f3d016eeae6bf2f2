# SmolLM2-1.7B long-context extension: 2k -> 8k context with rope_theta 130000 (REFERENCE.md §3, paper §4.6).
# Branched from the stage-4 run ~75B tokens before its end and trained on those last 75B tokens at 8k instead.
#   data:   the sources of configs/smol1.7b.py's stage 4 plus the long-document ones, e.g.
#           python prepare.py --out data_cache/smol --tokenizer $SMOLLM2_TOKENIZER --source dclm-long=/data/dclm-long \
#               --source fineweb-edu-long=/data/fineweb-edu-long --source dolma-books=/data/dolma-books
#   launch: torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \
#               --rdzv_endpoint=$HEAD_NODE:29500 train.py configs/smol1.7b_long.py \
#               --init_from=out/smol1.7b/ckpt_5205000.pt
#   (init_from a checkpoint .pt loads its weights only: fresh AdamW state, step 0 of this schedule). Copy that file
#   aside when the 1.7B run writes it: keep_checkpoints prunes older checkpoints as the run goes on.
out_dir = "out/smol1.7b_long"
data_dir = "data_cache/smol"
model = "smol1.7b"
init_from = "out/smol1.7b/ckpt_5205000.pt"   # 75e9 / 2,097,152 = 35,763 steps before the end (5,240,000), rounded to a checkpoint

# global batch kept at 2,097,152 tokens: 256 sequences of 8192
# 2 seqs x 8192 tokens x 64 GPUs x 2 accumulation steps = 2,097,152
block_size = 8192
micro_batch_size = 2
total_batch_tokens = 2_097_152
activation_checkpointing = True    # 8k sequences: activations per sequence are 4x the 2k run's

# 35,000 steps x 2,097,152 tokens = 73B tokens; the LR continues the stage-4 decay from where the branch left it:
# linear decay over the last 524k steps from 5e-4 -> 35,000 steps before the end it is 5e-4 x 35,000 / 524,000 = 3.34e-5
max_steps = 35_000
learning_rate = 3.34e-5
min_lr = 0.0
warmup_steps = 100                 # a short re-warmup for the fresh AdamW moments (our choice)
schedule = "wsd"
decay_frac = 1.0                   # all of it is decay, as in the run it branches from
decay_shape = "linear"

# 40% long documents (DCLM 10%, FineWeb-Edu 10%, Dolma books 20%) + 60% the stage-4 mix (stage-4 weights x 0.6)
stages = [
    {"start": 0, "block_size": 8192, "batch_size": 2, "rope_theta": 130000.0,
     "weights": {"dclm-long": 0.10, "fineweb-edu-long": 0.10, "dolma-books": 0.20,
                 "fineweb-edu": 0.108, "dclm": 0.24, "stack-edu": 0.144, "finemath": 0.048, "infiwebmath": 0.024,
                 "owm": 0.006, "auggsm8k": 0.006, "cosmopedia-v2": 0.024}},
]

eval_interval = 1000
eval_batches = 10
checkpoint_interval = 2000
keep_checkpoints = 3
compile = True
