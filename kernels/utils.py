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
    # wrap_triton makes the launch traceable by torch.compile; eagerly (and under the interpreter) it is a plain launch
    wrap_triton(kernel)[grid](*args, **kwargs)


def interpreting() -> bool:
    # Triton's own parsing of the flag (triton.knobs env_bool): the interpreter is chosen when @triton.jit runs
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def check_device(name, *tensors):
    # The interpreter runs kernels on CPU tensors; compiled kernels need CUDA tensors. Say which switch fixes it.
    for t in tensors:
        if t.device.type == "cpu" and not interpreting():
            raise RuntimeError(f"kernels.{name}: got a CPU tensor, but Triton kernels need CUDA tensors. Use the PyTorch "
                               f"path (triton_*=False in model.py), or set TRITON_INTERPRET=1 before importing kernels "
                               f"to run them slowly on CPU (tests only).")
        if t.device != tensors[0].device:
            raise ValueError(f"kernels.{name}: all inputs must be on one device, got {t.device} and {tensors[0].device}")


def dot_precision(dtype):
    # fp32 inputs: exact fp32 products ("ieee") so fp32 runs match the PyTorch reference tightly instead of using TF32
    return "ieee" if dtype == torch.float32 else "tf32"
