# SmolLM2-360M pretraining (REFERENCE.md §3: the nanotron config_smollm2_360M.yaml recipe), ~4T tokens.
#   data:   python prepare.py --check configs/smol360m.py     # which sources (`sources` below) are missing, and how to fetch each
#           python prepare.py --config configs/smol360m.py --tokenizer $SMOLLM2_TOKENIZER   # all of them into data_cache/smol
#           ($SMOLLM2_TOKENIZER: a tokenizer.json, HF directory or .gguf; --task=I/N splits it over a job array)
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

# where each source comes from (sources.py): the Hub dataset, its files as the Hub lays them out (the glob that
# `hf download --include` takes), the text column and a row filter. python prepare.py --check configs/X.py says which
# are missing from data_sources/ and the command that fetches each; --config prepares them all.
sources = {
    "fineweb-edu": dict(hub="HuggingFaceFW/fineweb-edu", files="data/*/*.parquet", text="text",
                        filter="int_score>=3"),        # FineWeb-Edu's own threshold (the published set holds >= 3)
    "dclm": dict(hub="HuggingFaceTB/dclm-edu", files="data/*.parquet", text="text"),  # DCLM, FineWeb-Edu score > 2
    "stack-edu": dict(hub="HuggingFaceTB/stack-edu", files="*/*.parquet", text="text",
                      note="Stack-Edu ships Software Heritage blob ids, not code: run the download script on its dataset "
                           "card (it adds a text column) and save the result as parquet under data_sources/stack-edu/"),
    "infimm-webmath": dict(hub="HuggingFaceTB/finemath", files="infiwebmath-3plus/*.parquet", text="text"),
    "finemath": dict(hub="HuggingFaceTB/finemath", files="finemath-3plus/*.parquet", text="text"),
    "cosmopedia-v2": dict(hub="HuggingFaceTB/smollm-corpus", files="cosmopedia-v2/*.parquet", text="text"),
}

eval_interval = 2000
eval_batches = 20
checkpoint_interval = 10_000
keep_checkpoints = 3
compile = True
