# The post-training demo, part 2: DPO of the SFT demo's result on generated preference pairs (the right answer vs an
# off-by-one-or-ten one; corpus.chat_demo), a few minutes on 2 CPU cores.
#   python train.py configs/sft_demo.py && python train.py configs/dpo_demo.py
#   python bench/posttrain.py                  # held-out exact match and preference accuracy of each stage
objective = "dpo"
init_from = "out/sft_demo"          # the newest checkpoint of the SFT run: policy and frozen reference
out_dir = "out/dpo_demo"
data_dir = "data_cache/chat_demo/dpo"
data_prepare = "chat_demo"
dpo_beta = 0.5                      # the SmolLM2 recipe's
dpo_reference = "precompute"        # reference log-probabilities computed once, stored in out_dir
micro_batch_size = 8                # pairs per micro step (16 sequences)
batch_pairs = 16
max_steps = 40                      # 640 of the 1,900 training pairs
learning_rate = 1e-5                # the recipe's 1e-6 is for 2 epochs of 60k pairs; this demo has 40 steps
schedule = "cosine"
warmup_steps = 4
weight_decay = 0.0
beta2 = 0.999
eval_interval = 20
eval_batches = 100                  # all 100 held-out pairs
checkpoint_interval = 1000
log_interval = 5
sample_prompt = ""
