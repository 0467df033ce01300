"""The template family: Triton source text for one `KernelSpec`.

One template, rendered per specialisation.  Widths, the rotary layout, the GQA group, dtypes and
which masks exist are written into the text as literals, so each generated kernel carries only
the code its signature needs (no constexpr branching at run time).

A first small kernel turns the block deltas into one cos and one sin per (sequence, block,
frequency), with the exact float64 reduction of `gaugecompile.rope` (O(blocks * F) work, and no
float64 tensor temporaries).  The attention kernel (one program per (sequence, KV head, row
tile[, KV split])) walks the sequence's table entries (entry j: slots [0, count) of its block, its
first token at view position start) and skips the empty ones.  Per entry it
loads one cos and one sin per frequency and rotates the query held in registers by R(-delta):
two half-vectors (rotate-half pairs (i, i + F)) or even/odd lanes (interleaved pairs (2i, 2i + 1));
lanes past the rotary dim are used as they are.  The rotated query meets the stored keys in three
dot products (first lanes, second lanes, pass-through lanes), followed by an online softmax in
base 2.  All query heads of a KV head's group are rows of the same program, so each key/value
block is read once per group.
"""

from __future__ import annotations

from string import Template

from gaugecompile.rope import INV_TWO_PI, TWO_PI_PARTS

from .spec import KernelSpec, tile

__all__ = ["render"]

_TL_DTYPE = {"float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32", "float64": "tl.float64"}

_MAIN = Template('''\
@triton.jit
def $name(
    Q, K, V, Table, Cos, Sin, Lens, Counts, Starts, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kn, stride_kt, stride_kh, stride_kd,
    stride_vn, stride_vt, stride_vh, stride_vd,
    stride_tb, stride_tj, stride_cb, stride_cj,
    stride_ob, stride_oh, stride_om, stride_os, stride_od,
    stride_lb, stride_lh, stride_lm, stride_ls,
    num_kv_heads, q_len, num_entries, blocks_per_split, qk_scale, window, Cap,
):
    """$doc"""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kvh = pid_bh % num_kv_heads
    rows = pid_m * $block_m + tl.arange(0, $block_m)
$rows
    head = kvh * $group + rows % $group
    length = tl.load(Lens + b).to(tl.int32)
$cap_load

    # Query tile in registers: first lanes, second lanes (the rotary pairs), pass-through lanes.
    f = tl.arange(0, $block_f)
    f_ok = f < $half
    q_rows = Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + q_idx[:, None] * stride_qm
    q_mask = row_ok[:, None] & f_ok[None, :]
    q1 = tl.load(q_rows + ($off1)[None, :] * stride_qd, mask=q_mask, other=0.0).to($acc)
    q2 = tl.load(q_rows + ($off2)[None, :] * stride_qd, mask=q_mask, other=0.0).to($acc)
$q_rest
    d = tl.arange(0, $block_d)
    d_ok = d < $head_dim

    m_i = tl.full([$block_m], float("-inf"), $acc)
    l_i = tl.zeros([$block_m], $acc)
    acc = tl.zeros([$block_m, $block_d], $acc)

    n_blocks = num_entries
$causal_bound
$split_range
    for j in range(j_start, j_end):
        n_j = tl.load(Counts + b * stride_tb + j * stride_tj).to(tl.int32)
        tok0 = tl.load(Starts + b * stride_tb + j * stride_tj).to(tl.int32)
        if (n_j > 0) & (tok0 <= k_last)$window_skip:
            phys = tl.load(Table + b * stride_tb + j * stride_tj).to(tl.int64)
            cos = tl.load(Cos + b * stride_cb + j * stride_cj + f, mask=f_ok, other=0.0)[None, :]
            sin = tl.load(Sin + b * stride_cb + j * stride_cj + f, mask=f_ok, other=0.0)[None, :]
            # R(-delta) applied to the query, once per entry.
            q1r = (q1 * cos + q2 * sin).to($op)
            q2r = (q2 * cos - q1 * sin).to($op)
            k_blk = K + phys * stride_kn + kvh * stride_kh
            v_blk = V + phys * stride_vn + kvh * stride_vh
$chunk_loop
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptr = Out + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + q_idx[:, None] * stride_om
    tl.store(o_ptr + pid_s * stride_os + d[None, :] * stride_od, o.to($out_dtype), mask=row_ok[:, None] & d_ok[None, :])
    l_ptr = Lse + b * stride_lb + head * stride_lh + q_idx * stride_lm + pid_s * stride_ls
    tl.store(l_ptr, lse.to($lse_dtype), mask=row_ok)
''')

