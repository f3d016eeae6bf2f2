"""
Checkpoints of other tools in and out: Hugging Face directories (config.json + safetensors, sharded or not,
transformers 4.x and 5.x config forms) and llama.cpp GGUF files in; Hugging Face directories (loadable unmodified by
transformers' AutoModelForCausalLM) and GGUF files (f32 / f16 / bf16 / q8_0, the tokenizer and chat template inside)
out.

    model, tok = load_pretrained("path/to/SmolLM2-360M")   # or a .gguf file, or a hub id (with a network)
    save_pretrained(model, "export/", tok); save_gguf(model, "model.q8_0.gguf", tok, dtype="q8_0")

Everything is first brought to Hugging Face tensor names (GGUF names are renamed and llama.cpp's q/k row permutation
is undone), then one table maps those to model.py's names and back, fusing q/k/v into wqkv and gate/up into w13.
checkpoint.open_model opens any of these, and train.py's own checkpoints, by path.
"""
import glob
import json
import os
import re

import numpy as np
import torch

from model import GPT, GPTConfig
from tokenizer import Tokenizer, read_gguf_header

# -----------------------------------------------------------------------------
# config.json <-> GPTConfig


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def hf_config_to_gpt(hf: dict) -> dict:
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; nanosmol loads Llama-architecture "
                         f"checkpoints (SmolLM2 is one)")
    # transformers 4.x: top-level rope_theta (+ optional rope_scaling); 5.x: rope_parameters = {rope_theta, rope_type}
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = (hf.get("rope_scaling") or rope).get("rope_type", (hf.get("rope_scaling") or {}).get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} is not supported (SmolLM2 uses plain RoPE): only 'default'")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise ValueError(f"config.json has {key}={hf[key]!r}; nanosmol's Llama block needs {key}={ok!r}")
    n_head = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // n_head) != hf["hidden_size"] // n_head:
        raise ValueError(f"head_dim={hf['head_dim']} != hidden_size/num_attention_heads: not supported")
    return dict(block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"], rope_theta=float(theta),
                norm_eps=hf.get("rms_norm_eps", 1e-5), init_std=hf.get("initializer_range", 0.02),
                tie_embeddings=hf.get("tie_word_embeddings", False),
                bos_token_id=_first(hf.get("bos_token_id", 0)) or 0, eos_token_id=_first(hf.get("eos_token_id", 0)) or 0)


def gpt_to_hf_config(cfg, dtype: torch.dtype) -> dict:
    # the transformers 4.x form (top-level rope_theta), which 5.x still reads
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
            "mlp_bias": False, "pretraining_tp": 1, "initializer_range": cfg.init_std,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True}

# -----------------------------------------------------------------------------
# tensor names: Hugging Face <-> model.py


def hf_shapes(cfg) -> dict:
    C, D, I = cfg.n_embd, cfg.head_dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, C), "model.norm.weight": (C,)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                       p + "self_attn.q_proj.weight": (cfg.n_head * D, C), p + "self_attn.k_proj.weight": (cfg.n_kv_head * D, C),
                       p + "self_attn.v_proj.weight": (cfg.n_kv_head * D, C), p + "self_attn.o_proj.weight": (C, cfg.n_head * D),
                       p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C), p + "mlp.down_proj.weight": (C, I)})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, C)
    return shapes


# model.py's name -> the Hugging Face tensors it holds, concatenated along dim 0 (per layer, then the rest)
LAYER_NAMES = {"attention_norm.weight": ["input_layernorm.weight"],
               "ffn_norm.weight": ["post_attention_layernorm.weight"],
               "attention.wqkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
               "attention.wo.weight": ["self_attn.o_proj.weight"],
               "feed_forward.w13.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
               "feed_forward.w2.weight": ["mlp.down_proj.weight"]}
MODEL_NAMES = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"],
               "output.weight": ["lm_head.weight"]}


