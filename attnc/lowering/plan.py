"""Variant plans: the capability subset, family and tunables a kernel is lowered for."""

from __future__ import annotations

import enum
from dataclasses import dataclass

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
    """How float tensors are stored in buffers and workgroup tiles."""

    F32 = "f32"
    F16 = "f16"  # packed two per u32, unpacked with unpack2x16float (no shader-f16 needed)
    F16A = "f16a"  # shader-f16: f16 loads and workgroup tiles (half the memory), f32 products and sums


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


# Plan field -> the compact key that names it in variant strings, manifests, JSON and logs
# (docs/PLANS.md has the table with each field's meaning).
COMPACT_KEYS = {
    "workgroup_size": "WG", "head_chunk": "DK", "value_columns": "DVC", "value_stage_columns": "DVS",
    "min_subgroup": "SGMIN", "rows_per_invocation": "TM", "keys_per_step": "KC", "query_dim": "DQ",
    "vector_width": "VEC", "resident_query": "QRES", "lanes_per_key": "KL", "softmax_phase": "SMX",
    "unroll": "UN", "prefetch": "PF", "combine_groups": "CSG", "value_block_keys": "VK",
    "p_chunk_keys": "PC", "last_tile_first": "QO", "subgroup_width": "SGB", "shuffle_only_lanes": "SGFAST",
    "block_map": "BMAP", "lane_sum": "LS", "int_dot": "IDP",
}
FIELDS_BY_KEY = {key: name for name, key in COMPACT_KEYS.items()}


