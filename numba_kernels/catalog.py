"""Every kernel of the package at the signature the backend launches it with, and its launches in a decode step.

``numba_kernels.inspect`` compiles each ``Kernel`` here for a GPU
architecture without a GPU; ``roofline`` prices each of its ``launches`` on a
GPT-2 decode step. A kernel's ``launches(config, batch, context)`` gives
(what, Work) pairs for one decode step's layer (or step, for those run once):
bytes, FLOPs, blocks, the bytes one block has in flight, and the longest
serial sum. The in-flight figures follow each kernel's code: where a loop
issues its global loads one iteration at a time, the PTX shows the unrolling
(4 for the old GEMV's k loop), and that is what a thread has in flight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from numba import types

from numba_kernels.roofline import Work
from reference.config import GPTConfig

F4 = 4  # bytes of a float32
UNROLL = 4  # iterations NVVM unrolls a loop of unknown trip count into (seen in the PTX)


def f32(ndim: int):
    return types.Array(types.float32, ndim, "C")


def i32(ndim: int = 1):
    return types.Array(types.int32, ndim, "C")


Launches = Callable[[GPTConfig, int, int], list[tuple[str, Work]]]


@dataclass(frozen=True, slots=True)
class Kernel:
    name: str
    source: str  # file and version, as in the file's header
    compiled: Callable[[], object]  # -> the cuda.jit kernel (a factory's, for its parameters)
    signature: tuple
    threads: int  # block size of its GPT-2 launch
    dynamic_shared: Callable[[GPTConfig], int] = lambda c: 0
    reduction: bool = False  # a GEMM or attention sum: it must be summed with fma.rn.f32
    launches: Launches | None = None
    tags: tuple[str, ...] = field(default=())  # "old" (replaced in the backend), "new", or none


def linears(c: GPTConfig) -> list[tuple[str, int, int]]:
    """(name, N, K) of a block's four linear layers and the LM head; w is [K, N]."""
    return [("c_attn", 3 * c.n_embd, c.n_embd), ("attn_proj", c.n_embd, c.n_embd), ("c_fc", c.d_mlp, c.n_embd),
            ("mlp_proj", c.n_embd, c.d_mlp), ("lm_head", c.vocab_size, c.n_embd)]  # fmt: skip


def gemm_work(m: int, n: int, k: int, blocks: int, inflight: float, weight_reads: int = 1) -> Work:
    return Work(F4 * (weight_reads * k * n + m * k + m * n + n), 2.0 * m * n * k, blocks, inflight, k)


def gemm_launches(work: Callable[[int, int, int], Work], layers: tuple[str, ...] = ()) -> Launches:
    """The GEMM's launches on a block's linears and the head, or on ``layers`` only (a fused epilogue's)."""

    def launches(c: GPTConfig, batch: int, context: int) -> list[tuple[str, Work]]:
        return [(f"{name} {batch}x{n}x{k}", work(batch, n, k)) for name, n, k in linears(c)
                if not layers or name in layers]

    return launches


EPILOGUE_LAYERS = {"bias": (), "kv": ("c_attn",), "residual": ("attn_proj", "mlp_proj"), "gelu": ("c_fc",)}


def gemm_sig():
    return (f32(2), f32(2), f32(1), f32(2))


# ------------------------------------------------------------------ the kernels