def name_map(cfg) -> dict:
    # every tensor of this config: {model.py name: [Hugging Face names]}; a tied head is the embedding, not a tensor
    out = {k: v for k, v in MODEL_NAMES.items() if not (k == "output.weight" and cfg.tie_embeddings)}
    for i in range(cfg.n_layer):
        out.update({f"layers.{i}.{k}": [f"model.layers.{i}.{n}" for n in v] for k, v in LAYER_NAMES.items()})
    return out


def hf_to_nanosmol(hf_sd: dict, cfg, source: str) -> dict:
    # checks every tensor against the config, then renames and fuses. Errors name the tensor and the file.
    shapes = hf_shapes(cfg)
    missing = [k for k in shapes if k not in hf_sd]
    if missing:
        raise KeyError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                       f"({len(missing)} in all) for the config {cfg.n_layer} layers x {cfg.n_embd}")
    ignorable = re.compile(r".*rotary_emb\.inv_freq$|^lm_head\.weight$")  # old buffers; a tied copy of the head
    unexpected = [k for k in hf_sd if k not in shapes and not ignorable.match(k)]
    if unexpected:
        raise KeyError(f"{source}: unexpected tensor(s) {unexpected[:5]}: not a plain Llama checkpoint of this config")
    for k, shape in shapes.items():
        if tuple(hf_sd[k].shape) != shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(hf_sd[k].shape)}, expected {shape} from the config")
    sd = {ours: torch.cat([hf_sd[n] for n in theirs]) if len(theirs) > 1 else hf_sd[theirs[0]]
          for ours, theirs in name_map(cfg).items()}
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def nanosmol_to_hf(sd: dict, cfg) -> dict:
    # model.py's state dict -> Hugging Face tensors (contiguous CPU copies), fused ones split back by the HF shapes
    shapes, out = hf_shapes(cfg), {}
    for ours, theirs in name_map(cfg).items():
        out.update(zip(theirs, sd[ours].split([shapes[n][0] for n in theirs])))
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}

# -----------------------------------------------------------------------------
# readers


def read_hf_dir(path: str):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json: expected a Hugging Face model directory")
    with open(cfg_path) as f:
        config = hf_config_to_gpt(json.load(f))
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):  # sharded: the index maps each tensor to its shard
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        hf_sd = {}
        for fn in files:
            hf_sd.update(load_file(fn))
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        hf_sd = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has config.json but no model.safetensors, sharded index or pytorch_model.bin")
    return config, hf_sd


