# SFT of SmolLM2-1.7B on SmolTalk (1.1M conversations), the SmolLM2-1.7B-Instruct recipe (alignment-handbook
# recipes/smollm2/sft; REFERENCE.md §4): 2 epochs, LR 3e-4, cosine with 10% warmup, the loss on assistant tokens.
# The handbook pads 128 conversations of up to 8192 tokens per step; here they are packed, 2 x 8 x 8192 tokens per step.
# Data and weights (on a machine with a network), then prepare and launch:
#   hf download HuggingFaceTB/SmolLM2-1.7B --local-dir /models/SmolLM2-1.7B
#   python prepare.py --check configs/sft_smol1.7b.py      # is its data (`sources` below) in data_sources/? how to fetch it
#   python prepare.py --config configs/sft_smol1.7b.py --tokenizer /models/SmolLM2-1.7B
#   torchrun --standalone --nproc_per_node=8 train.py configs/sft_smol1.7b.py
objective = "sft"
init_from = "/models/SmolLM2-1.7B"
out_dir = "out/sft_smol1.7b"
data_dir = "data_cache/smoltalk"
sources = {"smoltalk": dict(hub="HuggingFaceTB/smoltalk", files="data/all/*.parquet", max_len=8192)}  # (sources.py)
block_size = 8192
micro_batch_size = 1
total_batch_tokens = 131072
epochs = 2
learning_rate = 3e-4
min_lr = 0.0
schedule = "cosine"
warmup_frac = 0.1
weight_decay = 0.0
beta2 = 0.999
grad_clip = 1.0
activation_checkpointing = True   # 8k-token rows of a 1.7B model
fsdp = True
eval_interval = 500
eval_batches = 50
checkpoint_interval = 1000
sample_prompt = ""
