"""Variant plans: the capability subset, family and tunables a kernel is lowered for."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from attnc.errors import LoweringError


class Family(enum.Enum):
    """How reductions across invocations are done."""

    PORTABLE = "portable"  # workgroup memory + barriers only; runs in any browser
    SUBGROUPS = "subgroups"  # subgroupShuffleXor butterflies, then workgroup memory


class Strategy(enum.Enum):
    """How work maps onto invocations."""

    TILED = "tiled"  # score tiles in workgroup memory, register-blocked dot products (GPUs)
    ROWS = "rows"  # one query row per invocation, no workgroup memory (CPU adapters, decode)
    STREAM = "stream"  # short row tiles: K/V streamed from storage, per-invocation softmax (GPU decode)
    LANES = "lanes"  # query rows in registers, keys shared by subgroupBroadcast (CPU adapters)


class Storage(enum.Enum):
    """How float tensors are stored in buffers, and (F16A) whether products are f16."""

    F32 = "f32"
    F16 = "f16"  # packed two per u32, unpacked with unpack2x16float (no shader-f16 needed)
    F16A = "f16a"  # shader-f16: f16 loads and workgroup tiles, f16 products summed in f32


class Dialect(enum.Enum):
    """WGSL dialect of the consuming compiler (which `enable` lines it takes)."""

    TINT = "tint"  # Dawn/Chromium and the WGSL spec: `enable subgroups;` required
    NAGA = "naga"  # wgpu-native: rejects `enable subgroups;`


# WebGPU's default limits: what the portable family must fit into.
DEFAULT_LIMITS = {
    "max-compute-workgroup-storage-size": 16384,
    "max-compute-invocations-per-workgroup": 256,
    "max-storage-buffers-per-shader-stage": 8,
    "max-compute-workgroups-per-dimension": 65535,
    "max-storage-buffer-binding-size": 134217728,
}


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything lowering needs besides the IR: family, storage, dialect and tunables.

    WG: invocations per workgroup; DK: head-dim chunk staged in workgroup memory;
    DVC: output columns per workgroup (a grid axis covers Dv in chunks of DVC);
    DVS: value columns staged at once; SGMIN: the smallest subgroup size the variant
    must be correct for (butterflies stay within SGMIN lanes); TM: query rows per
    invocation (register blocking: each invocation computes TM x TN scores).
    ROWS strategy: KC keys per softmax step, DQ the largest head dim held in registers.
    VEC=4 loads q/k/v as vec4 (the runtime picks it only when D and Dv are multiples of 4).
    QRES keeps the query tile (BM x DQ, DQ >= D) in workgroup memory across the KV loop.
    STREAM strategy: KL lanes share a key's dot product, KC keys per softmax step, DQ >= D,
    DVC output columns per workgroup (four per invocation); SMX=1 computes each probability
    once in a softmax phase (one invocation per key group and row) instead of in every
    invocation that uses it (worth its extra barrier when tiles have many rows).
    UN (tiled): copies of the body per iteration of the loops whose trip count is a tile
    constant (head-dim steps of a chunk, keys of the P.V loop, staging), UN >= count
    unrolls them completely. PF=1 (tiled) issues the global loads of the next staged block
    (head-dim chunk, value chunk, next tile) into registers before the math on the current one,
    so their latency overlaps it; PF=0 loads each block right before its barrier.
    VK (tiled): keys per staged value block (0 = the whole key tile BN): with VK < BN a stage
    can hold more value columns (DVS) in the same workgroup memory, so each p read from
    workgroup memory feeds more products.
    PC (tiled): keys of p held in workgroup memory at once (0 = the whole key tile BN): the
    p tile is written PC keys at a time, each chunk before its value blocks, so workgroup
    memory holds PC x BM probabilities instead of BN x BM (on drivers that give an SM little
    workgroup memory, this lets two workgroups share it). A power of two from VK to BN that
    covers whole runs of the keys each row group's invocations own (owned()).
    LANES strategy: TM query rows per invocation, DQ >= D and DVC value columns held in
    registers; each step reads one key per lane of a subgroup of exactly SGB lanes; VEC=4 only.
    SGFAST (tiled, subgroups family): lanes the device was found to keep in one subgroup in
    local_invocation_index order (its probe); row groups wider than SGMIN but not than SGFAST
    reduce by shuffles alone, with no workgroup memory or barriers, when the subgroup size the
    shader runs with is at least the row group's width, and through workgroup memory otherwise.
    QO=1 (all strategies): the workgroups take the query tiles last tile first, each tile for
    every head and split before the next, instead of every tile of one head before the next
    head: with causal masks the last tiles see the most keys, so this starts the longest
    workgroups first (the GPU starts workgroups in index order) and the short ones fill in.
    CSG (split-KV combine): split groups per output column, each merging every CSG-th split
    (workgroups of 32 x CSG); 0 = from the split count when the runtime knows it, else 8.
    """

    family: Family = Family.PORTABLE
    storage: Storage = Storage.F32
    dialect: Dialect = Dialect.TINT
    WG: int = 128
    DK: int = 16
    DVC: int = 64
    DVS: int = 32
    SGMIN: int = 4
    TM: int = 1
    strategy: Strategy = Strategy.TILED
    KC: int = 4
    DQ: int = 64
    VEC: int = 1
    QRES: bool = False
    KL: int = 2
    SMX: int = 0
    UN: int = 1
    PF: int = 0
    CSG: int = 0
    VK: int = 0
    PC: int = 0
    QO: int = 0
    SGB: int = 0
    SGFAST: int = 0
    overrides: tuple[tuple[str, int], ...] = field(default=())

    def with_tunables(self, **kw: int) -> Plan:
        """A copy with some plan tunables replaced."""
        return replace(self, **kw)

    @property
    def name(self) -> str:
        rows = "" if self.strategy is Strategy.TILED else f".{self.strategy.value}"
        return f"{self.family.value}.{self.storage.value}{rows}"


