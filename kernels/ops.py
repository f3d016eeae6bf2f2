# nanosmol's Triton kernels, one file per op, each registered with torch.library (namespace "nanosmol::") so that
# torch.compile(model, fullgraph=True) traces through them, each differentiable. kernels = model.triton_kernels() (this
# module):
#   kernels.rms_norm(x, weight, eps)            x (..., C), weight (C,)             rmsnorm.py
#   kernels.apply_rope(x, cos, sin)             x (B, T, H, D), cos/sin (T, D/2)     rope.py
#   kernels.flash_attention(q, k, v, causal)    q (B, T, H, D), k/v (B, T, Hkv, D)   attention.py  (FlashAttention-2, GQA)
# model.py calls them on CUDA by default and keeps its PyTorch code as the reference (triton_*=False).
# Without a GPU, TRITON_INTERPRET=1 (set before this import; conftest.py does it) runs them on CPU tensors, slowly.
# Importing this module never fails: without Triton (macOS, Windows) the ops raise an error that says what to do.
# The ops are named apart from their files, so kernels.attention, kernels.rope and kernels.rmsnorm are the submodules
# (e.g. kernels.attention.FWD_CONFIGS, the tile table a benchmark edits).
# kernels/ has no __init__.py on purpose: model.triton_kernels() imports it as the package "nanosmol_kernels", so that
# `import kernels` finds Hugging Face's package where it is installed (transformers >= 5.25 imports it), even in a
# Python started in this directory. Inside the folder every import is relative.
try:
    import triton  # noqa: F401
    _import_error = None
except Exception as e:  # pragma: no cover - exercised only on machines without triton
    _import_error = e

if _import_error is None:
    from . import attention, rmsnorm, rope, utils  # noqa: F401 (the submodules, as attributes of this module)
    from .attention import flash_attention
    from .rmsnorm import rms_norm
    from .rope import apply_rope
    from .utils import INTERPRET as _interpret_at_import
    from .utils import launches
else:  # pragma: no cover
    launches = {}
    _interpret_at_import = False

    def _missing(name):
        def op(*args, **kwargs):
            raise RuntimeError(f"kernels.{name} needs Triton, which failed to import ({_import_error!r}). Install it "
                               f"(pip install triton, Linux) or use the PyTorch path (triton_*=False in model.py).")
        op.__name__ = name
        return op

    rms_norm, apply_rope, flash_attention = _missing("rms_norm"), _missing("apply_rope"), _missing("flash_attention")


def available() -> bool:
    """True when the kernels can run here: Triton imports and there is a CUDA GPU, or the interpreter was on at import."""
    if _import_error is not None:
        return False
    import torch
    return torch.cuda.is_available() or _interpret_at_import


__all__ = ["rms_norm", "apply_rope", "flash_attention", "available", "launches"]
