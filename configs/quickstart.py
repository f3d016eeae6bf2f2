# The quickstart: a small SmolLM2-shaped model on the embedded offline corpus (Python's own library source, its
# documentation prose and generated worked math problems), in ~4-5 minutes on 2 CPU cores with native bf16: validation 5.20 -> 1.38
# bits per byte (loss 11.3 -> 3.7), then samples from three prompts (BENCHMARKS.md: "The first run").
#   python train.py configs/quickstart.py          # builds data_cache/quickstart first if it is missing (~10 s)
#   python sample.py --init_from=out/quickstart    # then sample from the result
out_dir = "out/quickstart"
data_dir = "data_cache/quickstart"
data_prepare = "quickstart"        # prepare.py's embedded corpus (corpus.py), built on first use

# SmolLM2's shape at a toy width: Llama blocks, GQA, SwiGLU, tied embeddings, the real 49152-token tokenizer.
# At this width the 49152 x 192 output head is ~85% of the FLOPs, so layers are cheap: 6 of them.
model = "smol135m"
model_overrides = dict(n_layer=6, n_embd=192, n_head=6, n_kv_head=2, intermediate_size=512, init_std=None)  # std 1/sqrt(192), nanotron's rule

# 8 seqs x 256 tokens x 1 process x 1 accumulation step = 2,048 tokens per step
block_size = 256
micro_batch_size = 8
total_batch_tokens = 2048

# 500 steps x 2,048 tokens = 1.0M tokens (~37% of the corpus's 2.8M training tokens); a step is ~0.5 s on 2 cores in
# bf16 autocast with the fused head and cpu_kernels' C softmax (dtype "auto" on a CPU with AVX512-BF16/AMX; fp32
# elsewhere, ~4x slower: 2.1 s on an AVX2 EPYC, 21 minutes in all)
max_steps = 500
learning_rate = 2e-3               # 60-step sweeps: 5e-3 -> val 6.30, 2.5e-3 -> 6.17, 1.5e-3 -> 6.16 (BENCHMARKS.md)
min_lr = 0.0
warmup_steps = 10
schedule = "wsd"
decay_frac = 0.3                   # the last 150 steps cool down
decay_shape = "1-sqrt"             # Hägele et al.: 1-sqrt beats linear

# two stages in the SmolLM2 spirit: mostly prose and code first, the math upsampled for the second half
stages = [
    {"start": 0, "weights": {"prose": 0.45, "code": 0.45, "math": 0.10}},
    {"start": 250 * 2048, "weights": {"prose": 0.35, "code": 0.35, "math": 0.30}},
]

eval_interval = 100
eval_batches = 2                   # 2 x 8 x 256 = 4k validation tokens per source
eval_tasks = ["quickstart_math"]   # a downstream score beside the loss: 200 held-out problems, pick the right answer of 4
eval_limit = 200
checkpoint_interval = 1000         # only the final checkpoint
log_interval = 25                  # a step line every 25 steps
sample_prompt = "The"
sample_tokens = 32
# what the run learned, at the end: a method of a class, a worked problem, a docstring's prose (temperature 0.7, top_p 0.9)
end_prompts = ["    def __init__(self",
               "Problem: Pencils cost $3 each. Tom buys 4 pencils and pays with $20. How much change does Tom get?\nSolution:",
               "This module provides"]
end_tokens = 64
