"""Benchmark cases: shapes from shapes.json or the command line, their FLOP and byte counts,
inputs, and the float64 numpy reference every implementation is checked against."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PACKAGED_SHAPES = Path(__file__).with_name("shapes.json")
REFERENCE_BLOCK = 1 << 23  # scores computed per block of at most this many float64 values


@dataclass(frozen=True, slots=True)
class Case:
    """Shape: q [B,Hq,S,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv]; causal aligned to the end."""

    name: str
    B: int
    Hq: int
    Hkv: int
    S: int
    T: int
    D: int
    Dv: int
    causal: bool = False

    def __post_init__(self) -> None:
        dims = (self.B, self.Hq, self.Hkv, self.S, self.T, self.D, self.Dv)
        if min(dims) < 1:
            raise ValueError(f"case {self.name!r}: every dimension must be >= 1, got {dims}")
        if self.Hq % self.Hkv:
            raise ValueError(f"case {self.name!r}: Hq={self.Hq} is not a multiple of Hkv={self.Hkv}")

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.Hq // self.Hkv

    def key_limits(self) -> np.ndarray:
        """Per query row i, how many keys it attends to (keys j < limit[i])."""
        i = np.arange(self.S)
        if not self.causal:
            return np.full(self.S, self.T, dtype=np.int64)
        return np.clip(i + self.T - self.S + 1, 0, self.T)

    def pairs(self) -> float:
        """(query, key) pairs per head: S*T, S*T/2 for causal S == T, else the unmasked ones."""
        if not self.causal:
            return float(self.S * self.T)
        if self.S == self.T:
            return self.S * self.T / 2
        return float(self.key_limits().sum())

    def flops(self) -> float:
        """2*pairs*(D + Dv) per head: QK^T and PV; equals 4*B*Hq*S*T*D when D == Dv."""
        return 2.0 * self.B * self.Hq * self.pairs() * (self.D + self.Dv)

    def nbytes(self, itemsize: int = 4) -> int:
        """Bytes of q, k, v read and o written once."""
        q = self.B * self.Hq * self.S * self.D
        k = self.B * self.Hkv * self.T * self.D
        v = self.B * self.Hkv * self.T * self.Dv
        o = self.B * self.Hq * self.S * self.Dv
        return itemsize * (q + k + v + o)

    def as_dict(self) -> dict[str, Any]:
        """The case as shapes.json writes it."""
        return asdict(self)


def parse_shape(text: str) -> Case:
    """Parse `B,Hq,Hkv,S,T,D,Dv[,causal]` (causal: 1/0/true/false/causal) into a Case."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (7, 8) or "" in parts:  # (an empty field is not a dimension left out)
        raise ValueError(f"--shape wants B,Hq,Hkv,S,T,D,Dv[,causal], got {text!r}")
    try:
        dims = [int(p) for p in parts[:7]]
    except ValueError:
        raise ValueError(f"--shape dimensions must be integers, got {text!r}") from None
    causal = False
    if len(parts) == 8:
        flag = parts[7].lower()
        if flag not in ("1", "0", "true", "false", "causal", "noncausal"):
            raise ValueError(f"--shape causal flag must be 1/0/true/false/causal, got {parts[7]!r}")
        causal = flag in ("1", "true", "causal")
    b, hq, hkv, s, t, d, dv = dims
    name = f"shape_b{b}_h{hq}x{hkv}_s{s}_t{t}_d{d}x{dv}" + ("_causal" if causal else "")
    try:
        return Case(name, b, hq, hkv, s, t, d, dv, causal)
    except ValueError as exc:
        raise ValueError(f"--shape {text}: {exc}") from None


def shapes_path(explicit: str | Path | None = None) -> Path:
    """shapes.json: the explicit path, else the one packaged with attnc (attnc/bench/shapes.json)."""
    return PACKAGED_SHAPES if explicit is None else Path(explicit)


