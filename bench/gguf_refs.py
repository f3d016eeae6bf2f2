"""
nanosmol's GGUF export (formats.save_gguf) checked by llama.cpp itself, on the real SmolLM2-135M-Instruct (CPU):

1) the f32 export loads in llama.cpp and its greedy continuations (32 tokens, two prompts) equal nanosmol's;
2) llama.cpp's tokenizer, read from the export, gives nanosmol's ids on a unicode text;
3) the f16, bf16 and q8_0 exports load and continue "The capital of France is" with " Paris";
4) the chat template travels: llama.cpp's chat completion (its jinja rendering of the exported template) answers.

llama-cpp-python is not a nanosmol dependency; it builds from source in ~8 minutes with cmake and the system compiler:
    python -m venv --system-site-packages /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python
    /tmp/llvenv/bin/python bench/gguf_refs.py [--write=bench/gguf_reference.json]

--write stores llama.cpp's token ids and a digest of every export it checked (tensor names, types, shapes and bytes,
and the metadata) for test_export.py, which re-exports in CI, where llama.cpp is not installed, and requires the same
digests and nanosmol's greedy ids equal to llama.cpp's.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile

sys.path[0] = ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import formats  # noqa: E402
from checkpoint import smollm2_gguf_path  # noqa: E402
from engine import Engine, Request  # noqa: E402
from bench import pins  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
UNICODE = "Grüße, 世界! Ça coûte 3,50 € — naïve café 😀 ünïcödé\tand\n\n  spaces 12345 ∑x²"
DTYPES = ["f32", "f16", "bf16", "q8_0"]
GREEDY_TOKENS = 32


def gguf_digest(path: str) -> str:
    # what llama.cpp reads, independent of the writer's byte layout: the metadata key/values (sorted), then every
    # tensor's name, ggml type, shape and bytes
    meta, tensors = formats.read_gguf_tensors(path)
    h = hashlib.sha256()
    for key in sorted(meta):
        h.update(key.encode() + b"=" + json.dumps(meta[key], ensure_ascii=False).encode() + b"\n")
    for name, shape, qtype, data in sorted(tensors, key=lambda t: t[0]):
        h.update(f"{name}|{int(qtype)}|{list(shape)}\n".encode())
        h.update(data.tobytes())
    return h.hexdigest()


def export_all(model, tok, directory) -> dict:
    return {dt: formats.save_gguf(model, os.path.join(directory, f"smollm2-135m-instruct-{dt}.gguf"), tok, dtype=dt)
            for dt in DTYPES}


def nanosmol_greedy(model, tok, ids, n=GREEDY_TOKENS) -> list:
    # n greedy tokens, as llama.cpp's loop below samples them: no stop token ends them early
    with Engine(model, tok) as engine:
        engine.stop_ids = set()
        return engine.generate([Request(ids, max_new_tokens=n)])[0].out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", default=None, help="store llama.cpp's results here (bench/gguf_reference.json)")
    args = ap.parse_args()
    import llama_cpp
    import llama_cpp.llama_cpp as lib
    # llama.cpp's "extra buffer types" (AMX / repacked CPU kernels) die with SIGILL on q8_0 on this project's CPU
    # (AMX advertised, the tile state not granted to the process): load with the plain CPU backend
    default_params = lib.llama_model_default_params

    def plain_cpu_params():
        p = default_params()
        p.use_extra_bufts = False
        return p
    lib.llama_model_default_params = plain_cpu_params
    torch.set_num_threads(2)
    model, tok = formats.load_pretrained(smollm2_gguf_path())
    from importlib.metadata import version
    ref = {"llama_cpp_python": llama_cpp.__version__, "gguf": version("gguf"),
           "greedy_tokens": GREEDY_TOKENS, "prompts": [], "exports": {}}
    with tempfile.TemporaryDirectory() as d:
        paths = export_all(model, tok, d)
        llm = llama_cpp.Llama(paths["f32"], n_ctx=512, n_threads=2, verbose=False, seed=0)
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            llama_ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
            llm.reset()
            llm.eval(llama_ids)
            cont = []
            for _ in range(GREEDY_TOKENS):
                cont.append(llm.sample(temp=0.0, top_k=1))
                llm.eval([cont[-1]])
            ours = nanosmol_greedy(model, tok, ids)
            same = sum(a == b for a, b in zip(cont, ours))
            print(f"{prompt!r}: tokenization equal {llama_ids == ids}; greedy {same}/{GREEDY_TOKENS} equal\n"
                  f"  llama.cpp: {llm.detokenize(cont).decode(errors='replace')!r}\n  nanosmol:  {tok.decode(ours)!r}")
            ref["prompts"].append({"prompt": prompt, "llama_prompt_ids": llama_ids, "llama_greedy": cont})
        uni = llm.tokenize(UNICODE.encode(), add_bos=False, special=False)
        print(f"unicode text: llama.cpp ids == nanosmol ids: {uni == tok.encode(UNICODE)} ({len(uni)} tokens)")
        ref["unicode"] = {"text": UNICODE, "llama_ids": uni}
        chat = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                          temperature=0.0, max_tokens=16)
        reply = chat["choices"][0]["message"]["content"]
        print(f"llama.cpp chat completion with the exported template: {reply!r}")
        ref["chat_reply"] = reply
        del llm
        for dt in DTYPES:
            llm = llama_cpp.Llama(paths[dt], n_ctx=128, n_threads=2, verbose=False, seed=0)
            out = llm("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
            size = os.path.getsize(paths[dt])
            print(f"{dt}: {size / 2**20:.0f} MiB, llama.cpp continues 'The capital of France is' with {out!r}")
            ref["exports"][dt] = {"digest": gguf_digest(paths[dt]), "bytes": size, "paris": out}
            del llm
    if args.write:
        with open(args.write, "w") as f:
            json.dump({**ref, "versions": pins.record()}, f, indent=1, ensure_ascii=False)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