# llama.cpp's tensor names (without "blk.N." and ".weight") -> Hugging Face's (without "model.layers.N." and ".weight")
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # the inverse of _unpermute: rotate-half rows (head, 2, D/2) -> llama.cpp's interleaved pairs (head, D/2, 2)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two rotary halves of each head's rows (its RoPE pairs adjacent dims):
    # rows (head, 2, D/2) were stored as (head, D/2, 2). Swap back to the rotate-half layout.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_tensors(path: str):
    # a GGUF file -> (metadata, [(name, shape as stored, ggml type, data)]), data a view of the memory-mapped file in
    # the layout gguf.quants.dequantize takes: floats for F32/F16, the raw blocks (uint8, rows x bytes) otherwise.
    # gguf.GGUFReader reads the same, ~3 s slower (it builds a view per element of SmolLM2's 100k token strings).
    import gguf
    fields, infos = read_gguf_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = []
    for name, shape, ggml_type, offset in infos:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows, row_bytes = int(np.prod(shape[1:])), shape[0] // block * type_size
        data = raw[offset:offset + rows * row_bytes].reshape(*reversed(shape[1:]), row_bytes)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = data.view(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
        tensors.append((name, shape, qtype, data))
    return fields, tensors


def read_gguf(path: str):
    from gguf.quants import dequantize
    fields, tensors = read_gguf_tensors(path)
    meta = {k: v for k, v in fields.items() if not k.startswith("tokenizer.ggml.")}
    names = {name for name, *_ in tensors}
    n_head, n_kv = meta["llama.attention.head_count"], meta.get("llama.attention.head_count_kv", meta["llama.attention.head_count"])
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    vocab = meta.get("llama.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    eps = float(f"{meta.get('llama.attention.layer_norm_rms_epsilon', 1e-5):.7g}")  # stored as float32: 1e-5 back
    config = dict(block_size=meta.get("llama.context_length", 2048), vocab_size=vocab, n_layer=meta["llama.block_count"],
                  n_head=n_head, n_kv_head=n_kv, n_embd=meta["llama.embedding_length"],
                  intermediate_size=meta["llama.feed_forward_length"],
                  rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)), norm_eps=eps,
                  tie_embeddings="output.weight" not in names,
                  bos_token_id=bos if bos is not None else 0, eos_token_id=eos if eos is not None else 0)
    hf_sd = {}
    for name, _shape, qtype, data in tensors:
        m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.weight", name)
        if m is None or m.group(2) not in GGUF_NAMES:
            raise KeyError(f"{path}: unexpected tensor {name!r}: not a plain Llama GGUF")
        w = dequantize(data, qtype).astype(np.float32)  # numpy shape = GGUF shape reversed = (out, in)
        if m.group(2) == "attn_q":
            w = _unpermute(w, n_head)
        elif m.group(2) == "attn_k":
            w = _unpermute(w, n_kv)
        layer = f"model.layers.{m.group(1)}." if m.group(1) is not None else ""
        hf_sd[f"{layer}{GGUF_NAMES[m.group(2)]}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
    return config, hf_sd


def _gguf_tokenizer_fields(writer, tokenizer):
    # the tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary: the inverse of tokenizer._gguf_tokenizer
    spec = tokenizer.spec()
    if spec["model"].get("type") != "BPE":
        raise ValueError(f"save_gguf: only byte-level BPE tokenizers can be written, this one is {spec['model'].get('type')}")
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits")) for p in parts]
    if kinds == [("Digits", True), ("ByteLevel", None)]:
        pre_name = "smollm"  # llama.cpp's name for SmolLM2's split: each digit alone, then the GPT-2 regex
    elif kinds == [("ByteLevel", None)]:
        pre_name = "gpt-2"
    else:
        raise ValueError(f"save_gguf: llama.cpp has no name for this pre-tokenizer ({kinds}); supported: SmolLM2's "
                         f"(Digits + ByteLevel) and GPT-2's (ByteLevel)")
    n = tokenizer.vocab_size
    tokens = [tokenizer.id_to_token(i) for i in range(n)]
    if None in tokens:
        raise ValueError(f"save_gguf: token id {tokens.index(None)} has no token (ids must be 0..{n - 1} without gaps)")
    added = tokenizer.added_tokens()
    # llama.cpp token types: 1 normal, 3 control (special), 4 user defined (an added, non-special token)
    types = [(3 if added[i] else 4) if i in added else 1 for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if i is not None:
            getattr(writer, f"add_{name}_token_id")(i)
    writer.add_add_bos_token(False)  # SmolLM2's tokenizer adds no BOS; the chat template writes its own markers
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(sd: dict, cfg, path: str, tokenizer, dtype: str = "f32", name: str = "nanosmol"):
    # model.py's state dict -> a llama.cpp GGUF (llama architecture, the tokenizer inside), written atomically.
    # dtype: f32 | f16 | bf16 | q8_0 for the matrices; norms (1-D) stay f32 as llama.cpp's converter keeps them.
    import gguf
    from gguf.quants import quantize
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"save_gguf: dtype={dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    if tokenizer is None:
        raise ValueError("save_gguf: a GGUF carries its tokenizer; pass tokenizer= (the model has none attached)")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"save_gguf: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab is {cfg.vocab_size}")
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    to_gguf = {hf: g for g, hf in GGUF_NAMES.items()}
    tmp = path + ".tmp"
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    _gguf_tokenizer_fields(writer, tokenizer)
    for hf_name, t in nanosmol_to_hf(sd, cfg).items():
        m = re.fullmatch(r"(?:model\.layers\.(\d+)\.)?(.+)\.weight", hf_name)
        if m is None or m.group(2) not in to_gguf:
            raise KeyError(f"save_gguf: no GGUF name for tensor {hf_name}")
        kind = to_gguf[m.group(2)]
        w = t.float().numpy()
        if kind == "attn_q":
            w = _permute(w, cfg.n_head)
        elif kind == "attn_k":
            w = _permute(w, cfg.n_kv_head)
        gname = (f"blk.{m.group(1)}." if m.group(1) is not None else "") + f"{kind}.weight"
        if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gname, w.astype(np.float16))
        else:  # bf16 (uint16 words) and q8_0 (uint8 blocks, whose logical shape the writer derives from the bytes)
            writer.add_tensor(gname, quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)  # never a half-written file under the real name
    return path