_CHUNK = Template('''\
t = $t0 + tl.arange(0, $block_n)
kpos = tok0 + t
t_ok = t < n_j
k_mask = t_ok[:, None] & f_ok[None, :]
k1 = tl.load(k_blk + t[:, None] * stride_kt + ($off1)[None, :] * stride_kd, mask=k_mask, other=0.0)
k2 = tl.load(k_blk + t[:, None] * stride_kt + ($off2)[None, :] * stride_kd, mask=k_mask, other=0.0)
s = $dot_q1 + $dot_q2
$k_rest
s = s * qk_scale
$softcap
s = tl.where($valid, s, float("-inf"))
m_new = tl.maximum(m_i, tl.max(s, 1))
m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
alpha = tl.exp2(m_i - m_safe)
p = tl.exp2(s - m_safe[:, None])
l_i = l_i * alpha + tl.sum(p, 1)
v = tl.load(v_blk + t[:, None] * stride_vt + d[None, :] * stride_vd, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
acc = acc * alpha[:, None] + $dot_pv
m_i = m_new
''')

_ANGLES = Template('''\
@triton.jit
def _reduce(p):
    """p mod 2*pi for exact float64 p (Cody-Waite, the constants of gaugecompile.rope)."""
    k = tl.floor(p * $inv_two_pi + 0.5)
    return ((p - k * $c1) - k * $c2) - k * $c3


@triton.jit
def $name(BlockDelta, ThetaHi, ThetaLo, Cos, Sin, n_rows):
    """cos/sin of delta * inv_freq for 32 (sequence, block) rows, reduced exactly as gaugecompile.rope does:
    the delta split into 16-bit halves, the frequency into Veltkamp halves (ThetaHi + ThetaLo), every
    partial product reduced modulo 2*pi in float64."""
    rows = tl.program_id(0).to(tl.int64) * 32 + tl.arange(0, 32)
    rows_ok = rows < n_rows
    f = tl.arange(0, $block_f)
    f_ok = f < $half
    delta = tl.load(BlockDelta + rows, mask=rows_ok, other=0).to(tl.int64)
    t_hi = tl.load(ThetaHi + f, mask=f_ok, other=0.0)[None, :]
    t_lo = tl.load(ThetaLo + f, mask=f_ok, other=0.0)[None, :]
    d_hi = ((delta >> 16) << 16).to(tl.float64)[:, None]
    d_lo = (delta & 0xFFFF).to(tl.float64)[:, None]
    angle = _reduce(d_hi * t_hi) + _reduce(d_hi * t_lo) + _reduce(d_lo * t_hi) + _reduce(d_lo * t_lo)
    angle = _reduce(angle)
    offs = rows[:, None] * $half + f[None, :]
    mask = rows_ok[:, None] & f_ok[None, :]
    tl.store(Cos + offs, tl.cos(angle).to($acc), mask=mask)
    tl.store(Sin + offs, tl.sin(angle).to($acc), mask=mask)
''')

