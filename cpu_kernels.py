"""
C kernels for the CPU, for loops that PyTorch runs as several passes over memory. kernels/ holds the Triton kernels,
for GPUs; this file is their CPU counterpart. Nothing here is needed: without a C compiler, model.py runs its PyTorch
code, only slower.

The C source below is compiled on first use with the machine's C compiler (cc, gcc or clang; $CC first) at -O3
-fno-trapping-math -march=native -fopenmp, and cached under ~/.cache/nanosmol ($NANOSMOL_CACHE).
NANOSMOL_CPU_KERNELS=0 turns it off (PyTorch then), e.g. to compare the two. It is plain C that compilers vectorise
(`omp simd` on the reductions). Its rows are shared out with OpenMP: linked as libgomp.so.1, the library binds to the
libgomp that PyTorch's wheel has already loaded, so it runs in PyTorch's own thread team (torch.set_num_threads
applies) instead of competing with PyTorch's spinning workers for the cores. A compiler without OpenMP gets one
thread.

    softmax_xent_(logits, targets) -> logp_t   the fused output head's per-chunk step (model.fused_cross_entropy):
                                                logits become their gradient, in place

The op is registered with torch.library (nanosmol::softmax_xent_), so torch.compile traces through the fused head.
"""
import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

import torch

# One row at a time: m = max(x); e = exp(x - m) into a scratch row of V floats, s = sum(e); then
# g = e / s - onehot(target) in the logits' dtype, logp_t = x_t - m - log(s). PyTorch needs log_softmax (its bf16
# input converted to fp32 first), exp, and a rounding to bf16: three to four passes over a (rows, vocab) block and two
# exps per element. Here it is one exp per element, and the scratch row (192 KB at vocab 49152) stays in L2.
_SRC = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as PyTorch's .to(torch.bfloat16) */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float f32_load(float f) { return f; }
static inline float f32_store(float f) { return f; }

/* exp(x) for x <= 0: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and p its degree-6 Taylor polynomial (relative
   error < 3e-7, below fp32's softmax rounding). Below -87 (where exp leaves fp32's normal range) it is 0, as is
   exp(-inf). Plain arithmetic that vectorises once the compiler may turn its comparisons into blends: a comparison's
   possible floating-point exception forbids that without masked vectors (AVX-512), hence -fno-trapping-math. Without
   it gcc left the exp loop scalar on an AVX2 CPU: 70 ms instead of 15 for a 512 x 49152 fp32 chunk. */
static inline float exp_nonpos(float x) {
    float y = x < -87.0f ? -87.0f : x;
    float n = (y * 1.44269504f + 12582912.0f) - 12582912.0f;  /* round to nearest: the 1.5 * 2^23 trick */
    float r = y - n * 0.693145751953125f - n * 1.428606765330187e-06f;  /* ln2 split in two: r exact */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667f + r * (0.041666668f + r * (0.008333334f
              + r * 0.0013888889f)))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale; memcpy(&scale, &bits, 4);
    return x < -87.0f ? 0.0f : p * scale;
}

/* The sum of a row's exps goes by blocks: each block's vector lanes add SUM_BLOCK / width terms in fp32, and the
   blocks add in double. One fp32 sum per lane over a whole 49152-wide row (6144 terms per lane with AVX2) was off by
   up to 1.3e-5 relative; by blocks, 1.4e-7, for ~7% more time in this kernel. */
#define SUM_BLOCK 256

/* x (n, V) -> g (n, V): softmax(x) - onehot(t), and logp[i] = log softmax(x)[t]; a row whose target is -100 gets
   g = 0 and logp = 0. g may be x itself (in place: each row is read whole before it is written). Rows are shared out
   over the OpenMP threads; each keeps one row of exp(x - max) in scratch. */