# -----------------------------------------------------------------------------


def is_hub_id(path: str) -> bool:
    # "owner/name", the form a Hugging Face hub id takes
    return re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None


def resolve(path: str) -> str:
    # a local file or directory, or a hub id where huggingface_hub and a network exist
    if os.path.exists(path):
        return path
    if is_hub_id(path):
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        except Exception as e:  # no package, no network, no such repo
            raise FileNotFoundError(f"{path!r} is not a local path, and downloading it as a hub id failed ({e}). "
                                    f"Pass a local Hugging Face directory or a .gguf file.") from e
    raise FileNotFoundError(f"{path!r} does not exist: pass a Hugging Face model directory, a .gguf file or a hub id")


def read_pretrained(path: str):
    # a Hugging Face directory, a .gguf file or a hub id -> (GPTConfig fields, Hugging Face state dict, tokenizer or
    # None, the local path read)
    path = resolve(path)
    if path.endswith(".gguf"):
        config, hf_sd = read_gguf(path)
    elif os.path.isdir(path):
        config, hf_sd = read_hf_dir(path)
    else:
        raise ValueError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    has_tok = path.endswith(".gguf") or os.path.exists(os.path.join(path, "tokenizer.json"))
    return config, hf_sd, Tokenizer.from_file(path) if has_tok else None, path


def write_pretrained(sd: dict, cfg, out_dir: str, tokenizer=None):
    # a Hugging Face directory: config.json, generation_config.json, model.safetensors (atomically), the tokenizer
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(gpt_to_hf_config(cfg, sd["tok_embeddings.weight"].dtype), f, indent=2)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if tokenizer is not None and getattr(tokenizer, "pad_id", None) is not None:
        gen["pad_token_id"] = tokenizer.pad_id
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(nanosmol_to_hf(sd, cfg), tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))  # never a half-written file under the real name
    if tokenizer is not None:
        tokenizer.save(out_dir)


# -----------------------------------------------------------------------------
# models in and out


def load_pretrained(path: str, dtype=torch.float32, device="cpu", **overrides):
    # a Hugging Face directory, a .gguf file or a hub id -> (GPT in eval mode, its tokenizer or None); overrides are
    # GPTConfig fields (train.py's runtime switches)
    config, hf_sd, tokenizer, path = read_pretrained(path)
    cfg = GPTConfig(**{**config, **overrides})
    sd = {k: v.to(dtype) for k, v in hf_to_nanosmol(hf_sd, cfg, path).items()}
    return GPT.from_state_dict(cfg, sd, device).eval(), tokenizer


def save_pretrained(model, out_dir: str, tokenizer=None):
    # a directory transformers' AutoModelForCausalLM loads unmodified (plus the tokenizer, when there is one)
    write_pretrained(model.state_dict(), model.config, out_dir, tokenizer)


def save_gguf(model, path: str, tokenizer, dtype: str = "f32"):
    # a llama.cpp / Ollama file: dtype f32 | f16 | bf16 | q8_0, the tokenizer and chat template inside
    return write_gguf(model.state_dict(), model.config, path, tokenizer, dtype)
