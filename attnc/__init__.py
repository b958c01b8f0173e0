"""attnc: a compiler for attention kernels on WebGPU (Python DSL -> IR -> WGSL -> wgpu-py)."""

from attnc._version import __version__
from attnc.errors import (
    AttncError,
    DeviceError,
    LoweringError,
    ParseError,
    TraceError,
    VerifyError,
)
from attnc.frontend.dsl import (
    and_masks,
    bool_,
    ceil,
    cos,
    dim,
    dot,
    exp,
    exp2,
    f16,
    f32,
    floor,
    grid,
    i32,
    inf,
    input,
    kernel,
    let,
    log,
    log2,
    maximum,
    minimum,
    online_softmax,
    or_masks,
    rsqrt,
    scalar,
    sigmoid,
    sin,
    splits,
    sqrt,
    tan,
    tanh,
    tiles,
    tunable,
    u8,
    u32,
    where,
)
from attnc.runtime.api import attention, prepare
from attnc.runtime.custom import Op, build
from attnc.runtime.devices import Device, default_device, devices, get_device
from attnc.runtime.kvcache import KVCache
from attnc.runtime.paged import paged_attention
from attnc.runtime.prepared import Prepared
from attnc.runtime.tensor import Tensor, as_tensor, tensor, zeros

__all__ = [
    "__version__",
    "AttncError", "Device", "DeviceError", "KVCache", "LoweringError", "Op", "ParseError", "Prepared", "Tensor",
    "TraceError", "VerifyError", "and_masks", "as_tensor", "attention", "bool_", "build", "ceil", "cos",
    "default_device", "devices", "dim", "dot", "exp", "exp2", "f16", "f32", "floor", "get_device", "grid", "i32",
    "inf", "input", "kernel", "let", "log", "log2", "maximum", "minimum", "online_softmax", "or_masks",
    "paged_attention", "prepare", "rsqrt", "scalar", "sigmoid", "sin", "splits", "sqrt", "tan", "tanh", "tensor",
    "tiles", "tunable", "u8", "u32", "where", "zeros",
]
