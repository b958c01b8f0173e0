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
    dim,
    dot,
    exp,
    f16,
    f32,
    grid,
    i32,
    inf,
    input,
    kernel,
    let,
    log,
    maximum,
    minimum,
    online_softmax,
    rsqrt,
    scalar,
    splits,
    sqrt,
    tanh,
    tiles,
    tunable,
    where,
)
from attnc.runtime.api import attention, prepare
from attnc.runtime.devices import Device, default_device, devices, get_device
from attnc.runtime.kvcache import KVCache
from attnc.runtime.prepared import Prepared
from attnc.runtime.tensor import Tensor, as_tensor, tensor, zeros

__all__ = [
    "__version__",
    "AttncError", "Device", "DeviceError", "KVCache", "LoweringError", "ParseError", "Prepared", "Tensor",
    "TraceError", "VerifyError", "as_tensor", "attention", "default_device", "devices", "dim", "dot", "exp",
    "f16", "f32", "get_device", "grid", "i32", "inf", "input", "kernel", "let", "log", "maximum", "minimum",
    "online_softmax", "prepare", "rsqrt", "scalar", "splits", "sqrt", "tanh", "tensor", "tiles", "tunable",
    "where", "zeros",
]
