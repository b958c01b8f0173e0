"""attnc called from several threads at once (a web server, a data loader): every call gets its
own right answer and the process survives. Before the lock of attnc/runtime/locking.py, threads
calling attention() with host arrays of one shape wrote into the same cached op's buffers
(wgpu-native: 15 of 100 results another thread's; Dawn: GPUValidationError), threads on one
Dawn device crashed the process, and the first calls raced to enumerate the adapters (Dawn:
SIGABRT or "no device"; wgpu-native: a Device per thread)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import attnc
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

SPECS = ["wgpu:vulkan", "dawn:vulkan"]


def _in_threads(n: int, work) -> list[str]:
    """Run work(t) in n threads started together; the exceptions they raised, as text."""
    errors: list[str] = []
    start = threading.Barrier(n)

    def run(t: int) -> None:
        start.wait()
        try:
            work(t)
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            errors.append(f"thread {t}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    return errors


@pytest.mark.parametrize("spec", SPECS)
def test_threads_with_host_inputs_of_one_shape_get_their_own_answers(spec, require_adapters) -> None:
    dev = require_adapters(spec)[0]
    q0 = np.ones((1, 2, 8, 16), np.float32)
    attnc.attention(q0, q0, q0, device=dev)  # compiled once, before the threads

    def work(t: int) -> None:
        rng = np.random.default_rng(t)
        for _ in range(12):
            q, k = rng.standard_normal((2, 1, 2, 8, 16), dtype=np.float32)
            v = rng.standard_normal((1, 2, 8, 16), dtype=np.float32) + 10 * t  # each thread's own values
            causal = t % 2 == 1
            assert_close(attnc.attention(q, k, v, device=dev, causal=causal), attention_ref(q, k, v, causal=causal),
                         1e-5, "o")

    assert not _in_threads(4, work)


@pytest.mark.parametrize("spec", SPECS)
def test_threads_with_their_own_ops_gpu_tensors_mods_and_caches(spec, require_adapters) -> None:
    """Different shapes, dtypes, mods over each thread's own captured table, GPU tensors and a
    quantized KV cache per thread, all on one device (Dawn's crashed the process)."""
    dev = require_adapters(spec)[0]

    def work(t: int) -> None:
        rng = np.random.default_rng(10 + t)
        dtype = np.float16 if t % 2 else np.float32
        S, T = 3 + t, 20 + 7 * t
        table = rng.standard_normal(T).astype(np.float32)

        def mod(s, b, h, qi, kj):
            return s + table[kj]

        for _ in range(4):
            q = rng.standard_normal((1, 2, S, 32)).astype(dtype)
            k, v = rng.standard_normal((2, 1, 2, T, 32)).astype(dtype)
            o = attnc.attention(attnc.tensor(q, device=dev), attnc.tensor(k, device=dev), attnc.tensor(v, device=dev),
                                score_mod=mod).numpy()
            assert_close(o, attention_ref(q, k, v, bias=table[None, None, None, :]), 2e-3 if t % 2 else 1e-5, "o")
        cache = attnc.KVCache(1, 2, 64, 32, device=dev, k_format="q8_0", v_format="int8")
        k, v = rng.standard_normal((2, 1, 2, 9, 32)).astype(np.float32)
        cache.append(k, v)
        q = rng.standard_normal((1, 2, 1, 32)).astype(np.float32)
        k_deq, v_deq = (attnc.quant.dequantize(x.numpy())[:, :, :9] for x in (cache.k, cache.v))
        assert_close(cache.attend(q), attention_ref(q, k_deq, v_deq), 1e-5, "o")

    assert not _in_threads(4, work)


def test_the_first_calls_from_several_threads_find_one_device(require_adapters) -> None:
    """A fresh process whose first attnc calls come from four threads at once, two per backend:
    one Device per spec, and every thread's attention right."""
    require_adapters(*SPECS)
    script = textwrap.dedent(f"""
        import threading, numpy as np, attnc
        found, errors, start = [], [], threading.Barrier(4)
        def run(spec):
            start.wait()
            try:
                dev = attnc.get_device(spec)
                q = np.ones((1, 1, 2, 8), np.float32)
                assert np.allclose(attnc.attention(q, q, q, device=dev), 1.0)
                found.append((spec, id(dev)))
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=run, args=(s,)) for s in {SPECS!r} * 2]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(len(set(found)), len(found), errors)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "2 4 []", done.stdout