def load_suites(path: str | Path | None = None) -> dict[str, list[Case]]:
    """All suites of a shapes.json file, as lists of Cases."""
    file = shapes_path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # not UTF-8, or not JSON
        raise ValueError(f"{file}: not a JSON shapes file: {exc}") from None
    suites = data.get("suites") if isinstance(data, dict) else None
    if not isinstance(suites, dict):
        raise ValueError(f"{file}: no 'suites' object")
    fields = ("name", "B", "Hq", "Hkv", "S", "T", "D", "Dv")
    out: dict[str, list[Case]] = {}
    for suite, entries in suites.items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{file}: suite {suite!r} is not a list of case objects")
        cases = []
        for e in entries:
            missing = [f for f in fields if f not in e]
            if missing:
                raise ValueError(f"{file}: suite {suite!r}: case {e.get('name')!r} lacks {missing}")
            if not all(type(e[f]) is int for f in fields[1:]):
                raise ValueError(f"{file}: suite {suite!r}: case {e['name']!r}: dimensions must be integers")
            if e.get("causal", False) not in (True, False) or type(e.get("causal", False)) not in (bool, int):
                raise ValueError(f"{file}: suite {suite!r}: case {e['name']!r}: causal must be true or false, got "
                                 f"{e['causal']!r}")  # "false" (a string) ran causal
            try:
                cases.append(Case(*(e[f] for f in fields), causal=bool(e.get("causal", False))))
            except ValueError as exc:
                raise ValueError(f"{file}: suite {suite!r}: {exc}") from None
        names = [c.name for c in cases]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # results are keyed by case name: two cases of one name would be mixed up
            raise ValueError(f"{file}: suite {suite!r}: case name(s) {twice} used more than once")
        out[suite] = cases
    return out


def load_suite(name: str, path: str | Path | None = None) -> list[Case]:
    """The cases of one suite; ValueError listing the suites when it is unknown."""
    suites = load_suites(path)
    if name not in suites:
        raise ValueError(f"unknown suite {name!r}; suites: {sorted(suites)}")
    return suites[name]


def make_inputs(case: Case, dtype: str = "f32", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard-normal q, k, v of the case's shapes in float32 or float16."""
    rng = np.random.default_rng(seed)
    np_dtype = np.float16 if dtype == "f16" else np.float32
    shapes = (
        (case.B, case.Hq, case.S, case.D),
        (case.B, case.Hkv, case.T, case.D),
        (case.B, case.Hkv, case.T, case.Dv),
    )
    q, k, v = (rng.standard_normal(s, dtype=np.float32).astype(np_dtype) for s in shapes)
    return q, k, v


def document_ids(T: int, documents: int) -> np.ndarray:
    """The document of each of T tokens packed as `documents` equal documents (int32)."""
    return (np.arange(T, dtype=np.int64) * documents // T).astype(np.int32)


def reference(case: Case, q: np.ndarray, k: np.ndarray, v: np.ndarray, documents: int = 0) -> np.ndarray:
    """float64 attention o [B,Hq,S,Dv] with scale 1/sqrt(D), GQA, causal aligned to the end;
    with `documents`, each query (the last S tokens) sees the keys of its own document only.

    Rows that attend to no key give 0. Scores are built per head and row block so memory
    stays bounded for the large cases.
    """
    scale = 1.0 / np.sqrt(case.D)
    limits = case.key_limits()
    out = np.zeros((case.B, case.Hq, case.S, case.Dv), dtype=np.float64)
    rows = max(1, REFERENCE_BLOCK // case.T)
    cols = np.arange(case.T)
    for b in range(case.B):
        for h in range(case.Hq):
            kh = k[b, h // case.group].astype(np.float64)
            vh = v[b, h // case.group].astype(np.float64)
            for r0 in range(0, case.S, rows):
                qh = q[b, h, r0 : r0 + rows].astype(np.float64)
                s = (qh @ kh.T) * scale
                keep = cols[None, :] < limits[r0 : r0 + rows, None]
                if documents:
                    doc = document_ids(case.T, documents)
                    qdoc = doc[np.arange(r0, min(r0 + rows, case.S)) + case.T - case.S]
                    keep = keep & (qdoc[:, None] == doc[None, :])
                s = np.where(keep, s, -np.inf)
                m = np.max(s, axis=1, keepdims=True)
                m = np.where(np.isfinite(m), m, 0.0)
                p = np.where(keep, np.exp(s - m), 0.0)
                den = p.sum(axis=1, keepdims=True)
                out[b, h, r0 : r0 + rows] = (p @ vh) / np.where(den > 0, den, 1.0)
    return out


def dequantized(fmt: str, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K and V as the kernels read them when stored in `fmt` (quantized, then dequantized)."""
    from attnc.quant import dequantize, quantize

    return dequantize(quantize(k, fmt)), dequantize(quantize(v, fmt))


def relerr(out: np.ndarray, ref: np.ndarray) -> float:
    """Frobenius relative error of `out` against `ref` (inf when shapes differ, nan on NaN; against an
    all-zero reference, which has no scale, the absolute error: a non-zero result there is not exact)."""
    out = np.asarray(out, dtype=np.float64)
    if out.shape != ref.shape:
        return float("inf")
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(out - ref))
    return num / den if den > 0 else num