#define SOFTMAX_XENT(NAME, T, LOAD, STORE)                                                                             \
void NAME(const T *x, const int64_t *t, T *g, float *logp, int64_t n, int64_t V) {                                 \
    _Pragma("omp parallel")                                                                                        \
    {                                                                                                              \
    float *e = (float *)malloc(V * sizeof(float));                                                                 \
    _Pragma("omp for schedule(static)")                                                                            \
    for (int64_t i = 0; i < n; i++) {                                                                              \
        const T *xi = x + i * V;                                                                                   \
        T *gi = g + i * V;                                                                                         \
        if (t[i] == -100 || e == NULL) { memset(gi, 0, V * sizeof(T)); logp[i] = e ? 0.0f : NAN; continue; }     \
        float m = -INFINITY, xt = LOAD(xi[t[i]]);                                                                  \
        double s = 0.0;                                                                                            \
        _Pragma("omp simd reduction(max:m)")                                                                       \
        for (int64_t j = 0; j < V; j++) { float v = LOAD(xi[j]); m = v > m ? v : m; }                              \
        for (int64_t j0 = 0; j0 < V; j0 += SUM_BLOCK) {                                                           \
            int64_t j1 = j0 + SUM_BLOCK < V ? j0 + SUM_BLOCK : V;                                                  \
            float sb = 0.0f;                                                                                       \
            _Pragma("omp simd reduction(+:sb)")                                                                    \
            for (int64_t j = j0; j < j1; j++) { float v = exp_nonpos(LOAD(xi[j]) - m); e[j] = v; sb += v; }       \
            s += sb;                                                                                               \
        }                                                                                                          \
        float inv = (float)(1.0 / s);                                                                              \
        _Pragma("omp simd")                                                                                        \
        for (int64_t j = 0; j < V; j++) gi[j] = STORE(e[j] * inv);                                                 \
        gi[t[i]] = STORE(e[t[i]] * inv - 1.0f);                                                                    \
        logp[i] = xt - m - (float)log(s);                                                                          \
    }                                                                                                              \
    free(e);                                                                                                       \
    }                                                                                                              \
}
SOFTMAX_XENT(softmax_xent_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
SOFTMAX_XENT(softmax_xent_f32, float, f32_load, f32_store)
"""

_lib = None  # the loaded library, or the reason it is not there (a str)


def _cache_dir() -> str:
    return os.environ.get("NANOSMOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanosmol")


def _cpu_id() -> str:
    # -march=native code runs only on CPUs like this one: a home directory shared by different machines keeps one
    # library per CPU model and feature set
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({ln for ln in f if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _build():
    if os.environ.get("NANOSMOL_CPU_KERNELS") == "0":
        return "turned off by NANOSMOL_CPU_KERNELS=0"
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        return "no C compiler found (cc, gcc or clang; or set $CC)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"the C compiler {cc!r} does not run ({e})"
    # -march=native where the compiler knows it (gcc, clang on x86; 512-bit vectors where there are: 1.2x faster than
    # the 256 gcc prefers), -mcpu=native (clang on Arm), else generic; OpenMP threads where the compiler has them, else
    # one thread (still vectorised)
    arches = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], ["-mcpu=native"], [])
    flags = list(itertools.product(("-fopenmp", "-fopenmp-simd"), arches))
    base = ["-O3", "-fno-trapping-math"]  # see exp_nonpos
    key = hashlib.sha256("\0".join([_SRC, repr(base), repr(flags), cc, version, _cpu_id()]).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"cpu_kernels-{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(_cache_dir(), exist_ok=True)
            tmpdir = tempfile.TemporaryDirectory(dir=_cache_dir())  # beside the cache: os.replace is then atomic
        except OSError as e:
            return f"cannot write the kernel cache {_cache_dir()} ({e}; set $NANOSMOL_CACHE to a writable directory)"
        with tmpdir as tmp:
            src = os.path.join(tmp, "cpu_kernels.c")
            with open(src, "w") as f:
                f.write(_SRC)
            err = ""
            for omp, arch in flags:
                cmd = [cc, *base, *arch, omp, "-shared", "-fPIC", src, "-o", os.path.join(tmp, "k.so"), "-lm"]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                except (OSError, subprocess.SubprocessError) as e:
                    return f"the C compiler {cc!r} failed ({e})"
                if out.returncode == 0:
                    os.replace(os.path.join(tmp, "k.so"), path)  # concurrent builders: the last rename wins, whole
                    break
                err = (out.stderr.strip().splitlines() or ["?"])[-1]
            else:
                return f"{cc} could not compile cpu_kernels.c: {err}"
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return f"could not load {path}: {e}"
    for name in ("softmax_xent_bf16", "softmax_xent_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
        fn.restype = None
    return lib


def load():
    """The compiled library (built on first call), or a str saying why there is none."""
    global _lib
    if _lib is None:
        _lib = _build()
    return _lib


@torch.compiler.assume_constant_result  # torch.compile asks once, while tracing, and keeps the answer
def available() -> bool:
    return not isinstance(load(), str)


def why_unavailable() -> Optional[str]:
    lib = load()
    return lib if isinstance(lib, str) else None


@torch.library.custom_op("nanosmol::softmax_xent_", mutates_args=("logits",))
def softmax_xent_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (n, V) bf16 or fp32 on the CPU, contiguous; targets (n,) int64 in [0, V) or -100 (no loss). Overwrites
    the logits with softmax(logits) - onehot(targets), the cross-entropy's gradient, rounded once to their dtype (0 in
    ignored rows), and returns logp_t (n,) fp32: the log-softmax at each target (0 in ignored rows). In place, because
    a second (n, V) block would cost as much memory traffic as the arithmetic."""
    lib = load()
    if isinstance(lib, str):
        raise RuntimeError(f"cpu_kernels.softmax_xent_: {lib}")
    if (logits.device.type != "cpu" or logits.dtype not in (torch.bfloat16, torch.float32) or logits.dim() != 2
            or not logits.is_contiguous()):
        raise ValueError(f"softmax_xent_ takes contiguous (n, V) bf16 or fp32 CPU logits, not {tuple(logits.shape)} "
                         f"{logits.dtype} on {logits.device}")
    n, V = logits.shape
    t = targets.to(torch.int64).contiguous()
    if t.shape != (n,):
        raise ValueError(f"softmax_xent_: targets of shape {tuple(t.shape)} for {n} rows of logits")
    if n and not ((t == -100) | ((t >= 0) & (t < V))).all():  # the C code indexes with them
        raise IndexError(f"softmax_xent_: a target is out of range [0, {V}) and is not -100 (ignored)")
    logp = torch.empty(n, dtype=torch.float32)
    fn = lib.softmax_xent_bf16 if logits.dtype == torch.bfloat16 else lib.softmax_xent_f32
    fn(logits.data_ptr(), t.data_ptr(), logits.data_ptr(), logp.data_ptr(), n, V)
    return logp


@softmax_xent_.register_fake
def _(logits, targets):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX), so that bf16 autocast pays: the quickstart's
    2048x192 @ 192x49152 head ran 109 GFLOP/s in fp32 and 355 in bf16 on such a Xeon. Without them oneDNN emulates
    bf16: a quickstart step under bf16 autocast took 59 s on an AVX2 EPYC, against 2.0 s in fp32 (BENCHMARKS.md)."""
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # an older torch without the probes
        return False


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Makes glibc keep freed blocks of up to `limit` bytes in the process instead of returning them to the OS. By
    default it unmaps (or trims) blocks over 128 KB-32 MB when they are freed, so each training step's large tensors
    (the head's logit chunks, the (vocab, C) gradients) come back as fresh pages: ~60-70k page faults and 100-170 ms of
    kernel time per quickstart step on this project's 2-core CPU, a fifth of the step (BENCHMARKS.md). The cost: the
    process keeps its peak memory instead of shrinking after it. A process setting: train.py calls it for CPU runs.
    False where it does not apply (not glibc, e.g. macOS or musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))
