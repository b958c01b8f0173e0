"""One lock for attnc's calls from several threads of a process.

attnc's calls keep state between calls: the ops `attention()` prepared (whose own buffers a
call with host inputs writes, runs and reads back), pipeline and bind-group caches, the list of
adapters and the devices made from them; and a device of Dawn's must not be used by two
threads at once. So the public entry points (attention, prepare, prepared ops, KV caches,
GPU tensors' reads and writes, device lookup) take this re-entrant lock for their whole call:
calls from several threads run one after another, each with its own right answer, instead of
one thread's inputs overwriting another's in a shared op (wgpu-native) or the process crashing
(Dawn). The GPU runs one queue per device anyway; what is serialized is the host's part.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

LOCK = threading.RLock()

F = TypeVar("F", bound=Callable[..., Any])


def serialized(fn: F) -> F:
    """`fn` run while holding LOCK (re-entrant: attnc's calls into one another nest)."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with LOCK:
            return fn(*args, **kwargs)
    return call  # type: ignore[return-value]
