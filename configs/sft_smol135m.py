# SFT of SmolLM2-135M on smol-smoltalk, the SmolLM2-135M-Instruct recipe (alignment-handbook recipes/smollm2/sft;
# REFERENCE.md §4): 2 epochs, LR 1e-3, cosine with 10% warmup, the loss on assistant tokens, ChatML with the default
# system prompt. The handbook pads 128 conversations of up to 8192 tokens per step; here they are packed (no
# conversation split, no attention across them), 2 x 65,536 tokens per step, about as many conversations.
# Data and weights (on a machine with a network), then prepare and launch:
#   hf download HuggingFaceTB/SmolLM2-135M --local-dir /models/SmolLM2-135M
#   python prepare.py --check configs/sft_smol135m.py      # is its data (`sources` below) in data_sources/? how to fetch it
#   python prepare.py --config configs/sft_smol135m.py --tokenizer /models/SmolLM2-135M
#   torchrun --standalone --nproc_per_node=8 train.py configs/sft_smol135m.py
#   python sample.py --chat=True --init_from=out/sft_smol135m; python eval.py --init_from=out/sft_smol135m --chat=True ...
objective = "sft"
init_from = "/models/SmolLM2-135M"   # or a local HF directory / .gguf / a train.py out_dir
out_dir = "out/sft_smol135m"
data_dir = "data_cache/smol-smoltalk"
sources = {"smol-smoltalk": dict(hub="HuggingFaceTB/smol-smoltalk", files="data/*.parquet", max_len=8192)}  # (sources.py)
block_size = 8192
micro_batch_size = 1
total_batch_tokens = 131072
epochs = 2
learning_rate = 1e-3
min_lr = 0.0
schedule = "cosine"
warmup_frac = 0.1
weight_decay = 0.0
beta2 = 0.999                     # transformers' AdamW defaults, as the handbook trains
grad_clip = 1.0
eval_interval = 500
eval_batches = 50
checkpoint_interval = 1000
sample_prompt = ""
