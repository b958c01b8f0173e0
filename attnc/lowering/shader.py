"""What the tiled, rows and combine programs share: bindings, the uniform block, leaf
rendering, helper functions and the workgroup-id prologue."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
from collections.abc import Callable

from attnc.ir import nodes as ir
from attnc.lowering.analyze import FlashSpec
from attnc.lowering.plan import Dialect, Family, Layout, Plan, Storage
from attnc.lowering.program import Access, Binding, Scalar, UniformField
from attnc.lowering.wgsl import ExprEnv, IntervalEnv, Writer, key_range

_WGSL_TYPE = {ir.DType.F32: "f32", ir.DType.I32: "i32", ir.DType.BOOL: "bool"}


@functools.cache
def _helpers(name: str = "helpers.wgsl") -> str:
    return (importlib.resources.files("attnc.lowering") / "wgsl_lib" / name).read_text()


def unpack_f16x4(words: str) -> str:
    """Four f32 from a vec2<u32> of packed halves (element 0 in the low half of .x)."""
    return f"vec4<f32>(unpack2x16float({words}.x), unpack2x16float({words}.y))"


def small_uints_to_f32(u: str, offset: int, lanes: int = 4) -> str:
    """WGSL for the f32 values of unsigned integers `u` (each below 2^23) less `offset`, without
    an int-to-float conversion (GPUs issue those at a fraction of the FMA rate): the bits
    0x4B000000 | u are the f32 2^23 + u, and subtracting 2^23 + offset is exact (integers below
    2^24). q4_0's nibbles take it: H200 decoding over q4_0 0.95-0.98 of the time of converting
    them (wgpu-native; Dawn 0.98-1.01), docs/BENCHMARKS.md."""
    ty = f"vec{lanes}<u32>" if lanes > 1 else "u32"
    fty = f"vec{lanes}<f32>" if lanes > 1 else "f32"
    return f"(bitcast<{fty}>(({u}) | {ty}(0x4B000000u)) - {fty}({float(2 ** 23 + offset)}))"


@dataclasses.dataclass(frozen=True)
class Fetched:
    """A load kept in a register as it is stored (WGSL type `ty`, expression `load`) and made its
    f32 value where it is used (`use` of the register's name): f16 pairs and quantized codes take
    a half or a quarter of the registers of their f32 values, and nothing waits on the load
    before its value is needed (a prefetch's registers)."""

    ty: str
    load: str
    use: Callable[[str], str] = lambda x: x
    value_ty: str = "vec4<f32>"

    def unpacked(self) -> Fetched:
        """The same value loaded and unpacked at once (its register holds the f32 value)."""
        return Fetched(self.value_ty, self.use(self.load), value_ty=self.value_ty)


# Words per block of 32 values (8 vec4s): an f16 scale word, then the values (q8_0: 8 words of
# four int8; q4_0: 4 words of eight nibbles). int8 has one f32 scale per row instead.
QUANT_BLOCK_WORDS = {ir.DType.Q8_0: 9, ir.DType.Q4_0: 5}


class Shader:
    """State shared by the two programs: bindings, the uniform struct, leaf rendering."""

    def __init__(self, spec: FlashSpec, plan: Plan, lay: Layout | None):
        self.spec, self.plan, self.lay = spec, plan, lay
        k = spec.kernel
        # shader-f16: f16 tensors read natively; workgroup tiles hold f16; products are f16
        self.half = {p.name for p in spec.tensors
                     if p.type.dtype is ir.DType.F16 and plan.storage is Storage.F16A}
        # other f16 tensors (q/k/v under f16 storage, f16 tables a mod reads): two per u32
        self.packed = {p.name for p in spec.tensors if p.type.dtype is ir.DType.F16} - self.half
        # u8 and bool tensors: four per u32, byte i of the tensor in byte i % 4 of word i / 4
        self.bytes = {p.name for p in spec.tensors if p.type.dtype in (ir.DType.U8, ir.DType.BOOL)}
        self.smem_t = "f16" if self.half else "f32"
        # quantized K/V (attnc/quant.py): u32 words, dequantized by the ld_/ld4_ loaders
        self.quant = {p.name: p.type.dtype for p in spec.tensors if p.type.dtype.is_quant}
        # a float16 o (f16 storage, both families): pairs of halves packed in u32 words, rows at
        # an even element stride (the runtime pads odd Dv), the last dim contiguous; see store_o2
        self.half_out = k.output.dtype is ir.DType.F16
        # q, k and v read four head-dim elements per load (needs D, Dv % 4 == 0, unit stride)
        self.vec4 = {spec.dot.a.tensor, spec.dot.b.tensor, spec.value.tensor} if plan.vector_width == 4 else set()
        # a mask that reads data: the main pass visits the live KV tiles a block map lists
        # (lowering/blocks.py), set by `lower` for the tiled, stream and lanes strategies
        self.block_mask: ir.Expr | None = None
        fields: list[tuple[str, Scalar]] = [("grid_total", Scalar.U32), ("grid_stride_x", Scalar.U32)]
        fields += [(f"d_{d}", Scalar.U32) for d in k.dims]
        for p in spec.tensors:
            fields += [(f"s_{p.name}_{i}", Scalar.U32) for i in range(len(p.type.dims))]
        nout = len(k.output.dims)
        fields += [(f"s_o_{i}", Scalar.U32) for i in range(nout)]
        if spec.lse:
            fields += [(f"s_lse_{i}", Scalar.U32) for i in range(nout - 1)]
        for p in spec.scalars:
            fields.append((f"p_{p.name}", Scalar.I32 if p.type.dtype is ir.DType.I32 else Scalar.F32))
        self.uniforms = tuple(UniformField(n, 4 * i, t) for i, (n, t) in enumerate(fields))

    # ------------------------------------------------------------------ leaves
    def load(self, e: ir.Load, env: ExprEnv) -> str:
        """An element of a kernel tensor, each index clamped to its dim (`clamp_ix`): the
        strategies evaluate the score function for the rows and keys past the ends of the last
        tiles too (a select discards the value), so the clamp keeps those reads in bounds."""
        dims = self.spec.kernel.param(e.tensor).type.dims
        addr = " + ".join(f"clamp_ix({env.render(i)}, P.d_{d}) * P.s_{e.tensor}_{n}"
                          for n, (i, d) in enumerate(zip(e.index, dims, strict=True)))
        return self.read(e.tensor, addr or "0u")

    def read(self, tensor: str, addr: str) -> str:
        """A scalar element of a tensor as its value type (f32, i32 or bool), whatever its storage."""
        if tensor in self.packed or tensor in self.vec4 or tensor in self.bytes or tensor in self.quant:
            return f"ld_{tensor}({addr})"
        if tensor in self.half:
            return f"f32(t_{tensor}[{addr}])"
        dt = self.spec.kernel.param(tensor).type.dtype
        if dt is ir.DType.I32:
            return f"t_{tensor}[{addr}]"
        if dt is ir.DType.U32:
            return f"i32(t_{tensor}[{addr}])"
        return f"f32(t_{tensor}[{addr}])"

    def read4(self, tensor: str, addr4: str) -> str:
        """Four consecutive elements (a vec4<f32>) at index 4*addr4 of a vectorised tensor."""
        if tensor in self.half:
            return f"vec4<f32>(t_{tensor}[{addr4}])"
        return f"ld4_{tensor}({addr4})" if tensor in self.packed or tensor in self.quant else f"t_{tensor}[{addr4}]"

    def fetch4(self, tensor: str, addr4: str) -> Fetched:
        """read4 as a Fetched: a packed f16 tensor's vec4 kept as its two words."""
        if tensor in self.packed:
            return Fetched("vec2<u32>", f"t_{tensor}[{addr4}]", unpack_f16x4)
        if tensor in self.half:
            return Fetched("vec4<f16>", f"t_{tensor}[{addr4}]", lambda x: f"vec4<f32>({x})")
        return Fetched("vec4<f32>", self.read4(tensor, addr4))

    def fetch_codes(self, tensor: str, w: str, c: int | str, as_int8: bool = False) -> Fetched:
        """The unscaled codes of vec4 `c` of a quantized tensor's block or int8 row at word `w`,
        kept as the word that holds them (q4_0's vec4s c and c + 4 share one: a constant c
        names it as c % 4, so that equal loads can share a register); used as a vec4<f32>, or
        `as_int8` as a word of four int8 codes for dot4I8Packed (q4_0's 0-15, 8 above the value)."""
        fmt = self.quant[tensor]
        word = c % 4 if isinstance(c, int) and fmt is ir.DType.Q4_0 else c
        cw = f"{word}u" if isinstance(word, int) else word
        cc = f"{c}u" if isinstance(c, int) else c
        if as_int8:
            return Fetched("u32", f"qw_{tensor}({w}, {cw})", lambda x: f"qb_{tensor}({x}, {cc})", "u32")
        return Fetched("u32", f"qw_{tensor}({w}, {cw})", lambda x: f"qx_{tensor}({x}, {cc})")

    def fetch_scale(self, tensor: str, w: str) -> Fetched:
        """The scale of a quantized tensor's block or int8 row at word `w`, kept as its word."""
        return Fetched("u32", f"t_{tensor}[{w}]", lambda x: f"qsx_{tensor}({x})", "f32")

    def read4_tile(self, tensor: str, addr4: str) -> str:
        """Four consecutive elements in the workgroup tiles' element type (f16 under F16A)."""
        if tensor in self.half:
            return f"t_{tensor}[{addr4}]"
        if self.half:  # a quantized tensor beside f16 ones: its f32 values into f16 tiles
            return f"vec4<f16>({self.read4(tensor, addr4)})"
        return self.read4(tensor, addr4)

    def env(self, row: str | None, kv: str | None, dot: str | None = None) -> ExprEnv:
        """Rendering environment: grid vars and uniform lets are private globals."""
        s = self.spec
        names = {a.var: f"g_{a.var}" for a in s.axes if a is not s.row}
        if s.split_var:
            names[s.split_var] = f"g_{s.split_var}"
        names.update({n: f"g_{n}" for n in s.uniform_lets})
        names.update({p.name: f"P.p_{p.name}" for p in s.scalars})
        if row:
            names[s.row.var] = row
        if kv:
            names[s.loop_var] = kv
        return ExprEnv(names, s.lets, self.load, dot)

    def slice_base(self, sl: ir.Slice, env: ExprEnv) -> str:
        """The element offset of a slice's first element. An index that is the grid or loop
        variable over the same dim is in range where the strategies use it; any other (a head
        computed for GQA, a page read from a table) is clamped into its dim, the IR's rule."""
        dims = self.spec.kernel.param(sl.tensor).type.dims
        terms = []
        for n, i in enumerate(sl.index):
            if i is None:
                continue
            x = env.render(i)
            ix = f"u32({x})" if self._ranges_over(i, dims[n]) else f"clamp_ix({x}, P.d_{dims[n]})"
            terms.append(f"{ix} * P.s_{sl.tensor}_{n}")
        return " + ".join(terms) or "0u"

    def _ranges_over(self, e: ir.Expr, dim_name: str) -> bool:
        """Whether `e` is the grid or KV-loop variable that runs over `dim_name`."""
        e = self.spec.resolve(e)
        if not isinstance(e, ir.Var):
            return False
        s = self.spec
        if e.name == s.loop_var:
            return s.kv_dim == dim_name
        return any(a.var == e.name and a.dim == dim_name for a in s.axes)

    # ------------------------------------------------------------------ module parts
    def header(self, w: Writer, with_subgroups: bool, with_f16: bool = True) -> None:
        if with_subgroups and self.plan.dialect is Dialect.TINT:
            w.line("enable subgroups;")
        if self.half and with_f16:
            w.line("enable f16;")
        w.line(f"// generated by attnc: kernel {self.spec.kernel.name}, variant {self.plan.name}")
        with w.block("struct Params"):
            for f in self.uniforms:
                w.line(f"{f.name}: {f.type.value},")
        w.line(_helpers())
        if self.half_out:
            w.line(_helpers("f16_out.wgsl"))

    def bindings(self, w: Writer, outputs: list[str], inputs: list[str]) -> tuple[Binding, ...]:
        out: list[Binding] = []
        for name in inputs:
            if name == "part":
                elem = Scalar.F32
            elif name == "blocks":
                elem = Scalar.U32
            else:
                dt = self.spec.kernel.param(name).type.dtype
                elem = Scalar.I32 if dt is ir.DType.I32 else (
                    Scalar.U32 if name in self.packed or name in self.bytes or name in self.quant
                    or dt is ir.DType.U32 else Scalar.F32)
            out.append(Binding(name, len(out), Access.READ, elem))
        for name in outputs:
            elem = Scalar.U32 if (name == "o" and self.half_out) or name == "blocks" else Scalar.F32
            out.append(Binding(name, len(out), Access.READ_WRITE, elem))
        for b in out:
            ty = b.elem.value
            if b.name in self.quant:
                ty = "u32"
            elif b.name in self.half:
                ty = "vec4<f16>" if b.name in self.vec4 else "f16"
            elif b.name in self.vec4:
                ty = "vec2<u32>" if b.name in self.packed else "vec4<f32>"
            w.line(f"@group(0) @binding({b.binding}) var<storage, {b.access.value}> t_{b.name}: array<{ty}>;")
        out.append(Binding("params", len(out), Access.UNIFORM, Scalar.U32))
        w.line(f"@group(0) @binding({len(out) - 1}) var<uniform> P: Params;")
        for name in inputs:
            self._loaders(w, name)
        return tuple(out)

    def main_bindings(self, w: Writer) -> tuple[Binding, ...]:
        """The bindings of a main-pass program: every input tensor, then o (and lse) or the
        split partial states."""
        s = self.spec
        outputs = ["part"] if s.split_var else (["o", "lse"] if s.lse else ["o"])
        return self.bindings(w, outputs, [p.name for p in s.main_tensors] + (["blocks"] if self.block_mask else []))

    def _loaders(self, w: Writer, name: str) -> None:
        """ld_/ld4_ functions for packed f16 (two per u32, no shader-f16 needed), quantized and
        vec4 tensors."""
        packed, vec = name in self.packed, name in self.vec4
        if name in self.quant:
            self._quant_loaders(w, name)
        elif name in self.bytes:
            byte = f"((t_{name}[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu)"
            if self.spec.kernel.param(name).type.dtype is ir.DType.BOOL:
                with w.block(f"fn ld_{name}(i: u32) -> bool"):
                    w.line(f"return {byte} != 0u;")
            else:
                with w.block(f"fn ld_{name}(i: u32) -> i32"):
                    w.line(f"return i32{byte};")
        elif packed and vec:
            with w.block(f"fn ld4_{name}(i: u32) -> vec4<f32>"):
                w.line(f"let x = t_{name}[i];")
                w.line(f"return {unpack_f16x4('x')};")
            with w.block(f"fn ld_{name}(i: u32) -> f32"):
                w.line(f"return ld4_{name}(i >> 2u)[i & 3u];")
        elif packed:
            with w.block(f"fn ld_{name}(i: u32) -> f32"):
                w.line(f"let h = unpack2x16float(t_{name}[i >> 1u]);")
                w.line("return select(h.x, h.y, (i & 1u) == 1u);")
        elif vec:
            with w.block(f"fn ld_{name}(i: u32) -> f32"):
                w.line(f"return f32(t_{name}[i >> 2u][i & 3u]);")

    def _quant_loaders(self, w: Writer, name: str) -> None:
        """WGSL for a quantized tensor (word layouts in attnc/quant.py and docs/MANIFEST.md):
        qs_ (the scale at a block's or an int8 row's first word; qsx_ from that word), qr4_
        (vec4 c of that block or row, unscaled: qx_ of the word qw_ that holds it), ldr4_ (vec4
        c of a row given the row's first word), ld4_/ld_ (four or one dequantized values at an
        element address of the dense logical tensor)."""
        fmt = self.quant[name]
        t = f"t_{name}"
        # int8 bytes sign-extended, then converted: a GPU may convert a byte of a word in one
        # instruction (H200: small_uints_to_f32 of q + 128, the sign bit flipped, was 1-8 % slower on
        # wgpu-native, 0.98-1.05 on Dawn)
        sext = "vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(x) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u))"
        with w.block(f"fn qsx_{name}(x: u32) -> f32"):  # the scale from its word
            if fmt is ir.DType.INT8:
                w.line("return bitcast<f32>(x);")
            else:  # f16 d in the low half of the block's first word
                w.line("return unpack2x16float(x).x;")
        with w.block(f"fn qs_{name}(w: u32) -> f32"):
            w.line(f"return qsx_{name}({t}[w]);")
        with w.block(f"fn qw_{name}(w: u32, c: u32) -> u32"):  # the word holding vec4 c's codes
            if fmt is ir.DType.Q4_0:  # 16 bytes of two nibbles: vec4 c < 4 low nibbles, c >= 4 high
                w.line(f"return {t}[w + 1u + (c & 3u)];")
            else:  # q8_0 (c < 8 in a block) and int8 (any c of the row): 4 int8 a word
                w.line(f"return {t}[w + 1u + c];")
        with w.block(f"fn qx_{name}(x: u32, c: u32) -> vec4<f32>"):  # vec4 c's codes from its word
            if fmt is ir.DType.Q4_0:
                w.line("let q = (vec4<u32>(x >> ((c >> 2u) * 4u)) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u);")
                w.line(f"return {small_uints_to_f32('q', 8)};")
            else:
                w.line(f"return {sext};")
        with w.block(f"fn qb_{name}(x: u32, c: u32) -> u32"):  # vec4 c's codes as 4 int8 (q4_0: 0-15, less 8 apart)
            if fmt is ir.DType.Q4_0:
                w.line("return (x >> ((c >> 2u) * 4u)) & 0x0F0F0F0Fu;")
            else:
                w.line("return x;")
        with w.block(f"fn qr4_{name}(w: u32, c: u32) -> vec4<f32>"):
            w.line(f"return qx_{name}(qw_{name}(w, c), c);")
        words = self.quant_block_words(name)
        with w.block(f"fn ldr4_{name}(rw: u32, c: u32) -> vec4<f32>"):
            if words is None:
                w.line(f"return qs_{name}(rw) * qr4_{name}(rw, c);")
            else:
                w.line(f"let w = rw + (c >> 3u) * {words}u;")
                w.line(f"return qs_{name}(w) * qr4_{name}(w, c & 7u);")
        with w.block(f"fn ld4_{name}(i4: u32) -> vec4<f32>"):
            if words is None:  # a row of D/4 + 1 words: f32 s, then D int8
                last = self.spec.kernel.param(name).type.dims[-1]
                w.line(f"let n4 = P.d_{last} >> 2u;")
                w.line("let r = i4 / n4;")
                w.line(f"return ldr4_{name}(r * (n4 + 1u), i4 - r * n4);")
            else:  # blocks of 8 vec4s
                w.line(f"let w = (i4 >> 3u) * {words}u;")
                w.line(f"return qs_{name}(w) * qr4_{name}(w, i4 & 7u);")
        sext1 = "f32((bitcast<i32>(x) << (24u - 8u * (j & 3u))) >> 24u)"
        with w.block(f"fn ld_{name}(i: u32) -> f32"):  # one value (scalar loads, VEC=1)
            if fmt is ir.DType.Q8_0:
                w.line("let w = (i >> 5u) * 9u;")
                w.line("let j = i & 31u;")
                w.line(f"let x = {t}[w + 1u + (j >> 2u)];")
                w.line(f"return unpack2x16float({t}[w]).x * {sext1};")
            elif fmt is ir.DType.Q4_0:
                w.line("let w = (i >> 5u) * 5u;")
                w.line("let j = i & 31u;")
                w.line(f"let q = ({t}[w + 1u + ((j & 15u) >> 2u)] >> (8u * (j & 3u) + 4u * (j >> 4u))) & 15u;")
                w.line(f"return unpack2x16float({t}[w]).x * {small_uints_to_f32('q', 8, lanes=1)};")
            else:
                last = self.spec.kernel.param(name).type.dims[-1]
                w.line(f"let r = i / P.d_{last};")
                w.line(f"let j = i - r * P.d_{last};")
                w.line(f"let w = r * ((P.d_{last} >> 2u) + 1u);")
                w.line(f"let x = {t}[w + 1u + (j >> 2u)];")
                w.line(f"return bitcast<f32>({t}[w]) * {sext1};")

    def quant_row_words(self, name: str, first4: str) -> str:
        """The first word of a quantized tensor's row, from the vec4 index `first4` of the row's
        first element in the dense logical tensor (rows start on a block: D % 32 == 0)."""
        words = self.quant_block_words(name)
        if words is None:  # int8: D/4 + 1 words a row (first4 is a row's start: an exact division)
            last = self.spec.kernel.param(name).type.dims[-1]
            return f"div_by({first4}, rows_{name}) * ((P.d_{last} >> 2u) + 1u)"
        return f"(({first4}) >> 3u) * {words}u"

    def read_blocks(self, w: Writer, tensor: str, name: str, row: str, count: int, first: str, last: str) -> None:
        """`{name}r_i` (i < count): the dequantized vec4s of a q8_0 or q4_0 row at word `row`,
        from its block `first` on (blocks clamped to `last`): each block's scale read once, its
        words at constant offsets, so that no load or shift is recomputed per vec4."""
        words = self.quant_block_words(tensor)
        for g in range(-(-count // 8)):
            w.line(f"let {name}b{g} = {row} + min({first} + {g}u, {last}) * {words}u;")
            w.line(f"let {name}d{g} = qs_{tensor}({name}b{g});")
            for i in range(8 * g, min(count, 8 * g + 8)):
                w.line(f"let {name}r_{i} = {name}d{g} * qr4_{tensor}({name}b{g}, {i % 8}u);")

    def block_quantized(self, name: str) -> bool:
        """Whether tensor `name` is stored in blocks of 32 values with a scale each (q8_0, q4_0)."""
        return name in self.quant and self.quant_block_words(name) is not None

    def quant_block_words(self, name: str) -> int | None:
        """Words per block of 8 vec4s with their own scale (q8_0, q4_0), None for a scale per row."""
        return QUANT_BLOCK_WORDS.get(self.quant[name])

    def privates(self, w: Writer) -> None:
        s = self.spec
        for a in s.axes:
            if a is not s.row:
                w.line(f"var<private> g_{a.var}: i32;")
        if s.split_var:
            w.line(f"var<private> g_{s.split_var}: i32;")
        for n in s.uniform_lets:
            w.line(f"var<private> g_{n}: {_WGSL_TYPE[s.lets[n].dtype]};")
        for name in self._int8_rows():
            w.line(f"var<private> rows_{name}: vec2<u32>;  // exact_div's divisor: an int8 row's vec4s")

    def _int8_rows(self) -> list[str]:
        """The int8 tensors, whose rows' first words quant_row_words finds by exact_div."""
        return [n for n, fmt in self.quant.items() if fmt is ir.DType.INT8]

    def uniform_lets(self, w: Writer, skip_split: bool = False) -> None:
        """The private values every invocation computes once from the uniforms: the uniform
        lets (those depending on the split unless `skip_split`), and the int8 rows' divisors."""
        for name in self._int8_rows():
            last = self.spec.kernel.param(name).type.dims[-1]
            w.line(f"rows_{name} = divisor(P.d_{last} >> 2u);")
        env = self.env(None, None)
        for n in self.spec.uniform_lets:
            if skip_split and self.spec.split_var and self.spec.depends(
                    self.spec.lets[n], frozenset({self.spec.split_var})):
                continue
            w.line(f"g_{n} = {env.render(self.spec.lets[n])};")

    def functions(self, w: Writer, main: bool = True) -> None:
        s = self.spec
        env = self.env("qi", "kj", "dotv")
        if main:
            self.main_functions(w, env)
        if s.sink is not None and not (main and s.split_var):  # a split KV's sink: the combine's
            with w.block("fn sink_fn(qi: i32) -> f32"):
                w.line(f"return {self.env('qi', None).hoist(w, s.sink).render(s.sink)};")
        self.out_functions(w)

    def main_functions(self, w: Writer, env: ExprEnv) -> None:
        s = self.spec
        with w.block("fn score_fn(dotv: f32, qi: i32, kj: i32) -> f32"):
            w.line(f"return {env.hoist(w, s.score).render(s.score)};")
        if self.block_mask is not None:  # the score on a tile the mask keeps whole
            free = unmasked_score(s)
            with w.block("fn score_free_fn(dotv: f32, qi: i32, kj: i32) -> f32"):
                w.line(f"return {env.hoist(w, free).render(free)};")
            with w.block("fn score_tile_fn(dotv: f32, qi: i32, kj: i32, full: bool) -> f32"):  # full: uniform
                with w.block("if (full)"):
                    w.line("return score_free_fn(dotv, qi, kj);")
                w.line("return score_fn(dotv, qi, kj);")
        with w.block("fn q_base(qi: i32) -> u32"):
            w.line(f"return {self.slice_base(s.dot.a, env)};")
        with w.block("fn k_base(kj: i32) -> u32"):
            w.line(f"return {self.slice_base(s.dot.b, env)};")
        with w.block("fn v_base(kj: i32) -> u32"):
            w.line(f"return {self.slice_base(s.value, env)};")

    def store_o2(self, w: Writer, base: str, col: str, lo: str, hi: str) -> None:
        """Store output columns `col` (even) and `col` + 1 of the row whose element offset is
        `base` as one u32 word of halves (a float16 o; the last dim has unit stride and rows an
        even one, so the pair never straddles two rows and one invocation owns the word)."""
        w.line(f"t_o[({base} + {col}) >> 1u] = pack_f16({lo}, {hi});")

    def out_functions(self, w: Writer) -> None:
        s = self.spec
        with w.block("fn o_base(qi: i32) -> u32"):
            terms = [f"u32({'qi' if a is s.row else 'g_' + a.var}) * P.s_o_{i}"
                     for i, a in enumerate(s.axes)]
            w.line(f"return {' + '.join(terms)};")
        if s.lse:
            with w.block("fn lse_base(qi: i32) -> u32"):
                terms = [f"u32({'qi' if a is s.row else 'g_' + a.var}) * P.s_lse_{i}"
                         for i, a in enumerate(s.axes)]
                w.line(f"return {' + '.join(terms)};")
        with w.block("fn row_linear(qi: i32) -> u32"):
            expr = "0u"
            for a in s.axes:
                v = "qi" if a is s.row else f"g_{a.var}"
                expr = f"({expr}) * P.d_{a.dim} + u32({v})"
            w.line(f"return {expr};")

    def extent(self, a_dim: str, tile: int | None) -> str:
        return f"P.d_{a_dim}" if tile is None else f"((P.d_{a_dim} + {tile - 1}u) / {tile}u)"

    def prologue(self, w: Writer) -> None:
        """Re-linearise the (folded) workgroup id; decompose it into the Dv chunk `dvc`, the
        split, the query tile `qtile` and the other grid axes; compute the uniform lets."""
        s = self.spec
        w.line("let wg = wid.x + wid.y * P.grid_stride_x;")
        with w.block("if (wg >= P.grid_total)"):
            w.line("return;")
        w.line("var rem = wg;")
        w.line(f"let dvc = rem % {self.n_dvc()};")
        w.line(f"rem = rem / {self.n_dvc()};")
        if s.split_var:
            w.line(f"g_{s.split_var} = i32(rem % u32(P.p_{s.split_count}));")
            w.line(f"rem = rem / u32(P.p_{s.split_count});")
        axes = list(reversed(s.axes))
        if self.plan.last_tile_first:  # query tiles outermost, last tile first (Plan.QO)
            axes = [a for a in axes if a is not s.row] + [s.row]
        for a in axes:
            ext = self.extent(a.dim, a.tile)
            if a is s.row and self.plan.last_tile_first:
                w.line(f"let qtile = {ext} - 1u - rem % {ext};")
            elif a is s.row:
                w.line(f"let qtile = rem % {ext};")
            else:
                w.line(f"g_{a.var} = i32(rem % {ext});")
            w.line(f"rem = rem / {ext};")
        self.uniform_lets(w)

    def key_bounds(self, w: Writer, row_lo: str, row_hi: str) -> None:
        """`var k_lo`/`var k_hi`: the key range outside which the mask removes every key for
        query rows in [row_lo, row_hi] (interval analysis of the mask's kj comparisons)."""
        s = self.spec
        w.line("var k_lo = 0;")
        w.line("var k_hi = n_keys;")
        mask = mask_of(s)
        if mask is None:
            return
        env = IntervalEnv(s.row.var, row_lo, row_hi, self.env(None, None), s.lets, s.loop_var)
        los, his = key_range(mask, env, s.resolve)
        for line in env.lines:
            w.line(line)
        for lo in los:
            w.line(f"k_lo = max(k_lo, {lo});")
        for hi in his:
            w.line(f"k_hi = min(k_hi, {hi});")

    def row_key_bounds(self, w: Writer, row: str, BN: int) -> None:
        """`var k_lo`/`var k_hi` for one query row: the mask-implied key range, cut to the
        split's share of KV tiles of BN keys."""
        s = self.spec
        self.key_bounds(w, row, row)
        if s.split_var:
            w.line(f"let n_tiles = (n_keys + {BN - 1}) / {BN};")
            w.line(f"let per = (n_tiles + P.p_{s.split_count} - 1) / P.p_{s.split_count};")
            w.line(f"k_lo = max(k_lo, g_{s.split_var} * per * {BN});")
            w.line(f"k_hi = min(k_hi, (g_{s.split_var} + 1) * per * {BN});")

    def part_row(self, qi: str, width: str) -> str:
        """WGSL for where row qi's partial state of this split starts in t_part ([row][split][m, l,
        `width` value columns]), for the strategies' split stores and the combine."""
        s = self.spec
        return f"(row_linear({qi}) * u32(P.p_{s.split_count}) + u32(g_{s.split_var})) * ({width} + 2u)"

    def merge_sink(self, w: Writer, qi: str, m: str, l: str, nan: str, scale: Callable[[str], None]) -> None:
        """Fold row qi's attention sink into its softmax state (m, l, nan flag); `scale(a)`
        emits the rescaling of the row's accumulators by the factor named a."""
        w.line(f"let z = sink_fn({qi});")
        w.line(f"let mf = max({m}, z);")
        w.line(f"let a = sink_scale({m}, mf, z);")
        w.line(f"{l} = {l} * a + sink_term(z, mf);")
        w.line(f"{nan} = {nan} || is_nan(z);")
        scale("a")
        w.line(f"{m} = mf;")

    def tile_bounds(self, w: Writer, BM: int, BN: int) -> None:
        """`wg_lo`/`wg_hi` (workgroup vars): the KV tiles of BN keys this workgroup visits for
        query rows q0..q0+BM-1: the mask-implied key range, cut to the split's share. With a
        block map, the range of the query tile's list of live tiles (`blk_rec`) instead."""
        s = self.spec
        if self.block_mask is not None:
            with w.block("if (lid == 0u)"):
                w.line("let n_live = i32(t_blocks[blk_rec]);")
                if s.split_var:  # an equal share of the live tiles per split
                    w.line(f"let per = (n_live + P.p_{s.split_count} - 1) / P.p_{s.split_count};")
                    w.line(f"let lo = min(g_{s.split_var} * per, n_live);")
                    w.line("wg_lo = lo;")
                    w.line("wg_hi = min(lo + per, n_live);")
                else:
                    w.line("wg_lo = 0;")
                    w.line("wg_hi = n_live;")
            return
        with w.block("if (lid == 0u)"):
            w.line("let r_lo = q0;")
            w.line(f"let r_hi = min(q0 + {BM}, n_rows) - 1;")
            self.key_bounds(w, "r_lo", "r_hi")
            w.line(f"let n_tiles = (n_keys + {BN - 1}) / {BN};")
            w.line(f"var lo = max(k_lo, 0) / {BN};")
            w.line(f"var hi = min((k_hi + {BN - 1}) / {BN}, n_tiles);")
            if s.split_var:
                w.line(f"let per = (n_tiles + P.p_{s.split_count} - 1) / P.p_{s.split_count};")
                w.line(f"lo = max(lo, g_{s.split_var} * per);")
                w.line(f"hi = min(hi, (g_{s.split_var} + 1) * per);")
            w.line("wg_lo = lo;")
            w.line("wg_hi = max(hi, lo);")

    @property
    def dvc(self) -> int:
        return self.lay.DVC if self.lay is not None else self.plan.value_columns

    def n_dvc(self) -> str:
        return f"((P.d_{self.spec.width} + {self.dvc - 1}u) / {self.dvc}u)"

    def grid_factors(self) -> tuple[str, ...]:
        """The workgroup count as factors over dims/params, for the runtime and the manifest."""
        s = self.spec
        f = [a.dim if a.tile is None else f"ceil_div({a.dim},{a.tile})" for a in s.axes]
        if s.split_count:
            f.append(s.split_count)
        f.append(f"ceil_div({s.width},{self.dvc})")
        return tuple(f)


def mask_of(s: FlashSpec) -> ir.Expr | None:
    """The keep-condition c of a score written `where(c, x, -inf)`, if it is one."""
    e = s.resolve(s.score)
    if isinstance(e, ir.Call) and e.op is ir.Op.WHERE:
        neg = s.resolve(e.args[2])
        if isinstance(neg, ir.Const) and neg.value == -math.inf:
            return e.args[0]
    return None


def unmasked_score(s: FlashSpec) -> ir.Expr:
    """The score `x` of a score written `where(c, x, -inf)` (see mask_of)."""
    e = s.resolve(s.score)
    assert isinstance(e, ir.Call) and e.op is ir.Op.WHERE
    return e.args[1]


def features(plan: Plan) -> frozenset[str]:
    """Device features a main-pass program needs (attnc's names: "subgroups", "f16")."""
    out = {"subgroups"} if plan.family is Family.SUBGROUPS else set()
    if plan.storage is Storage.F16A:
        out.add("f16")
    return frozenset(out)
