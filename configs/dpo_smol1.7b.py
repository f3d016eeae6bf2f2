# DPO of the SFT model on UltraFeedback (binarized, train_prefs), the SmolLM2-1.7B-Instruct recipe
# (alignment-handbook recipes/smollm2/dpo; REFERENCE.md §4): beta 0.5, LR 1e-6, 128 pairs per step, sequences up to
# 1024 tokens, cosine with 10% warmup, 3 epochs; the reference is the SFT model (its log-probabilities precomputed).
# Data (on a machine with a network), then prepare and launch (after configs/sft_smol1.7b.py):
#   python prepare.py --check configs/dpo_smol1.7b.py      # is its data (`sources` below) in data_sources/? how to fetch it
#   python prepare.py --config configs/dpo_smol1.7b.py --tokenizer data_cache/smoltalk
#   torchrun --standalone --nproc_per_node=8 train.py configs/dpo_smol1.7b.py
objective = "dpo"
init_from = "out/sft_smol1.7b"     # the newest checkpoint of the SFT run
out_dir = "out/dpo_smol1.7b"
data_dir = "data_cache/ultrafeedback"
sources = {"ultrafeedback": dict(hub="HuggingFaceH4/ultrafeedback_binarized", files="data/train_prefs-*.parquet",
                                 max_len=1024)}  # (sources.py)
dpo_beta = 0.5
dpo_reference = "precompute"
micro_batch_size = 2               # pairs per GPU per micro step
batch_pairs = 128
epochs = 3
learning_rate = 1e-6
min_lr = 0.0
schedule = "cosine"
warmup_frac = 0.1
weight_decay = 0.0
beta2 = 0.999
grad_clip = 1.0
eval_interval = 100
eval_batches = 50
checkpoint_interval = 500
sample_prompt = ""
fsdp = True
