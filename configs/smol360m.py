# SmolLM2-360M pretraining (REFERENCE.md §3: the nanotron config_smollm2_360M.yaml recipe), ~4T tokens.
#   data:   python prepare.py --out data_cache/smol --tokenizer $SMOLLM2_TOKENIZER \
#               --source fineweb-edu=/data/fineweb-edu --source dclm=/data/dclm --source stack-edu=/data/stack-edu ...
#           ($SMOLLM2_TOKENIZER: a tokenizer.json, HF directory or .gguf; one --source NAME=PATH per name in `stages`: fineweb-edu, dclm, stack-edu, infimm-webmath, finemath, cosmopedia-v2)
#   launch: torchrun --nnodes=6 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \
#               --rdzv_endpoint=$HEAD_NODE:29500 train.py configs/smol360m.py
#   (any world size whose micro-batch tokens divide the global batch works: 8 GPUs -> 6 accumulation steps)
out_dir = "out/smol360m"
data_dir = "data_cache/smol"
model = "smol360m"                 # 32 layers, 960 wide, 15 query / 5 kv heads, 361.8M parameters (tied)

# global batch: 768 sequences x 2048 tokens = 1,572,864 tokens per step
# 16 seqs x 2048 tokens x 48 GPUs x 1 accumulation step = 1,572,864
block_size = 2048
micro_batch_size = 16              # plan.py: 55.2 GiB of tensors per rank in bf16 (62.3 with the margin) on 8 H100s;
                                   # on 64 GPUs 16 x 2048 x 64 does not divide the batch: micro_batch_size=4 there
total_batch_tokens = 1_572_864

# 2.6M steps x 1,572,864 tokens = 4.1T tokens
max_steps = 2_600_000
learning_rate = 3e-3
min_lr = 0.0
warmup_steps = 2000
schedule = "wsd"
decay_frac = 0.2                   # the last 520k steps decay linearly to 0
decay_shape = "linear"
weight_decay = 0.01
decay_all_params = True

# one stage of high-quality data; the paper does not publish the weights (ours, as in smol135m.py)
stages = [
    {"start": 0, "weights": {"fineweb-edu": 0.30, "dclm": 0.30, "stack-edu": 0.20, "infimm-webmath": 0.05,
                             "finemath": 0.10, "cosmopedia-v2": 0.05}},
]

eval_interval = 2000
eval_batches = 20
checkpoint_interval = 10_000
keep_checkpoints = 3
compile = True