def gemm_kernels() -> list[Kernel]:
    from numba_kernels import gemm

    def naive(m, n, k):  # grid (N / 128, M): w read once per row; 4 loads of w in flight a thread
        return gemm_work(m, n, k, math.ceil(n / 128) * m, 128 * UNROLL * F4, weight_reads=m)

    def tiled(bm, bn, bk, tm, tn):  # a block loads a BK x BN tile of w and BM x BK of x, then sums
        def work(m, n, k):
            blocks = math.ceil(n / bn) * math.ceil(m / bm)
            return gemm_work(m, n, k, blocks, F4 * bk * (bn + bm), weight_reads=math.ceil(m / bm))

        return work

    def gemv(threads, rows):  # one column a thread, 4 loads of w in flight (the k loop unrolled 4x)
        def work(m, n, k):
            blocks = math.ceil(n / threads) * math.ceil(m / rows)
            return gemm_work(m, n, k, blocks, threads * UNROLL * F4, weight_reads=math.ceil(m / rows))

        return work

    found = [Kernel("gemm naive", "gemm.py v1", lambda: gemm.gemm_naive, gemm_sig(), 128, reduction=True,
                    launches=gemm_launches(naive))]  # fmt: skip
    for tile in gemm.TILES:
        tags = ("old",) if tile == (32, 32, 16, 4, 4) else ()
        found.append(Kernel(f"gemm tiled {'x'.join(map(str, tile))}", "gemm.py v2",
                            lambda t=tile: gemm.tiled_kernel(*t), gemm_sig(), (tile[0] // tile[3]) * (tile[1] // tile[4]),
                            reduction=True, launches=gemm_launches(tiled(*tile)), tags=tags))  # fmt: skip
    for threads, rows in gemm.GEMV_PARAMS:
        tags = ("old",) if threads == 64 and rows in (1, 8) else ()
        found.append(Kernel(f"gemm gemv {threads}x{rows}", "gemm.py v3", lambda r=rows: gemm.gemv_kernel(r), gemm_sig(),
                            threads, reduction=True, launches=gemm_launches(gemv(threads, rows)), tags=tags))  # fmt: skip
    found.append(Kernel("gemm prefetch 128x128x8x8x8", "gemm_prefetch.py v5", lambda: gemm.prefetch_kernel(), gemm_sig(),
                        256, reduction=True, launches=gemm_launches(tiled(128, 128, 8, 8, 8)), tags=("new",)))  # fmt: skip
    return found + staged_kernels()


def staged_kernels() -> list[Kernel]:
    """Version 4 at every tuning candidate (plain store), and the decode default's fused epilogues."""
    from numba_kernels import gemm, gemm_staged

    def staged(threads, bn, rows, kc):  # all threads stage a chunk of w and of x before the chunk before is summed
        def work(m, n, k):
            blocks = math.ceil(n / bn) * math.ceil(m / rows)
            return gemm_work(m, n, k, blocks, F4 * kc * (bn + rows), weight_reads=math.ceil(m / rows))

        return work

    kv = types.Tuple((f32(4), f32(4), i32(), i32(), i32()))
    found = []
    for params in gemm.STAGED_PARAMS:
        threads, bn, rows, kc = params
        name = f"gemm staged {'x'.join(map(str, params))}"
        default = threads == 128 and bn == 8 and kc == (512 if rows <= 2 else 256)
        for epilogue in ("bias", "kv", "residual", "gelu") if default and rows in (1, 8) else ("bias",):
            found.append(Kernel(name + ("" if epilogue == "bias" else f" +{epilogue}"), "gemm_staged.py v4",
                                lambda p=params, e=epilogue: gemm_staged.staged_kernel(*p, e),
                                (*gemm_sig(), kv if epilogue == "kv" else types.Tuple(())), threads, reduction=True,
                                launches=gemm_launches(staged(*params), EPILOGUE_LAYERS[epilogue]),
                                tags=("new",) if default else ()))  # fmt: skip
    return found


def attention_kernels() -> list[Kernel]:
    from numba_kernels import attention as at
    from numba_kernels import attention_chunked as ac

    def v1(c: GPTConfig, batch: int, context: int) -> list[tuple[str, Work]]:
        t = at.attention_threads(c.n_ctx)
        groups = max(1, t // c.head_dim)
        chain = math.ceil(context / t) * c.head_dim + math.ceil(context / groups) + 3 * t  # scores, V, serial sums
        n_bytes = F4 * batch * (2 * c.n_head * context * c.head_dim + 2 * c.n_embd)
        return [(f"{batch} rows x {context} positions", Work(n_bytes, 4.0 * batch * c.n_head * context * c.head_dim,
                                                            batch * c.n_head, t * UNROLL * F4, chain))]  # fmt: skip

    def store(c: GPTConfig, batch: int, context: int) -> list[tuple[str, Work]]:
        return [(f"{batch} rows", Work(F4 * batch * 4 * c.n_embd, 0.0, batch, 256 * UNROLL * F4, 0))]

    def v2(c: GPTConfig, batch: int, context: int) -> list[tuple[str, Work]]:
        chunk = ac.chunk_size(c.head_dim)
        chunks = math.ceil(context / chunk)
        partials = F4 * batch * c.n_head * chunks * (c.head_dim + 2)
        kv_bytes = F4 * batch * 2 * c.n_head * context * c.head_dim
        chain = c.head_dim + 2 * int(math.log2(chunk)) + chunk  # a score, two trees, the weighted V
        flops = 4.0 * batch * c.n_head * context * c.head_dim
        return [(f"{batch} rows x {context} positions",
                 Work(kv_bytes + partials, flops, batch * c.n_head * chunks, 2 * F4 * chunk * c.head_dim, chain))]

    def combine(c: GPTConfig, batch: int, context: int) -> list[tuple[str, Work]]:
        chunks = math.ceil(context / ac.chunk_size(c.head_dim))
        n_bytes = F4 * batch * (c.n_head * chunks * (c.head_dim + 2) + c.n_embd)
        inflight = F4 * chunks * (c.head_dim + 2)  # a block loads all its partials at once
        return [(f"{batch} rows x {chunks} chunks", Work(n_bytes, 0.0, batch * c.n_head, inflight, 2 * chunks))]

    qkv_sig = (f32(2), f32(4), f32(4), i32(), i32())
    return [
        Kernel("store K, V", "attention.py store", lambda: at.store_kv_kernel, (*qkv_sig, i32()), 256,
               launches=store, tags=("old",)),
        Kernel("decode attention", "attention.py v1", lambda: at.attention_kernel, (*qkv_sig, types.float32, f32(2)),
               128, dynamic_shared=lambda c: F4 * c.n_ctx, reduction=True, launches=v1, tags=("old",)),
        Kernel("attention chunks", "attention_chunked.py v2", lambda: ac.chunk_kernel(64, ac.THREADS),
               (*qkv_sig, types.float32, f32(4)), ac.THREADS, reduction=True, launches=v2, tags=("new",)),
        Kernel("attention combine", "attention_chunked.py v2", lambda: ac.combine_kernel(64, 16), (f32(4), i32(), f32(2)),
               64, reduction=True, launches=combine, tags=("new",)),
    ]  # fmt: skip


def elementwise_kernels() -> list[Kernel]:
    from numba_kernels import elementwise as ew
    from numba_kernels import shuffle

    def per_row(reads: int, writes: int, width: Callable[[GPTConfig], int], threads: int, passes: int = 1,
                tree: bool = False) -> Launches:
        def launches(c: GPTConfig, batch: int, context: int) -> list[tuple[str, Work]]:
            w = width(c)
            n_bytes = F4 * batch * w * (reads + writes)
            if passes == 1:  # a thread an element
                work = Work(n_bytes, 0.0, batch * math.ceil(w / threads), threads * F4 * reads, 1)
            else:  # a block a row, each pass loading the whole row at once, then two block sums of ``threads``
                sums = 2 * (int(math.log2(threads)) if tree else threads)  # tree levels, or thread 0's serial adds
                work = Work(n_bytes, 0.0, batch, F4 * w, passes * math.ceil(w / threads) + sums)
            return [(f"{batch}x{w}", work)]

        return launches

    def move(c: GPTConfig, batch: int, context: int) -> list[tuple[str, Work]]:
        floats = context // 2 * c.head_dim  # one pair moving half the context, every layer and head
        blocks = math.ceil(floats / shuffle.CHUNK) * c.n_layer * c.n_head
        n_bytes = 2 * 2 * F4 * c.n_layer * c.n_head * floats
        return [(f"1 pair x {context // 2} positions", Work(n_bytes, 0.0, blocks, shuffle.THREADS * UNROLL * 2 * F4, 0))]

    c_width, mlp_width = (lambda c: c.n_embd), (lambda c: c.d_mlp)
    return [
        Kernel("embedding", "elementwise.py", lambda: ew.embed_kernel, (i32(), i32(), f32(2), f32(2), f32(2)), 128,
               launches=per_row(2, 1, c_width, 128), tags=("old", "new")),
        Kernel("layer norm", "elementwise.py v1", lambda: ew.layer_norm_kernel,
               (f32(2), f32(1), f32(1), types.float32, f32(2)), 256, launches=per_row(3, 1, c_width, 256, passes=3),
               tags=("old",)),
        Kernel("layer norm tree", "elementwise.py v2", lambda: ew.layer_norm_tree_kernel,
               (f32(2), f32(1), f32(1), types.float32, f32(2)), 256,
               launches=per_row(3, 1, c_width, 256, passes=3, tree=True), tags=("new",)),
        Kernel("GELU", "elementwise.py", lambda: ew.gelu_kernel, (f32(2), f32(2)), 128,
               launches=per_row(1, 1, mlp_width, 128), tags=("old",)),
        Kernel("residual add", "elementwise.py", lambda: ew.residual_add_kernel, (f32(2), f32(2)), 128,
               launches=per_row(2, 1, c_width, 128), tags=("old",)),
        Kernel("take rows", "elementwise.py", lambda: ew.take_rows_kernel, (f32(2), i32(), f32(2)), 128,
               launches=per_row(1, 1, c_width, 128), tags=("old", "new")),
        Kernel("move slots", "shuffle.py", lambda: shuffle.move_slots_kernel,
               (f32(4), f32(4), i32(), i32(), i32(), i32(), types.int64), 256, launches=move, tags=("old", "new")),
    ]  # fmt: skip


def kernels() -> list[Kernel]:
    """Every kernel of the package, old versions and new."""
    return gemm_kernels() + attention_kernels() + elementwise_kernels()


def step_plan(version: str, c: GPTConfig, batch: int) -> list[tuple[str, str | None, int]]:
    """The launches of one decode step: (kernel name, which linear or None, times).

    old: v3 GEMV (tiled above 8 rows), separate K/V store, residual adds and GELU, attention v1, layer norm v1.
    new: the backend now: layer norm v2 (tree sums), v4 staged GEMV with fused epilogues
    (tiled and the separate kernels above 8 rows),
    attention v2 (chunks, then combine)."""
    layers, rows = c.n_layer, 1 << max(0, batch - 1).bit_length()
    norm = "layer norm tree" if version == "new" else "layer norm"
    ends = [("take rows", None, 1), (norm, None, 2 * layers + 1), ("embedding", None, 1)]
    attention = [("attention chunks", None, layers), ("attention combine", None, layers)]
    if version == "new" and batch <= 8:
        gemm = f"gemm staged 128x8x{rows}x{512 if rows <= 2 else 256}"
        fused = (" +kv", " +residual", " +gelu", " +residual") if rows in (1, 8) else ("",) * 4
        linears = [(gemm + f, part, layers) for f, part in zip(fused, ("c_attn", "attn_proj", "c_fc", "mlp_proj"))]
        separate = [] if rows in (1, 8) else [("store K, V", None, layers), ("residual add", None, 2 * layers),
                                               ("GELU", None, layers)]  # fmt: skip
        return ends + linears + [(gemm, "lm_head", 1)] + attention + separate
    gemm = f"gemm gemv 64x{rows}" if batch <= 8 else "gemm tiled 32x32x16x4x4"
    linears = [(gemm, part, layers) for part in ("c_attn", "attn_proj", "c_fc", "mlp_proj")] + [(gemm, "lm_head", 1)]
    attention = attention if version == "new" else [("decode attention", None, layers)]
    return ends + linears + attention + [("store K, V", None, layers), ("residual add", None, 2 * layers),
                                         ("GELU", None, layers)]  # fmt: skip