_MERGE = Template('''\
@triton.jit
def $name(Part, PartLse, Out, Lse, num_splits, BLOCK_S: tl.constexpr):
    """Log-sum-exp merge of the per-split partial results of one (sequence, head, query) row."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    d = tl.arange(0, $block_d)
    d_ok = d < $head_dim
    lse_s = tl.load(PartLse + row * num_splits + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    w = tl.where(s_ok, tl.exp(lse_s - m), 0.0)
    total = tl.sum(w, 0)
    part = tl.load(Part + (row * num_splits + s[:, None]) * $head_dim + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                   other=0.0)
    o = tl.sum(part * w[:, None], 0) / total
    tl.store(Out + row * $head_dim + d, o.to($out_dtype), mask=d_ok)
    tl.store(Lse + row, m + tl.log(total))
''')


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())


def _dot(a: str, b_rows: str, acc: str, op: str, io: str) -> str:
    """a [M, K] . b_rows[N, K]^T as source text (b_rows loaded in `io`, multiplied in `op`)."""
    b = b_rows if op == io else f"{b_rows}.to({op})"
    if acc == "tl.float64":  # no fp64 tensor-core path needed: broadcast and reduce
        return f"tl.sum({a}[:, None, :] * {b}[None, :, :], 2)"
    precision = ', input_precision="ieee"' if op == "tl.float32" else ""  # no TF32: float32 stays exact
    return f"tl.dot({a}, tl.trans({b}){precision})"


