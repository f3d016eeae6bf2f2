# SmolLM2-1.7B pretraining: ~11T tokens in four data stages (REFERENCE.md §3, paper §4 and Fig. 2).
#   data:   python prepare.py --check configs/smol1.7b.py     # which sources (`sources` below) are missing, and how to fetch each
#           python prepare.py --config configs/smol1.7b.py --tokenizer $SMOLLM2_TOKENIZER   # all of them into data_cache/smol
#           ($SMOLLM2_TOKENIZER: a tokenizer.json, HF directory or .gguf; --task=I/N splits it over a job array)
#   launch: torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \
#               --rdzv_endpoint=$HEAD_NODE:29500 train.py configs/smol1.7b.py
#   resume after a preemption: the same command with --init_from=resume
out_dir = "out/smol1.7b"
data_dir = "data_cache/smol"
model = "smol1.7b"                 # 24 layers, 2048 wide, 32 heads (no GQA), 1.71B parameters (tied)

# global batch: 1024 sequences x 2048 tokens = 2,097,152 tokens per step
# 4 seqs x 2048 tokens x 64 GPUs x 4 accumulation steps = 2,097,152
block_size = 2048
micro_batch_size = 4               # plan.py, per rank on H100s under DDP, bf16: 60.4 GiB of tensors (31.9 weights, gradients,
                                   # DDP's buckets and AdamW; 28.5 activations), 67.9 with the margin. At 8 the activations
                                   # double and it needs 94.7 GiB: python plan.py configs/smol1.7b.py --gpus=64
total_batch_tokens = 2_097_152
_T = total_batch_tokens

# 5.24M steps x 2,097,152 tokens = 11.0T tokens
max_steps = 5_240_000
learning_rate = 5e-4
min_lr = 0.0
warmup_steps = 2000
schedule = "wsd"
decay_frac = 0.1                   # the last 524k steps (from 9.9T tokens) decay linearly to 0, i.e. during stage 4
decay_shape = "linear"
weight_decay = 0.01
decay_all_params = True

# Stages start at a token count that is a whole number of steps (6T -> step 2,861,023). Percentages from the paper;
# where it gives only a group's share (stage 3 math, stage 4 web and math), the split inside the group is ours.
stages = [
    # 1) 0-6T: web 90% (FineWeb-Edu 60 : DCLM 40), code 10%
    {"start": 0, "weights": {"fineweb-edu": 0.54, "dclm": 0.36, "starcoderdata": 0.10}},
    # 2) 6-8T: web 75% (60:40), code 20%, math 5% OpenWebMath
    {"start": round(6e12 / _T) * _T, "weights": {"fineweb-edu": 0.45, "dclm": 0.30, "starcoderdata": 0.20,
                                                 "owm": 0.05}},
    # 3) 8-10T: web 74% (40:60), Stack-Edu 16%, math 10% (OWM + InfiMM-WebMath; an even split is ours)
    {"start": round(8e12 / _T) * _T, "weights": {"fineweb-edu": 0.296, "dclm": 0.444, "stack-edu": 0.16,
                                                 "owm": 0.05, "infimm-webmath": 0.05}},
    # 4) 10-11T, the decay: web 58% (mostly DCLM), Stack-Edu 24%, math 14% (FineMath 4+, InfiWebMath-3+, a little OWM
    #    and AugGSM8K), Cosmopedia v2 4%
    {"start": round(10e12 / _T) * _T, "weights": {"fineweb-edu": 0.18, "dclm": 0.40, "stack-edu": 0.24,
                                                  "finemath": 0.08, "infiwebmath": 0.04, "owm": 0.01,
                                                  "auggsm8k": 0.01, "cosmopedia-v2": 0.04}},
]

# where each source comes from (sources.py): the Hub dataset, its files as the Hub lays them out (the glob that
# `hf download --include` takes), the text column and a row filter. python prepare.py --check configs/smol1.7b.py says
# which are missing from data_sources/ and the command that fetches each; --config prepares them all.
sources = {
    "fineweb-edu": dict(hub="HuggingFaceFW/fineweb-edu", files="data/*/*.parquet", text="text",
                        filter="int_score>=3"),        # FineWeb-Edu's own threshold (the published set holds >= 3)
    "dclm": dict(hub="mlfoundations/dclm-baseline-1.0-parquet", files="**/*.parquet", text="text"),
    "starcoderdata": dict(hub="bigcode/starcoderdata", files="*/*.parquet", text="content"),  # (gated: accept its terms)
    "owm": dict(hub="open-web-math/open-web-math", files="data/*.parquet", text="text"),
    "stack-edu": dict(hub="HuggingFaceTB/stack-edu", files="*/*.parquet", text="text",
                      note="Stack-Edu ships Software Heritage blob ids, not code: run the download script on its dataset "
                           "card (it adds a text column) and save the result as parquet under data_sources/stack-edu/"),
    "infimm-webmath": dict(hub="HuggingFaceTB/finemath", files="infiwebmath-3plus/*.parquet", text="text"),
    "finemath": dict(hub="HuggingFaceTB/finemath", files="finemath-4plus/*.parquet", text="text"),
    "infiwebmath": dict(hub="HuggingFaceTB/finemath", files="infiwebmath-4plus/*.parquet", text="text"),
    "auggsm8k": dict(hub="", files="*.jsonl", text="text",
                     note="AugGSM8K has no Hub copy the paper names: put your copy under data_sources/auggsm8k/ as .jsonl "
                          "with a text field"),
    "cosmopedia-v2": dict(hub="HuggingFaceTB/smollm-corpus", files="cosmopedia-v2/*.parquet", text="text"),
}

eval_interval = 2000
eval_batches = 20
checkpoint_interval = 5000         # 1.15e10 FLOP/token x 2.1M tokens = 2.4e16 FLOP/step: ~0.85 s on 64 H100s at 45% MFU, so ~70 min
keep_checkpoints = 3
compile = True
