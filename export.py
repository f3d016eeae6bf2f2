"""
Export a model for other tools: a llama.cpp / Ollama GGUF file, or a Hugging Face directory (transformers, vLLM).

    python export.py --init_from=out/quickstart --out=quickstart.gguf                  # GGUF, f32
    python export.py --init_from=out/sft_demo --out=sft.q8_0.gguf --dtype=q8_0         # GGUF, 8-bit blocks (~1/4)
    python export.py --init_from=out/quickstart --out=export/quickstart --dtype=bf16   # a Hugging Face directory

The format follows --out: a path ending in .gguf is a GGUF file (dtype f32 | f16 | bf16 | q8_0; norms stay f32),
anything else a Hugging Face directory (dtype f32 | f16 | bf16). --init_from takes what sample.py takes: a train.py
out_dir (its newest checkpoint) or ckpt_*.pt, a Hugging Face directory, a .gguf file, a hub id, "" for SmolLM2-135M-
Instruct. The tokenizer (and its chat template) goes inside. Then, e.g.: llama-cli -m quickstart.gguf -p "def f(".
"""
import os
import sys

# -----------------------------------------------------------------------------
init_from = ""          # see above
out = ""                # a .gguf file, or a directory for a Hugging Face export
dtype = "f32"           # GGUF: f32 | f16 | bf16 | q8_0; Hugging Face: f32 | f16 | bf16
force = False           # overwrite an existing --out
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
configure(globals(), sys.argv[1:], allow_config_file=False)

gguf_out = out.endswith(".gguf")
allowed = ("f32", "f16", "bf16", "q8_0") if gguf_out else ("f32", "f16", "bf16")
if not out:
    sys.exit("error: --out is required: a path ending in .gguf for llama.cpp, or a directory for Hugging Face")
if dtype not in allowed:
    sys.exit(f"error: --dtype={dtype!r} for a {'GGUF file' if gguf_out else 'Hugging Face directory'}: choose one of "
             f"{', '.join(allowed)}" + ("" if gguf_out else " (q8_0 is GGUF-only: end --out with .gguf)"))
if os.path.exists(out) and not force and not (os.path.isdir(out) and not os.listdir(out)):
    sys.exit(f"error: --out={out} exists; pass --force=True to overwrite it")

import torch  # noqa: E402 (after the checks: a mistyped flag answers without loading torch)

import formats  # noqa: E402
from checkpoint import open_model  # noqa: E402

try:
    opened = open_model(init_from)
except (OSError, ValueError) as e:  # a missing model or a checkpoint that is not what it claims
    sys.exit(f"error: {e}")
print(f"loaded {opened.source}", file=sys.stderr)
model, tok = opened.model, opened.tokenizer
try:
    if gguf_out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        formats.save_gguf(model, out, tok, dtype=dtype)
    else:
        model = model.to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype])
        formats.save_pretrained(model, out, tok)
except ValueError as e:  # e.g. a tokenizer llama.cpp has no pre-tokenizer name for
    sys.exit(f"error: {e}")
size = os.path.getsize(out) if gguf_out else sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
print(f"wrote {out} ({'GGUF' if gguf_out else 'Hugging Face'}, {dtype}, {size / 2**20:.1f} MiB)")
