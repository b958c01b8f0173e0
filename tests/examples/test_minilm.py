"""all-MiniLM-L6-v2 with attnc attention vs sentence-transformers on PyTorch's CPU build.

The reference is computed once per module by an independent implementation
(sentence-transformers loading the same local model folder, offline). Every attention
call of examples/minilm/model.py goes through `attnc.attention`, with padding handled
by `kv_lens`, on every device of `attnc.devices()` and every variant family it offers.

Bounds, per sentence of a mixed-length batch:
- float32: cosine >= 0.99999 (measured with a float32 numpy attention: 1 - cos < 1e-12,
  max abs difference 2.5e-7).
- float16 attention inputs: cosine >= 0.9999. Measured: rounding q, k, v and o to
  float16 gives 1 - cos <= 7e-8 (max abs 6e-5); f16 probabilities and f16 P.V products
  give 1.2e-7; random errors as large as the f16 contract allows (2e-3 relative
  Frobenius per attention call, in all 6 layers) give 1 - cos <= 2.6e-6 over 5 seeds.
  1e-4 leaves a 40x margin over that worst case while still failing on a 5% error in
  the softmax scale (1 - cos = 3e-4 to 7e-4) or an off-by-one in kv_lens (1e-3 to 0.1).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import attnc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "minilm" / "model.py"

SENTENCES = [
    "Hi.",
    "A man is playing a guitar on the street corner.",
    "The quick brown fox jumps over the lazy dog.",
    "ok",
    "Attention kernels compiled to WGSL run on every WebGPU adapter, from integrated "
    "laptop GPUs to data-centre accelerators; this sentence is long so that the padded "
    "batch spans more than one tile of keys and masking by kv_lens is exercised both "
    "across and inside tile boundaries, with a few more words to be sure.",
    "What is the capital of France?",
    "Sentence embeddings map text to vectors whose cosine similarity reflects meaning.",
]

COS_BOUND = {"float32": 0.99999, "float16": 0.9999}


def _load_example() -> ModuleType:
    """Import examples/minilm/model.py under a unique module name."""
    spec = importlib.util.spec_from_file_location("minilm_example_model", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mm = _load_example()


def _slug(text: str) -> str:
    """Make a device name usable in a test id."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _cases() -> list[Any]:
    """Every device with both dtypes; on devices with two families, each family with one dtype
    (alternating from device to device, so each family meets each dtype somewhere): the whole
    model costs seconds of shader compiles per case on the CPU adapters, and the families'
    numerics are covered shape by shape in tests/runtime."""
    cases = []
    pairs = [("portable", "float32"), ("subgroups", "float16")]
    for index, dev in enumerate(attnc.devices()):
        if "subgroups" in dev.features:
            chosen = pairs
            pairs = [(fam, dt) for (fam, _), (_, dt) in zip(pairs, reversed(pairs), strict=True)]
        else:
            chosen = [("portable", "float32"), ("portable", "float16")]
        for target, dtype in chosen:
            case_id = f"{index}-{_slug(mm.device_label(dev))}-{target}-{dtype}"
            cases.append(pytest.param(dev, target, dtype, id=case_id))
    return cases


@pytest.fixture(scope="module")
def minilm() -> Any:
    """The numpy MiniLM example, loaded once."""
    return mm.MiniLM()


@pytest.fixture(scope="module")
def reference(minilm: Any) -> np.ndarray:
    """sentence-transformers embeddings of SENTENCES (PyTorch CPU), computed once."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(minilm.path), device="cpu", local_files_only=True)
    model.eval()
    with torch.no_grad():
        emb = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    return np.asarray(emb, dtype=np.float32)


def _compare(got: np.ndarray, ref: np.ndarray, bound: float, what: str) -> None:
    """Assert per-sentence cosine >= bound and print the max abs difference."""
    cos = mm.cosine(got, ref)
    max_abs = float(np.abs(got - ref).max())
    print(f"{what}: min cos {cos.min():.9f}, max 1-cos {1 - cos.min():.3e}, max abs diff {max_abs:.3e}")
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    bad = {s[:40]: float(c) for s, c in zip(SENTENCES, cos, strict=True) if not c >= bound}
    assert not bad, f"{what}: cosine below {bound}: {bad} (max abs diff {max_abs:.3e})"


def test_devices_found(missing_adapter: Callable[[str], None]) -> None:
    """At least one adapter to run the model on (a failure in CI, as conftest rules)."""
    if not attnc.devices():
        missing_adapter("attnc.devices() is empty: no WebGPU adapter to run MiniLM on")


def test_batch_has_mixed_lengths(minilm: Any) -> None:
    """The batch pads short sentences and spans more than 64 keys."""
    lengths = minilm.tokenize(SENTENCES).lengths
    assert len(set(lengths.tolist())) == len(SENTENCES)
    assert lengths.min() <= 4 and lengths.max() > 64


def test_numpy_attention_matches_reference(minilm: Any, reference: np.ndarray) -> None:
    """The example's forward pass itself, with a numpy attention, matches the reference."""
    got = minilm.encode(SENTENCES, attention=mm.numpy_attention, dtype="float32")
    _compare(got, reference, COS_BOUND["float32"], "numpy attention float32")


@pytest.mark.gpu
@pytest.mark.parametrize(("device", "target", "dtype"), _cases())
def test_attnc_matches_sentence_transformers(
    minilm: Any, reference: np.ndarray, device: Any, target: str, dtype: str
) -> None:
    """Embeddings with attnc attention match sentence-transformers on every device/target
    (float16 runs everywhere: attnc's f16 storage needs no shader-f16)."""
    timed = mm.TimedAttention(mm.attnc_attention(device, target), mm.device_label(device))
    got = minilm.encode(SENTENCES, attention=timed, dtype=dtype)
    assert timed.calls == minilm.layers
    _compare(got, reference, COS_BOUND[dtype], f"{timed.label} {target} {dtype}")
