# Shared helpers of the kernels: the launch counter that the tests read, and small device queries.
import collections
import functools
import os

import torch
from torch.library import wrap_triton

# Every kernel launch is counted here by name (`launches["attention_fwd"]` ...). The tests assert that the count moved,
# so a silent PyTorch fallback cannot pass them. Under torch.compile the count moves when the graph is traced, not on
# every call of the compiled graph.
launches = collections.Counter()


def launch(name, kernel, grid, *args, **kwargs):
    launches[name] += 1
    if INTERPRET and _tracing(args):
        return
    # wrap_triton makes the launch traceable by torch.compile; eagerly (and under the interpreter) it is a plain launch
    wrap_triton(kernel)[grid](*args, **kwargs)


def _tracing(args):
    # Under the interpreter wrap_triton cannot trace a kernel (it needs real data). Dynamo's shape propagation with
    # fake tensors only needs the op's outputs, which the launchers allocate before launching: skip the launch. AOT
    # tracing (aot_eager, Inductor) would bake the missing launch into the graph: refuse it instead.
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(isinstance(t, FunctionalTensor) for t in tensors):
        raise RuntimeError("kernels: torch.compile with an AOT backend (inductor, aot_eager) cannot trace Triton kernels "
                           "under TRITON_INTERPRET=1; use backend='eager' on CPU, or a GPU")
    return any(isinstance(t, FakeTensor) for t in tensors)


def interpreting() -> bool:
    # Triton's own parsing of the flag (triton.knobs env_bool): the interpreter is chosen when @triton.jit runs
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


# Read once, at import: @triton.jit picked interpreter or compiler when the kernels were defined, and a module constant
# (unlike os.environ) is free for torch.compile's Dynamo to trace in the ops' input checks.
INTERPRET = interpreting()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def check_device(name, *tensors):
    # The interpreter runs kernels on CPU tensors; compiled kernels need CUDA tensors. Say which switch fixes it.
    for t in tensors:
        if t.device.type == "cpu" and not INTERPRET:
            raise RuntimeError(f"kernels.{name}: got a CPU tensor, but Triton kernels need CUDA tensors. Use the PyTorch "
                               f"path (triton_*=False in model.py), or set TRITON_INTERPRET=1 before importing kernels "
                               f"to run them slowly on CPU (tests only).")
        if t.device != tensors[0].device:
            raise ValueError(f"kernels.{name}: all inputs must be on one device, got {t.device} and {tensors[0].device}")


def dot_precision(dtype):
    # fp32 inputs: exact fp32 products ("ieee") so fp32 runs match the PyTorch reference tightly instead of using TF32
    return "ieee" if dtype == torch.float32 else "tf32"
