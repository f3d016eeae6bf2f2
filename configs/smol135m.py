# SmolLM2-135M pretraining (REFERENCE.md §3: the nanotron config_smollm2_135M.yaml recipe), ~2T tokens.
#   data:   python prepare.py --check configs/smol135m.py     # which sources (`sources` below) are missing, and how to fetch each
#           python prepare.py --config configs/smol135m.py --tokenizer $SMOLLM2_TOKENIZER   # all of them into data_cache/smol
#           ($SMOLLM2_TOKENIZER: a tokenizer.json, HF directory or .gguf; --task=I/N splits it over a job array)
#   launch: torchrun --nnodes=4 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \
#               --rdzv_endpoint=$HEAD_NODE:29500 train.py configs/smol135m.py
#   (any world size works: 8 GPUs -> 4 accumulation steps; the objective is the same)
out_dir = "out/smol135m"
data_dir = "data_cache/smol"
model = "smol135m"                 # 30 layers, 576 wide, 9 query / 3 kv heads, 134.5M parameters (tied)

# global batch: 512 sequences x 2048 tokens = 1,048,576 tokens per step
# 16 seqs x 2048 tokens x 32 GPUs x 1 accumulation step = 1,048,576
block_size = 2048
micro_batch_size = 16              # plan.py: 30.1 GiB of tensors per rank in bf16 (34.6 with the margin) on 8 H100s;
                                   # on 64 GPUs 16 x 2048 x 64 overshoots the batch: micro_batch_size=8 there
total_batch_tokens = 1_048_576

# 2M steps x 1,048,576 tokens = 2.1T tokens
max_steps = 2_000_000
learning_rate = 3e-3
min_lr = 0.0
warmup_steps = 2000
schedule = "wsd"
decay_frac = 0.2                   # the last 400k steps decay linearly to 0
decay_shape = "linear"
weight_decay = 0.01
decay_all_params = True            # nanotron applied weight decay to every parameter

# one stage of high-quality data (FineWeb-Edu, DCLM filtered by the FineWeb-Edu classifier, Stack-Edu,
# InfiMM-WebMath, FineMath, Cosmopedia). The paper does not publish these weights: ours, shaped like the 1.7B's stage 4.
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
