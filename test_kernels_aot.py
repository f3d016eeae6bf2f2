# The kernels' real GPU tiles, compiled ahead of time for H100 (sm_90) and A100 (sm_80) on this CPU machine by
# kernels/aot.py: every configuration the launchers pick for SmolLM2's shapes (head_dim 64) and head_dim 128, in bf16
# and fp32, compiles to a cubin whose shared memory fits the target and whose registers do not spill. The
# interpreter tests (test_kernels.py) prove the numerics on small tiles; this proves the big ones build and fit.
# aot.py runs in a subprocess without TRITON_INTERPRET (conftest.py sets it for this process, and @triton.jit reads it
# when the kernels are defined). To keep CI short, only the causal attention the model trains with is compiled here,
# and not fp16, whose tiles are bf16's (the same tables, 16-bit MMAs of the same shape); `python kernels/aot.py` (both
# variants, every dtype) makes the full table in BENCHMARKS.md.
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the long end-to-end tests: -m 'not slow' skips them

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.abspath(__file__))
KERNELS = {"attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq", "rms_norm_forward", "rms_norm_backward",
           "rope"}


def _run(args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    r = _run(["kernels/aot.py", "--causal=true", "--dtypes=bf16,fp32", f"--json={out}"], timeout=1200)
    assert out.exists(), f"kernels.aot wrote no results (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(out.read_text()), r


def test_every_kernel_compiles_for_h100_and_a100_in_bf16_and_fp32(aot):
    results, _ = aot
    covered = {(r["target"], r["kernel"], r["dtype"]) for r in results}
    want = {(t, k, d) for t in ("sm_90", "sm_80") for k in KERNELS for d in ("bf16", "fp32")}
    assert want <= covered, f"not compiled: {sorted(want - covered)}"
    # the presets' head_dim 64 and 128 both reached the attention kernels, and every preset reached rope and rmsnorm
    configs = {r["config"] for r in results if r["kernel"] == "attn_fwd"}
    assert any("HEAD_DIM=64 " in c for c in configs) and any("HEAD_DIM=128 " in c for c in configs)
    # the packed-documents variant of each attention kernel (SFT, doc_masking), beside the plain causal one
    docs = {(r["target"], r["kernel"], r["dtype"], "DOC=True" in r["config"]) for r in results}
    assert {(t, k, d, doc) for t in ("sm_90", "sm_80") for k in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
            for d in ("bf16", "fp32") for doc in (False, True)} <= docs
    used = {name for r in results for name in r["used_by"].split(",")}
    assert used == {"smol135m", "smol360m", "smol1.7b", "d128"}


def test_shared_memory_registers_and_spills_within_limits(aot):
    results, r = aot
    failed = [x for x in results if x["errors"]]
    assert not failed, "\n".join(f"{x['target']} {x['kernel']} {x['dtype']} {x['config']}: {x['errors']}"
                                 for x in failed)
    assert r.returncode == 0, r.stdout[-2000:]
    for x in results:  # the report was parsed, not defaulted: every kernel uses registers and most use shared memory
        assert 0 < x["registers"] <= 255
    assert all(x["shared"] > 0 for x in results if x["kernel"].startswith("attn_") and "preprocess" not in x["kernel"])
    # no atomics anywhere: every gradient is accumulated in a fixed order inside one program, so the backward is
    # bitwise deterministic on the GPU (test_kernels.py's determinism test can only show it on a GPU)
    assert not [x for x in results if x["atomics"]], [(x["kernel"], x["atomics"]) for x in results if x["atomics"]]
    assert "| kernel | dtype | config | sm_90: " in r.stdout and "0 failed the checks" in r.stdout  # the pasted table


def test_a_spilling_config_is_reported():
    # the checker can fail: the dK/dV tile of before the AOT pass (128 keys, 4 warps) spills ~500 B on sm_90
    code = ("import json; from model import triton_kernels; attention = triton_kernels().attention\n"
            "import nanosmol_kernels.aot as aot\n"
            "attention.DKDV_CONFIGS[(2, 64)] = (32, 128, 4, 3)\n"
            "aot.SHAPES = [('smol135m', 9, 3, 64)]\n"
            "job = next(j for j in aot.plan([90], ['bf16'], (True,)) if j.kernel == '_attn_bwd_dkdv_kernel')\n"
            "print(json.dumps(aot.compile_job(job).errors))")
    r = _run(["-c", code], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    errors = json.loads(r.stdout.strip().splitlines()[-1])
    assert any("spills registers" in e for e in errors), errors


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "kernels/aot.py", "--targets=90"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "TRITON_INTERPRET" in r.stderr and "Traceback" not in r.stderr