def from_compact(values: dict[str, int]) -> dict[str, int]:
    """Plan fields from compact keys (`{"UN": 16}` -> `{"unroll": 16}`), for tools and the CLI;
    ValueError naming the keys that are not plan fields."""
    unknown = sorted(set(values) - set(FIELDS_BY_KEY))
    if unknown:
        raise ValueError(f"unknown plan keys {unknown}; expected some of {sorted(FIELDS_BY_KEY)}")
    return {FIELDS_BY_KEY[k]: v for k, v in values.items()}


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything lowering needs besides the IR: family, storage, dialect, strategy and the
    strategy's tunables (each field's compact key in variant strings is in COMPACT_KEYS).

    All strategies:
    - workgroup_size: invocations per workgroup.
    - value_columns: output columns per workgroup (a grid axis covers Dv in chunks of it).
    - vector_width: 4 loads q/k/v as vec4 (the runtime picks it only when D and Dv are
      multiples of 4), else 1.
    - last_tile_first: 1 makes the workgroups take the query tiles last tile first, each tile
      for every head and split before the next, instead of every tile of one head before the
      next head: under a causal mask the last tiles see the most keys, so the longest
      workgroups start first (GPUs start workgroups in index order) and the short ones fill in.
    - block_map (tiled, stream and lanes strategies): 1 builds a block map when the mask reads tensors
      (lowering/blocks.py: two small passes list each query tile's live KV tiles, and the main
      pass visits only those); 0 evaluates the mask on every tile. The map's scratch buffer is
      one more storage binding per pass: where that exceeds the device's limit the runtime
      takes 0, and `attnc compile` also lists a variant with 0 that fits WebGPU's defaults.
    - combine_groups (split-KV combine): split groups per output column, each merging every
      combine_groups-th split (workgroups of 32 x combine_groups); 0 = from the split count
      when the runtime knows it, else 8.

    Tiled strategy:
    - rows_per_invocation: query rows per invocation (register blocking: each invocation
      computes rows_per_invocation x its keys' scores).
    - head_chunk: head-dim columns of q and k staged in workgroup memory at once.
    - value_stage_columns: value columns staged at once.
    - min_subgroup: the smallest subgroup size the variant must be correct for (butterflies
      stay within that many lanes).
    - resident_query: keep the query tile (BM x query_dim, query_dim >= D) in workgroup
      memory across the KV loop.
    - unroll: copies of the body per iteration of the loops whose trip count is a tile
      constant (head-dim steps of a chunk, keys of the P.V loop, staging); unroll >= the count
      unrolls them completely.
    - prefetch: 1 issues the global loads of the next staged block (head-dim chunk, value
      chunk, next tile) into registers before the math on the current one, so that their
      latency overlaps it; 0 loads each block right before its barrier.
    - value_block_keys: keys per staged value block (0 = the whole key tile BN): with fewer
      keys a stage holds more value columns in the same workgroup memory, so each p read
      from workgroup memory feeds more products.
    - p_chunk_keys: keys of p held in workgroup memory at once (0 = the whole key tile BN):
      the p tile is written that many keys at a time, each chunk before its value blocks, so
      that workgroup memory holds p_chunk_keys x BM probabilities instead of BN x BM (on
      drivers that give an SM little workgroup memory, two workgroups then share it). A power
      of two from value_block_keys to BN that covers whole runs of the keys each row group's
      invocations own (owned_run()).
    - shuffle_only_lanes (subgroups family): lanes the device was found to keep in one
      subgroup in local_invocation_index order (its probe); row groups wider than
      min_subgroup but not than this reduce by shuffles alone, with no workgroup memory or
      barriers, when the subgroup size the shader runs with is at least the row group's width,
      and through workgroup memory otherwise.

    Rows strategy: keys_per_step keys per softmax step; query_dim, the largest head dim held
    in registers.

    Stream strategy: lanes_per_key lanes share a key's dot product, keys_per_step keys per
    softmax step, query_dim >= D, value_columns output columns per workgroup (four per
    invocation); softmax_phase=1 computes each probability once in a softmax phase (one
    invocation per key group and row) instead of in every invocation that uses it (worth its
    extra barrier when tiles have many rows); softmax_phase=2 computes it once in the dot
    phase (one lane per key), against a maximum the workgroup shares and raises only when a
    score passes it by a margin (no extra barrier on the tiles that do not); softmax_phase=3
    (subgroups family) has no phases: the KL lanes of a key, in one subgroup, reduce its dot by
    shuffles and own DVC/KL of its value columns, so each group of KL lanes streams its own
    keys with its own online softmax in registers, without workgroup memory or barriers in
    the KV loop. lane_sum=1 (subgroups family, softmax_phase 0 or 1, KL > 1): the KL lanes of
    a key sum its partial dots by shuffles in the dot phase, so workgroup memory holds one
    score per key and row, and the P.V phase (or the softmax phase) reads one word per key
    instead of KL. int_dot=1 (softmax_phase=3, a q8_0, q4_0 or int8 K): each lane holds its
    query values as three int8 digits of a 24-bit integer per scale group of K and takes its
    dots with K's stored codes by packed int8 dot products (dot4I8Packed), three per four
    values, instead of unpacking each code to f32 for an FMA.

    Lanes strategy: rows_per_invocation query rows per invocation, query_dim >= D and
    value_columns value columns held in registers; each step reads one key per lane of a
    subgroup of exactly subgroup_width lanes; vector_width 4 only.
    """

    family: Family = Family.PORTABLE
    storage: Storage = Storage.F32
    dialect: Dialect = Dialect.TINT
    workgroup_size: int = 128
    head_chunk: int = 16
    value_columns: int = 64
    value_stage_columns: int = 32
    min_subgroup: int = 4
    rows_per_invocation: int = 1
    strategy: Strategy = Strategy.TILED
    keys_per_step: int = 4
    query_dim: int = 64
    vector_width: int = 1
    resident_query: bool = False
    lanes_per_key: int = 2
    softmax_phase: int = 0
    unroll: int = 1
    prefetch: int = 0
    combine_groups: int = 0
    value_block_keys: int = 0
    p_chunk_keys: int = 0
    last_tile_first: int = 0
    subgroup_width: int = 0
    shuffle_only_lanes: int = 0
    block_map: int = 1
    lane_sum: int = 0
    int_dot: int = 0

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
    XW: int = 0  # words of the pair-exchange array (a float16 output with an odd DVS / CT; see tiled.py)
    # f16 tiles (F16A): q/k/v staged as f16 (two per word) and p in an f32 array of its own, so
    # that the P.V products and the row sums use the same unrounded probabilities
    HALF: bool = False

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
        """Words of the p tile ([key][row], BM + 4 words a key): PK keys (all BN unless the
        plan chunks p), at the start of the staging array (its own f32 array with HALF)."""
        return self.PK * self.QS

    @property
    def value_offset(self) -> int:
        """Where a staged value chunk starts in the staging array: after the p tile, or at 0
        when p has its own array (HALF)."""
        return 0 if self.HALF else self.p_words

    @property
    def stage_words(self) -> int:
        """Elements of the staging array: q/k chunks during the dot products, aliased with
        the p tile (unless HALF) and a value chunk during P.V (the phases are separated by
        barriers)."""
        qk = (0 if self.QRES else self.QS * self.DK) + self.KS * self.DK
        return max(qk, self.value_offset + self.VK * self.DVS)

    @property
    def smem_words(self) -> int:
        """Workgroup storage in 4-byte words: the staging array (and a resident q tile), two
        elements a word with HALF, the p tile of HALF, partials, the pair exchange."""
        qk_res = self.QS * self.DQ if self.QRES else 0
        red = self.BM * (self.CT // self.G) if self.CT > self.G else 0
        tiles = (self.stage_words + qk_res) // 2 + self.p_words if self.HALF else self.stage_words + qk_res
        return tiles + red + 4 + self.XW


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fast_reduce(plan: Plan, lay: Layout) -> bool:
    """Whether a tiled shader checks its run-time subgroup size for shuffle-only row reductions:
    row groups wider than SGMIN lanes, no wider than the SGFAST lanes the device keeps contiguous."""
    return plan.family is Family.SUBGROUPS and lay.G < lay.CT <= plan.shuffle_only_lanes


# What one invocation of the tiled strategy holds in registers: scores (TM x TN) and output
# accumulators (TM x TD). The shader unrolls both; the heuristics and the tuner's candidates
# use at most 64 and 128 (2026-12), and a hand-made plan far past that (WG=2 over 64x64 tiles:
# 2048 scores) made a 1.4 MB shader that lavapipe compiled for over ten minutes.
MAX_SCORES_PER_INVOCATION = 256
MAX_OUTPUTS_PER_INVOCATION = 512


def layout(plan: Plan, BM: int, BN: int) -> Layout:
    """Map the tile sizes onto invocations; raise LoweringError when they do not fit."""
    WG = plan.workgroup_size
    for name, val in (("BM", BM), ("BN", BN), ("WG", WG), ("TM", plan.rows_per_invocation)):
        if not _pow2(val):
            raise LoweringError(f"tunable {name}={val} must be a power of two")
    for name, val in (("DK", plan.head_chunk), ("DVC", plan.value_columns), ("DVS", plan.value_stage_columns)):
        if val <= 0 or val % 4:
            raise LoweringError(f"tunable {name}={val} must be a positive multiple of 4")
    if plan.unroll < 1:
        raise LoweringError(f"tunable UN={plan.unroll} must be at least 1")
    if plan.prefetch not in (0, 1):
        raise LoweringError(f"tunable PF={plan.prefetch} must be 0 or 1")
    vk = plan.value_block_keys or BN
    if not _pow2(vk) or vk > BN:
        raise LoweringError(f"tunable VK={plan.value_block_keys} must be 0 or a power of two no larger than BN={BN}")
    # row groups of TM rows; the invocations of a row group share its keys and columns
    TM = min(plan.rows_per_invocation, BM)
    RT = min(BM // TM, WG)
    TM = BM // RT
    CT = WG // RT
    if CT > BN:
        raise LoweringError(f"WG={WG} invocations over BM={BM} rows leaves {CT} per row, "
                            f"more than BN={BN} keys", notes=("raise BN or lower WG",))
    TN = BN // CT
    if TM * TN > MAX_SCORES_PER_INVOCATION:
        raise LoweringError(f"WG={WG} invocations over a {BM}x{BN} tile give each {TM * TN} scores to hold (at most "
                            f"{MAX_SCORES_PER_INVOCATION}: the shader unrolls them, and more compiles for minutes)",
                            notes=("raise WG or lower BM or BN",))
    dvs = -(-max(plan.value_stage_columns,
                 CT) // CT) * CT  # each staged value chunk gives every invocation whole columns
    if dvs % 4:
        raise LoweringError(f"DVS={dvs} value columns per stage must be a multiple of 4")
    dvc = -(-max(plan.value_columns, dvs) // dvs) * dvs  # whole value chunks
    TD = dvc // CT
    if TM * TD > MAX_OUTPUTS_PER_INVOCATION:
        raise LoweringError(f"WG={WG} invocations over {BM} rows and DVC={dvc} value columns give each {TM * TD} "
                            f"outputs to hold (at most {MAX_OUTPUTS_PER_INVOCATION}: the shader unrolls them)",
                            notes=("raise WG or lower BM or DVC",))
    G = 1 if plan.family is Family.PORTABLE else min(CT, plan.min_subgroup)
    if plan.resident_query and plan.query_dim % plan.head_chunk:
        raise LoweringError(f"DQ={plan.query_dim} must be a multiple of DK={plan.head_chunk} with QRES")
    pk = plan.p_chunk_keys or BN
    if not _pow2(pk) or not vk <= pk <= BN:
        raise LoweringError(f"tunable PC={plan.p_chunk_keys} must be 0 or a power of two from VK={vk} to BN={BN}")
    if pk % (CT * owned_run(TN)):
        raise LoweringError(f"PC={pk} must be a multiple of {CT * owned_run(TN)}: the keys that the {CT} "
                            f"invocations of a row group own in runs of {owned_run(TN)}")
    # a float16 output (f16 storage) is stored as pairs of columns; with an odd number of
    # columns per invocation per chunk, a pair's second column is its neighbour's (ct ^ 1)
    xw = CT * BM // 2 if plan.storage is not Storage.F32 and (dvs // CT) % 2 else 0
    return Layout(BM, BN, WG, CT, RT, TM, TN, TD, G, plan.resident_query, plan.query_dim, plan.head_chunk, dvc, dvs, vk,
                  pk, xw, plan.storage is Storage.F16A)


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
    SMX: int  # 1: a softmax phase computes each probability once; 2: the dot phase does (shared max);
    # 3: each key's KL lanes (one subgroup's) reduce its dot by shuffles and own its value columns
    LS: bool = False  # SMX 0/1: a key's KL partial dots summed by shuffles: one score per key in sp

    @property
    def NG(self) -> int:
        """SMX=3: lane groups of KL lanes, each streaming every NG-th key of a tile."""
        return self.WG // self.KL

    @property
    def NV(self) -> int:
        """SMX=3: output vec4s a lane owns (columns 4 (part + KL j), j < NV, of the chunk)."""
        return self.CG // self.KL

    @property
    def RV(self) -> int:
        """SMX=3: output vec4s per lane merged per round at the end (workgroup memory of at
        most 512 vec4s)."""
        return max(1, min(self.BM * self.NV, 512 // self.WG))

    @property
    def NK(self) -> int:
        """Keys of a tile one invocation visits in the P.V phase (SMX=3: one lane group)."""
        return self.BN // (self.NG if self.SMX == 3 else self.KG)

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
        return max(self.BN * (1 if self.LS else self.KL) * self.BM, merge if self.merge_in_sp else 0)

    @property
    def smem_words(self) -> int:
        """Workgroup storage in 4-byte words: q tile, partial dots, merge buffers."""
        if self.SMX == 3:  # q tile, each lane group's max and sum per row, a merge round, tile bounds, flag
            return 4 * self.BM * self.D4 + 2 * self.NG * self.BM + 2 * self.BM + 4 * self.RV * self.WG + 3
        smx = self.BN * self.BM + (self.KG * self.BM if self.SMX == 1 else 0) if self.SMX else 0
        o_red = 0 if self.merge_in_sp else 4 * self.KG * self.RC * self.CG
        return (4 * self.BM * self.D4 + self.sp_words + 2 * self.KG * self.BM + 2 * self.BM + o_red + 2 + smx
                + int(self.LS))  # (LS: the lane check's flag)


def stream_layout(plan: Plan, BM: int, BN: int) -> StreamLayout:
    """Map a stream plan onto invocations; raise LoweringError when it does not fit."""
    for name, val in (("BM", BM), ("BN", BN), ("WG", plan.workgroup_size), ("KL", plan.lanes_per_key), ("KC",
                                                                                                        plan.keys_per_step)):
        if not _pow2(val):
            raise LoweringError(f"tunable {name}={val} must be a power of two")
    if plan.vector_width != 4:
        raise LoweringError("the stream strategy reads q, k and v as vec4: it needs VEC=4 "
                            "(head dims that are multiples of 4)")
    if plan.query_dim % (4 * plan.lanes_per_key) or plan.value_columns % 4 or plan.value_columns <= 0:
        raise LoweringError(f"DQ={plan.query_dim} must be a multiple of 4*KL={4 * plan.lanes_per_key} and "
                            f"DVC={plan.value_columns} a positive multiple of 4")
    CG = plan.value_columns // 4
    if not _pow2(CG) or CG > plan.workgroup_size:
        raise LoweringError(f"DVC={plan.value_columns} gives {CG} column groups: it must be a power of two "
                            f"no larger than WG={plan.workgroup_size}")
    KG = plan.workgroup_size // CG
    if plan.softmax_phase == 3:
        _check_lane_groups(plan, BM, BN, CG)
    elif BN % (KG * plan.keys_per_step):
        raise LoweringError(f"BN={BN} keys must split evenly over {KG} key groups x KC={plan.keys_per_step}",
                            notes=("raise BN or lower WG",))
    # rows merged per round: at most one output vec4 per invocation; for packed-GQA tiles of 8
    # rows or more, which take many splits, the merge goes through the partial dots' array and
    # no more rows than it holds, so that the workgroup stays small and more of them share an
    # SM (H200 dec_gqa8: 16.8 -> 8.8 KiB, 2 -> 5 per SM)
    RC = max(1, min(BM, KG, 512 // plan.workgroup_size))
    if BM >= 8:
        RC = max(1, min(RC, BN * plan.lanes_per_key * BM // (4 * KG * CG)))
    if plan.softmax_phase not in (0, 1, 2, 3):
        raise LoweringError(f"tunable SMX={plan.softmax_phase} must be 0, 1, 2 or 3")
    if plan.softmax_phase == 2 and (plan.lanes_per_key != 1 or BN < plan.workgroup_size or plan.workgroup_size < 16):
        raise LoweringError(f"SMX=2 scores each key whole in one invocation: it needs KL=1 (got {plan.lanes_per_key}) "
                            f"and BN={BN} >= WG={plan.workgroup_size} >= 16",
                            notes=("use SMX=0 or 1 for other shapes",))
    if plan.lane_sum not in (0, 1):
        raise LoweringError(f"tunable LS={plan.lane_sum} must be 0 or 1")
    if plan.lane_sum and (plan.family is not Family.SUBGROUPS or plan.softmax_phase not in (0, 1)
                          or plan.lanes_per_key < 2 or BN * plan.lanes_per_key % plan.workgroup_size):
        raise LoweringError(f"LS=1 sums a key's partial dots by subgroup shuffles in the dot phase: it needs the "
                            f"subgroups family, SMX=0 or 1, KL >= 2 and BN x KL = {BN * plan.lanes_per_key} a "
                            f"multiple of WG={plan.workgroup_size} (got {plan.family.value}, SMX={plan.softmax_phase}, "
                            f"KL={plan.lanes_per_key})")
    if plan.int_dot not in (0, 1):
        raise LoweringError(f"tunable IDP={plan.int_dot} must be 0 or 1")
    if plan.int_dot and plan.softmax_phase != 3:
        raise LoweringError(f"IDP=1 takes integer dots in lane groups: it needs SMX=3 (got SMX={plan.softmax_phase})")
    return StreamLayout(BM, BN, plan.workgroup_size, plan.lanes_per_key, plan.keys_per_step, plan.query_dim // 4, CG,
                        KG, RC, plan.softmax_phase, bool(plan.lane_sum))


# SMX=3 holds BM x NV output vec4s per lane in registers: at most this many
LANE_GROUP_MAX_VEC4 = 16


def _check_lane_groups(plan: Plan, BM: int, BN: int, CG: int) -> None:
    """Raise LoweringError unless an SMX=3 stream plan fits: subgroups, KL dividing the
    column groups, whole steps of KC keys per lane group, registers for the outputs."""
    kl, wg, kc = plan.lanes_per_key, plan.workgroup_size, plan.keys_per_step
    if plan.family is not Family.SUBGROUPS:
        raise LoweringError("SMX=3 reduces each key's dot across its KL lanes by subgroup shuffles: "
                            "use the subgroups family", notes=("use SMX=0, 1 or 2 in the portable family",))
    if kl > 32 or CG % kl:
        raise LoweringError(f"SMX=3: KL={kl} lanes per key must divide the {CG} output vec4s (DVC/4) "
                            "and be at most 32")
    if BN % (wg // kl * kc):
        raise LoweringError(f"SMX=3: BN={BN} keys must split evenly over {wg // kl} lane groups x KC={kc}",
                            notes=("raise BN or lower WG",))
    if BM * (CG // kl) > LANE_GROUP_MAX_VEC4:
        raise LoweringError(f"SMX=3 keeps BM x DVC/(4 KL) = {BM * (CG // kl)} output vec4s per lane in registers; "
                            f"at most {LANE_GROUP_MAX_VEC4}", notes=("raise KL or lower DVC",))


def check_rows(plan: Plan) -> None:
    """Raise LoweringError unless a rows-strategy plan is consistent (see lowering/rows.py):
    its query row (DQ) and value columns (DVC) are held in registers in vectors of VEC."""
    vec = 4 if plan.vector_width == 4 else 1
    if min(plan.query_dim, plan.value_columns, plan.keys_per_step) <= 0 \
            or plan.query_dim % vec or plan.value_columns % vec:
        raise LoweringError(f"the rows strategy needs KC={plan.keys_per_step} >= 1 and DQ={plan.query_dim}, "
                            f"DVC={plan.value_columns} positive multiples of VEC={plan.vector_width}")


def check_lanes(plan: Plan, BM: int) -> None:
    """Raise LoweringError unless a lanes-strategy plan is consistent (see lowering/lanes.py)."""
    if plan.family is not Family.SUBGROUPS:
        raise LoweringError("the lanes strategy shares keys by subgroupBroadcast: use the subgroups family")
    if plan.storage is Storage.F16A:
        raise LoweringError("f16 tiles (F16A) are a tiled-strategy variant")
    if plan.vector_width != 4 or min(plan.query_dim, plan.value_columns) <= 0 \
            or plan.query_dim % 4 or plan.value_columns % 4:
        raise LoweringError(f"the lanes strategy reads q, k and v as vec4: it needs VEC=4 and DQ={plan.query_dim}, "
                            f"DVC={plan.value_columns} positive multiples of 4")
    for name, val in (("BM", BM), ("TM", plan.rows_per_invocation), ("SGB", plan.subgroup_width)):
        if not _pow2(val):
            raise LoweringError(f"tunable {name}={val} must be a power of two")
    if plan.subgroup_width < 4 or BM // plan.rows_per_invocation < plan.subgroup_width:
        raise LoweringError(f"SGB={plan.subgroup_width}: the lanes strategy needs a subgroup size of at least 4 and "
                            f"whole subgroups in a workgroup of BM/TM={BM // plan.rows_per_invocation} invocations")