def render(spec: KernelSpec, *, interpret: bool = False) -> str:
    """Triton source (a module) for `spec`: the attention kernel, plus the merge kernel when split.

    `interpret`: source for Triton's CPU interpreter, which has no bfloat16 arithmetic; there the
    bfloat16 kernel feeds its matmuls float32 operands (loads and stores stay bfloat16).
    """
    half = spec.rotary_dim // 2
    rest = spec.head_dim - spec.rotary_dim
    acc = "tl.float64" if spec.dtype == "float64" else "tl.float32"
    io = _TL_DTYPE[spec.dtype]
    op = "tl.float32" if (interpret and spec.dtype == "bfloat16") else io  # matmul operand dtype
    off1, off2 = ("2 * f", "2 * f + 1") if spec.interleaved else ("f", f"f + {half}")
    block_d = tile(spec.head_dim)
    block_r = tile(rest) if rest else 0

    if spec.q_kind == "decode":
        rows = f"    q_idx = tl.zeros_like(rows)\n    row_ok = rows < {spec.group}"
    else:
        rows = f"    q_idx = rows // {spec.group}\n    row_ok = q_idx < q_len"
    q_rest = ""
    if rest:
        q_rest = _indent(
            f"r = {spec.rotary_dim} + tl.arange(0, {block_r})\n"
            f"r_ok = r < {spec.head_dim}\n"
            f"q3 = tl.load(q_rows + r[None, :] * stride_qd, mask=row_ok[:, None] & r_ok[None, :], other=0.0).to({op})",
            4,
        )
    causal_bound = _indent("k_last = length - 1  # the last view position any query of the tile sees", 4)
    valid = "t_ok[None, :]"
    if spec.causal:
        causal_bound = _indent(
            "# Bottom-right causal: query token i sits at view position length - q_len + i.\n"
            "q_pos = length - q_len + q_idx\n"
            f"q_last = tl.minimum(q_len - 1, (pid_m * {spec.block_m} + {spec.block_m - 1}) // {spec.group})\n"
            "k_last = length - q_len + q_last",
            4,
        )
        valid = "t_ok[None, :] & (kpos[None, :] <= q_pos[:, None])"
    window_skip = ""
    if spec.windowed:
        first_row = "0" if spec.q_kind == "decode" else f"(pid_m * {spec.block_m}) // {spec.group}"
        causal_bound += "\n" + _indent(
            "# Sliding window: query token i sees the view positions after q_pos - window.\n"
            + ("" if spec.causal else "q_pos = length - q_len + q_idx\n")
            + f"k_first = length - q_len + {first_row} - window + 1  # the first position any query of the tile sees",
            4,
        )
        window_skip = " & (tok0 + n_j > k_first)"
        valid += " & (kpos[None, :] > q_pos[:, None] - window)"
    if spec.split_kv:
        split_range = _indent(
            "j_start = pid_s * blocks_per_split\nj_end = tl.minimum(n_blocks, j_start + blocks_per_split)", 4)
    else:
        split_range = _indent("j_start = 0\nj_end = n_blocks", 4)

    k_rest = ""
    if rest:
        k_rest = (
            "k3 = tl.load(k_blk + t[:, None] * stride_kt + r[None, :] * stride_kd, mask=t_ok[:, None] & r_ok[None, :],"
            " other=0.0)\n"
            f"s += {_dot('q3', 'k3', acc, op, io)}\n"
        )
    if acc == "tl.float64":
        dot_pv = "tl.sum(p[:, :, None] * v[None, :, :], 1)"
    else:
        precision = ', input_precision="ieee"' if op == "tl.float32" else ""
        v = "v" if op == io else f"v.to({op})"
        dot_pv = f"tl.dot(p.to({op}), {v}{precision})"
    softcap = cap_load = ""
    if spec.softcapped:  # Cap holds c * log2(e) in the accumulation dtype (a scalar argument would be float32)
        cap_load = "    softcap2 = tl.load(Cap)"
        # c * tanh(s / c) in base 2 (s is scale * log2(e) * q.k): softcap2 = c * log2(e); tanh from one exp,
        # exp(-2|x|) <= 1, so it neither overflows nor loses the sign
        softcap = ("x = s / softcap2\ne2 = tl.exp(-2.0 * tl.abs(x))\n"
                   "s = softcap2 * tl.where(x < 0, -1.0, 1.0) * (1.0 - e2) / (1.0 + e2)")
    chunks = []
    for t0 in range(0, spec.block_size, spec.block_n):
        chunks.append(_CHUNK.substitute(
            t0=t0, block_n=spec.block_n, off1=off1, off2=off2,
            dot_q1=_dot("q1r", "k1", acc, op, io), dot_q2=_dot("q2r", "k2", acc, op, io),
            k_rest=k_rest.rstrip("\n"), valid=valid, dot_pv=dot_pv, softcap=softcap,
        ))
    chunk_loop = _indent("\n".join(chunks), 12)

    name = f"rqa_{spec.key}"
    doc = (f"Rotated-query attention, generated for {spec}. Pool blocks of {spec.block_size} tokens are walked in "
           f"{len(chunks)} chunk(s) of {spec.block_n} keys.")
    main = _MAIN.substitute(
        name=name, doc=doc, block_m=spec.block_m, rows=rows, group=spec.group, block_f=tile(half), half=half,
        off1=off1, off2=off2, acc=acc, q_rest=q_rest, block_d=block_d, head_dim=spec.head_dim,
        block_size=spec.block_size, causal_bound=causal_bound, window_skip=window_skip, split_range=split_range, op=op,
        cap_load=cap_load,
        chunk_loop=chunk_loop, out_dtype=acc if spec.split_kv else io, lse_dtype=acc,
    )
    header = (f'"""Generated by gaugecompile.codegen for {spec.key}. Do not edit: regenerated from the template."""\n\n'
              "import triton\nimport triton.language as tl\n\n\n")
    angles = _ANGLES.substitute(name=f"angles_{spec.key}", block_f=tile(half), half=half, acc=acc,
                                inv_two_pi=repr(INV_TWO_PI), c1=repr(TWO_PI_PARTS[0]), c2=repr(TWO_PI_PARTS[1]),
                                c3=repr(TWO_PI_PARTS[2]))
    source = header + angles + "\n\n" + main
    if spec.split_kv:
        source += "\n\n" + _MERGE.substitute(name=f"merge_{spec.key}", block_d=block_d, head_dim=spec.head_dim,
                                             out_dtype=io)
    return source