@dataclass(frozen=True, slots=True)
class Layout:
    """The thread layout derived from a plan and the kernel's tile sizes."""

    BM: int
    BN: int
    WG: int
    CT: int  # threads sharing a row
    RT: int  # row groups
    TM: int  # rows per thread
    TN: int  # score columns per thread
    TD: int  # output columns per thread
    G: int  # lanes reduced by subgroup shuffles (1 = portable)
    QRES: bool
    DQ: int
    DK: int
    DVC: int
    DVS: int
    VK: int  # keys per staged value block
    PK: int  # keys of p held at once (PC, or BN)

    # Transposed tiles ([d][row] for q, [d][key] for k, [key][row] for p) get 4 words of
    # padding per line: a line then starts 4 banks further on, so the invocations storing
    # the same column of different lines hit different banks (without padding, every line of
    # a 128- or 64-word tile starts at bank 0).
    @property
    def QS(self) -> int:
        """Words per head-dim line of the staged q tile."""
        return self.BM + 4

    @property
    def KS(self) -> int:
        """Words per head-dim line of the staged k tile."""
        return self.BN + 4

    @property
    def p_words(self) -> int:
        """Words of the p tile ([key][row], BM + 4 words a key) at the start of the staging
        array: PK keys (all BN unless the plan chunks p)."""
        return self.PK * self.QS

    @property
    def stage_words(self) -> int:
        """The staging array: q/k chunks during the dot products, aliased with the p tile and
        a value chunk during P.V (the two phases are separated by barriers)."""
        qk = (0 if self.QRES else self.QS * self.DK) + self.KS * self.DK
        return max(qk, self.p_words + self.VK * self.DVS)

    @property
    def smem_words(self) -> int:
        """Workgroup storage in 4-byte words: the staging array, partials, a resident q tile."""
        qk_res = self.QS * self.DQ if self.QRES else 0
        red = self.BM * (self.CT // self.G) if self.CT > self.G else 0
        return self.stage_words + red + 4 + qk_res


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fast_reduce(plan: Plan, lay: Layout) -> bool:
    """Whether a tiled shader checks its run-time subgroup size for shuffle-only row reductions:
    row groups wider than SGMIN lanes, no wider than the SGFAST lanes the device keeps contiguous."""
    return plan.family is Family.SUBGROUPS and lay.G < lay.CT <= plan.SGFAST


def layout(plan: Plan, BM: int, BN: int) -> Layout:
    """Map the tile sizes onto invocations; raise LoweringError when they do not fit."""
    WG = plan.WG
    for name, val in (("BM", BM), ("BN", BN), ("WG", WG), ("TM", plan.TM)):
        if not _pow2(val):
            raise LoweringError(f"tunable {name}={val} must be a power of two")
    for name, val in (("DK", plan.DK), ("DVC", plan.DVC), ("DVS", plan.DVS)):
        if val <= 0 or val % 4:
            raise LoweringError(f"tunable {name}={val} must be a positive multiple of 4")
    if plan.UN < 1:
        raise LoweringError(f"tunable UN={plan.UN} must be at least 1")
    if plan.PF not in (0, 1):
        raise LoweringError(f"tunable PF={plan.PF} must be 0 or 1")
    vk = plan.VK or BN
    if not _pow2(vk) or vk > BN:
        raise LoweringError(f"tunable VK={plan.VK} must be 0 or a power of two no larger than BN={BN}")
    # row groups of TM rows; the invocations of a row group share its keys and columns
    TM = min(plan.TM, BM)
    RT = min(BM // TM, WG)
    TM = BM // RT
    CT = WG // RT
    if CT > BN:
        raise LoweringError(f"WG={WG} invocations over BM={BM} rows leaves {CT} per row, "
                            f"more than BN={BN} keys", notes=("raise BN or lower WG",))
    TN = BN // CT
    dvs = -(-max(plan.DVS, CT) // CT) * CT  # each staged value chunk gives every invocation whole columns
    if dvs % 4:
        raise LoweringError(f"DVS={dvs} value columns per stage must be a multiple of 4")
    dvc = -(-max(plan.DVC, dvs) // dvs) * dvs  # whole value chunks
    TD = dvc // CT
    G = 1 if plan.family is Family.PORTABLE else min(CT, plan.SGMIN)
    if plan.QRES and plan.DQ % plan.DK:
        raise LoweringError(f"DQ={plan.DQ} must be a multiple of DK={plan.DK} with QRES")
    pk = plan.PC or BN
    if not _pow2(pk) or not vk <= pk <= BN:
        raise LoweringError(f"tunable PC={plan.PC} must be 0 or a power of two from VK={vk} to BN={BN}")
    if pk % (CT * owned_run(TN)):
        raise LoweringError(f"PC={pk} must be a multiple of {CT * owned_run(TN)}: the keys that the {CT} "
                            f"invocations of a row group own in runs of {owned_run(TN)}")
    return Layout(BM, BN, WG, CT, RT, TM, TN, TD, G, plan.QRES, plan.DQ, plan.DK, dvc, dvs, vk, pk)


def owned_run(n: int) -> int:
    """Consecutive elements an invocation owns in each group of CT runs (4 when it can; see
    tiled.owned)."""
    return 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1


@dataclass(frozen=True, slots=True)
class StreamLayout:
    """The thread layout of the stream strategy (see lowering/stream.py)."""

    BM: int
    BN: int
    WG: int
    KL: int  # lanes per key in the dot phase
    KC: int  # keys per softmax step in the P.V phase
    D4: int  # vec4 chunks of the query row held in workgroup memory (DQ / 4)
    CG: int  # column groups: invocations sharing a key, four output columns each
    KG: int  # key groups: each keeps its own online-softmax state over every KG-th key
    RC: int  # rows merged per round at the end
    SMX: int  # 1: a softmax phase computes each probability once

    @property
    def NK(self) -> int:
        """Keys of a tile one invocation visits in the P.V phase."""
        return self.BN // self.KG

    @property
    def merge_in_sp(self) -> bool:
        """Whether the final merge's output vec4s go through the partial-dot array (packed-GQA
        tiles of 8 rows or more: a smaller workgroup) or an array of their own (vec4 stores)."""
        return self.BM >= 8

    @property
    def sp_words(self) -> int:
        """The partial-dot array: [key][lane][row] during the KV loop, then (merge_in_sp) the
        merge's 4 x [key group][row of the round][column group] words (RC rows per round)."""
        merge = 4 * self.KG * self.RC * self.CG
        return max(self.BN * self.KL * self.BM, merge if self.merge_in_sp else 0)

    @property
    def smem_words(self) -> int:
        """Workgroup storage in 4-byte words: q tile, partial dots, merge buffers."""
        smx = self.BN * self.BM + self.KG * self.BM if self.SMX else 0
        o_red = 0 if self.merge_in_sp else 4 * self.KG * self.RC * self.CG
        return 4 * self.BM * self.D4 + self.sp_words + 2 * self.KG * self.BM + 2 * self.BM + o_red + 2 + smx


def stream_layout(plan: Plan, BM: int, BN: int) -> StreamLayout:
    """Map a stream plan onto invocations; raise LoweringError when it does not fit."""
    for name, val in (("BM", BM), ("BN", BN), ("WG", plan.WG), ("KL", plan.KL), ("KC", plan.KC)):
        if not _pow2(val):
            raise LoweringError(f"tunable {name}={val} must be a power of two")
    if plan.VEC != 4:
        raise LoweringError("the stream strategy reads q, k and v as vec4: it needs VEC=4 "
                            "(head dims that are multiples of 4)")
    if plan.DQ % (4 * plan.KL) or plan.DVC % 4 or plan.DVC <= 0:
        raise LoweringError(f"DQ={plan.DQ} must be a multiple of 4*KL={4 * plan.KL} and "
                            f"DVC={plan.DVC} a positive multiple of 4")
    CG = plan.DVC // 4
    if not _pow2(CG) or CG > plan.WG:
        raise LoweringError(f"DVC={plan.DVC} gives {CG} column groups: it must be a power of two "
                            f"no larger than WG={plan.WG}")
    KG = plan.WG // CG
    if BN % (KG * plan.KC):
        raise LoweringError(f"BN={BN} keys must split evenly over {KG} key groups x KC={plan.KC}",
                            notes=("raise BN or lower WG",))
    # rows merged per round: at most one output vec4 per invocation; for packed-GQA tiles of 8
    # rows or more, which take many splits, the merge goes through the partial dots' array and
    # no more rows than it holds, so that the workgroup stays small and more of them share an
    # SM (H200 dec_gqa8: 16.8 -> 8.8 KiB, 2 -> 5 per SM)
    RC = max(1, min(BM, KG, 512 // plan.WG))
    if BM >= 8:
        RC = max(1, min(RC, BN * plan.KL * BM // (4 * KG * CG)))
    if plan.SMX not in (0, 1):
        raise LoweringError(f"tunable SMX={plan.SMX} must be 0 or 1")
    return StreamLayout(BM, BN, plan.WG, plan.KL, plan.KC, plan.DQ // 4, CG, KG, RC, plan.SMX)


def check_lanes(plan: Plan, BM: int) -> None:
    """Raise LoweringError unless a lanes-strategy plan is consistent (see lowering/lanes.py)."""
    if plan.family is not Family.SUBGROUPS:
        raise LoweringError("the lanes strategy shares keys by subgroupBroadcast: use the subgroups family")
    if plan.storage is Storage.F16A:
        raise LoweringError("f16 arithmetic is a tiled-strategy variant")
    if plan.VEC != 4 or plan.DQ % 4 or plan.DVC % 4 or plan.DQ <= 0 or plan.DVC <= 0:
        raise LoweringError(f"the lanes strategy reads q, k and v as vec4: it needs VEC=4 and DQ={plan.DQ}, "
                            f"DVC={plan.DVC} positive multiples of 4")
    for name, val in (("BM", BM), ("TM", plan.TM), ("SGB", plan.SGB)):
        if not _pow2(val):
            raise LoweringError(f"tunable {name}={val} must be a power of two")
    if plan.SGB < 4 or BM // plan.TM < plan.SGB:
        raise LoweringError(f"SGB={plan.SGB}: the lanes strategy needs a subgroup size of at least 4 and "
                            f"whole subgroups in a workgroup of BM/TM={BM // plan.TM} invocations")
