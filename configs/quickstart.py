# The quickstart: a small SmolLM2-shaped model on the embedded offline corpus (Python's own library source, its
# documentation prose and generated worked math problems), in under 5 minutes on any 2-core CPU, bf16 or not: 200 s of
# training steps, as many as this machine runs in that time, then samples from three prompts (BENCHMARKS.md: "The first
# run on every machine").
#   python train.py configs/quickstart.py          # builds data_cache/quickstart first if it is missing (~15 s)
#   python sample.py --init_from=out/quickstart    # then sample from the result
#   python train.py configs/quickstart.py --data_dir=data_cache/quickstart_smollm2   # the real SmolLM2 tokenizer
out_dir = "out/quickstart"
data_dir = "data_cache/quickstart"  # its own byte-level BPE of 8,192 tokens, trained on the corpus (prepare.py)
data_prepare = "auto"              # builds the embedded corpus into a quickstart directory on first use

# SmolLM2's shape at a toy width: Llama blocks, GQA, SwiGLU, tied embeddings; the vocabulary is the data's tokenizer's.
# Chosen at equal training time, in bits per byte (BENCHMARKS.md): with SmolLM2's 49152 tokens the output head was ~80%
# of a step's FLOPs; the corpus's own 8192-token BPE spells the corpus in as many bytes per token (3.86 on code) and
# runs 2.5x the steps. Within the budget, shallower and shorter rows win: 4 layers, 128-token context.
model = "smol135m"
model_overrides = dict(n_layer=4, n_embd=192, n_head=6, n_kv_head=2, intermediate_size=512, init_std=None)  # std 1/sqrt(192), nanotron's rule

# 16 seqs x 128 tokens x 1 process x 1 accumulation step = 2,048 tokens per step
block_size = 128
micro_batch_size = 16
total_batch_tokens = 2048

time_budget = 200.0                # seconds of training steps: max_steps follows from this machine's measured step time
learning_rate = 2e-3               # at 100 s of fp32 steps: 2e-3 -> val bpb 1.600, 3e-3 -> 1.605, 4e-3 -> 1.627 (BENCHMARKS.md)
min_lr = 0.0
warmup_steps = 10
schedule = "wsd"
decay_frac = 0.3                   # the last 30% of the steps cool down
decay_shape = "1-sqrt"             # Hägele et al.: 1-sqrt beats linear

# two stages in the SmolLM2 spirit: mostly prose and code first, the math upsampled for the second half
stages = [
    {"start": 0, "weights": {"prose": 0.45, "code": 0.45, "math": 0.10}},
    {"start": 0.5, "weights": {"prose": 0.35, "code": 0.35, "math": 0.30}},  # a start in (0, 1): from half the run
]

eval_interval = 200
eval_batches = 2                   # 2 x 16 x 128 = 4k validation tokens per source
eval_tasks = ["quickstart_math"]   # a downstream score beside the loss: 200 held-out problems, pick the right answer of 4
eval_limit = 200
checkpoint_interval = 100000       # only the final checkpoint
log_interval = 50                  # a step line every 50 steps
sample_prompt = "The"
sample_tokens = 32
# what the run learned, at the end: a method of a class, a worked problem, a docstring's prose (temperature 0.7, top_p 0.9)
end_prompts = ["    def __init__(self",
               "Problem: Pencils cost $3 each. Tom buys 4 pencils and pays with $20. How much change does Tom get?\nSolution:",
               "This module provides"]
end_tokens = 64
