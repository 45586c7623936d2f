"""Double-backward kernel of prefix attention: the VJP of the attention backward, by recomputation.

The backward (kernels/attention_bwd.py) maps ``(q, k, v, dO, dlse)`` to ``(dQ, dK, dV)``; ``O`` and ``lse``
are the forward's outputs, i.e. functions of ``q, k, v``. This kernel takes cotangents ``(gQ, gK, gV)`` of
``(dQ, dK, dV)`` and returns the gradients of ``<gQ, dQ> + <gK, dK> + <gV, dV>`` with respect to ``q, k, v,
dO, dlse``, the dependence through ``O`` and ``lse`` included. Per pair ``(i, j)`` (``P`` the softmax,
``z`` the dropout keep mask, ``r = 1/(1-p)``, ``delta_i = dO_i.O_i - dlse_i``, ``do_i = dO_i.O_i``)::

    dP_ij = z_ij r dO_i.v_j          dS_ij = P_ij (dP_ij - delta_i)        (the first-order quantities)
    B_ij  = scale (gQ_i.k_j + q_i.gK_j)          C_ij = z_ij r dO_i.gV_j
    beta_i = sum_j P_ij B_ij                     phi_i = sum_j P_ij ((dP_ij - delta_i) B_ij + C_ij)
    psi_i  = phi_i - beta_i dlse_i
    G_ij  = P_ij ((dP_ij - delta_i)(B_ij - beta_i) + C_ij - psi_i)     (the gradient w.r.t. the scores)
    W_ij  = z_ij r P_ij (B_ij - beta_i)

    grad q_i   = scale sum_j (dS_ij gK_j + G_ij k_j)
    grad k_j   = scale sum_i (dS_ij gQ_i + G_ij q_i)        (summed over the query heads of a KV head)
    grad v_j   = sum_i W_ij dO_i
    grad dO_i  = sum_j (W_ij v_j + z_ij r P_ij gV_j)
    grad dlse_i = beta_i

Soft-capping (``SOFTCAP = c > 0``; natural score ``r = scale q.k``, capped ``s = c t`` with ``t = tanh(r /
c)``, slope ``s' = 1 - t^2``, curvature ``s'' = -2 t s' / c``): the backward's ``dS`` is multiplied by ``s'``
on its way to q and k, so the objective is the sum above with ``B`` replaced by ``B~ = s' B`` (both taken
in the capped scores' units). Every formula above holds with ``B~`` for ``B`` (beta, psi, G, W, grad v,
grad dO, grad dlse), and the q/k gradients pick up the cap's chain rule twice: G reaches ``r`` as ``G s'``,
and ``B~``'s own dependence on ``r`` adds ``dS B s'' = -(2 t / c) dS B~``::

    grad q_i = scale sum_j (dS_ij s'_ij gK_j + (G_ij s'_ij - (2 t_ij / c) dS_ij B~_ij) k_j)
    grad k_j = scale sum_i (dS_ij s'_ij gQ_i + (G_ij s'_ij - (2 t_ij / c) dS_ij B~_ij) q_i)

(``2 t / c = 2 s2 / (c^2 log2 e)`` from the base-2 capped score ``s2``.)

Derivation: ``<gQ,dQ> + <gK,dK> + <gV,dV> = sum_ij P_ij f_ij`` with ``f_ij = (dP_ij - delta_i) B_ij + C_ij``.
Differentiating ``P`` through the softmax gives ``P_ij (f_ij - phi_i)`` on the scores; ``delta_i`` enters
with ``-beta_i``, which puts the cotangent ``-beta_i dO_i`` on ``O_i``; that flows back through the forward
as scores gradient ``-beta_i P_ij (dP_ij - do_i)`` and ``grad v_j -= sum_i z r P_ij beta_i dO_i``.
Collecting the score terms with ``do_i = delta_i + dlse_i`` gives ``G``.

Two identities make the row statistics cheap. ``psi_i = dO_i . grad dO_i``: expanding,
``dO_i . grad dO_i = sum_j P_ij (B_ij - beta_i) dP_ij + sum_j P_ij C_ij = phi_i + beta_i (delta_i - do_i)``,
because ``sum_j P_ij dP_ij = dO_i . O_i = do_i``; and ``delta_i - do_i = -dlse_i``. And, for any per-row
``c_i``, ``sum_j W_ij v_j = sum_j z r P_ij (B_ij - c_i) v_j - (beta_i - c_i) O_i`` because
``O_i = sum_j z r P_ij v_j``. So one sweep over the keys that forms only ``S`` and ``B`` yields ``beta``,
``grad dO`` and ``psi``, with no ``dP`` or ``C``. The centre ``c_i`` is the P-weighted mean of ``B`` over
the first key block in which row ``i`` sees a key: the tiles cast to the input dtype are then ``B - c``
(the row's spread of ``B``, not its common level, which is large when keys share a component), and the
saved 16-bit ``O`` is multiplied only by the small ``beta - c``.

One kernel, ``attn_dbwd_kernel``; its ``ROLE`` constexpr picks what a program does (``kernels/attention.py``
launches them in this order):

* ROLE 0, row pass (one program per query block): ``beta`` (= grad dlse), ``psi`` and ``grad dO`` as above;
* ROLE 1, grad-q pass (one program per query block; deterministic path only): ``grad q`` from the stored
  ``beta, psi``;
* ROLE 2, key pass (one program per key block of a KV head, looping over the query heads of its group and
  their query blocks in the transposed orientation [keys, queries]): ``grad k``, ``grad v``;
* ROLE 3, fused key pass: ROLE 2 plus each visited tile's contribution to ``grad q``, added with atomics into
  a zeroed fp32 (fp64 for fp64 inputs) accumulator. Replaces ROLE 1 and its recomputation of the tiles.

FLOPs, in units of one ``Lq x Lk x D`` matrix product over the visible pairs (``2 D`` FLOPs per pair):
row pass ``S = q k^T`` 1 + ``B`` 2 + ``(P (B - c)) v`` 1 + ``P gV`` 1 = 5; key pass recomputes ``S``, ``dP``,
``B``, ``C`` (5) and forms ``grad k = dS^T gQ + G^T q`` 2 and ``grad v = W^T dO`` 1 = 8; grad q
``= dS gK + G k`` is 2 more, in the fused key pass (10) or in the grad-q pass after its own recomputation
(5 + 2 = 7). Double backward: fused 5 + 10 = 15 units, deterministic 5 + 7 + 8 = 20 (the four-launch
version before this one: 25). For scale, forward 2 and backward 5 (dQ by atomics) or 7 (split kernels):
the fused double backward is 15 / 7 = 2.14 times forward + backward with atomics (15 / 9 = 1.67 against the
split backward). The unit above 2x is structural: grad k and grad v of a key block need beta and psi of
every row that sees it, so no key block can finish before every row has been swept once, and both sweeps
form S and B (3 units each); the row pass forms nothing else that it could hand over in O(S) memory.
``gradmem_fast.flops.attention_flops`` counts them.

Every score tile is recomputed from ``q, k`` and the saved ``lse`` in fp32 (fp64 for fp64 inputs) with
base-2 exponentials; mask, window and dropout keep mask are regenerated exactly as in the forward. No
[Lq, Lk] tensor exists anywhere.
"""

import triton
import triton.language as tl

from .attention_common import (
    cap_scores,
    cap_slope,
    head_base,
    keep_mask,
    key_keep,
    key_range,
    load_head_rows,
    load_lse2,
    load_row_stats,
    load_rows,
    load_scalars,
    load_seed,
    query_range,
    rng_key,
    score_mask,
    seq_bounds,
    stat_offset,
    store_rows,
)


@triton.jit
def attn_dbwd_kernel(
    Q,
    K,
    V,
    dOut,
    Out,
    gQ,
    gK,
    gV,
    Lse,
    Delta,
    Beta,
    Psi,
    GradQ,
    GraddOut,
    GradK,
    GradV,
    CuQ,
    CuK,
    Kpm,
    Params,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_gqb,
    stride_gqt,
    stride_gqh,
    stride_gkb,
    stride_gkt,
    stride_gkh,
    stride_gvb,
    stride_gvt,
    stride_gvh,
    stride_oqb,
    stride_oqt,
    stride_oqh,
    stride_okb,
    stride_okt,
    stride_okh,
    stride_lb,
    stride_lh,
    stride_mb,
    seqlen_q,
    seqlen_k,
    num_heads,
    group,
    qk_scale,
    sm_scale,
    rescale,
    dropout_p,
    Seed,
    window,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PARAMS_FP64: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ROLE: tl.constexpr,
):
    """One program of the module's ROLE (formulas in the module docstring):

    ROLE 0: Beta_i = sum_j P_ij B_ij, GraddOut_i = sum_j (W_ij v_j + z r P_ij gV_j), Psi_i = dO_i . GraddOut_i;
    ROLE 1: GradQ_i = scale sum_j (dS_ij gK_j + G_ij k_j)                      (reads Beta, Psi);
    ROLE 2: GradK_j = scale sum_{h in group, i} (dS_ij gQ_i + G_ij q_i), GradV_j = sum_{h, i} W_ij dO_i;
    ROLE 3: ROLE 2, and GradQ_i += scale (dS_ij gK_j + G_ij k_j) summed over the program's keys, by atomics.

    Grid: (query blocks of the longest sequence, query heads, sequences) for ROLE 0 and 1; (key blocks,
    KV heads, sequences) for ROLE 2 and 3. Query-shaped outputs (GradQ, GraddOut) share the strides
    ``stride_oq*``, key-shaped ones (GradK, GradV) ``stride_ok*``; Beta and Psi are written for every real
    row (0 for rows that see no key). GradQ is the output in ROLE 1 and the accumulator in ROLE 3.
    """
    pid = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    if ROLE < 2:
        start = pid * BLOCK_M
        own_len = q_len
    else:
        start = pid * BLOCK_N
        own_len = k_len
    if start >= own_len:
        return
    qk_scale, sm_scale, rescale, log2e, ln2 = load_scalars(qk_scale, sm_scale, rescale, Params, PARAMS_FP64)
    seed = load_seed(Seed, HAS_DROPOUT)
    Kpm_base = Kpm + b.to(tl.int64) * stride_mb + k_start

    if ROLE < 2:
        # ---- query-block roles: one query block of head `head`, a sweep over every key its rows see
        m0 = start
        hk = head // group
        q = load_head_rows(Q, b, q_start, head, stride_qb, stride_qt, stride_qh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        gq = load_head_rows(
            gQ, b, q_start, head, stride_gqb, stride_gqt, stride_gqh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM
        )
        K_base = head_base(K, b, k_start, hk, stride_kb, stride_kt, stride_kh)
        V_base = head_base(V, b, k_start, hk, stride_vb, stride_vt, stride_vh)
        gK_base = head_base(gK, b, k_start, hk, stride_gkb, stride_gkt, stride_gkh)
        gV_base = head_base(gV, b, k_start, hk, stride_gvb, stride_gvt, stride_gvh)
        # every row quantity needs the complete row: the key range of the block, no unmasked split
        diag, lo, hi, full_lo, full_hi = key_range(m0, q_len, k_len, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
        key = rng_key(seed, b, head, num_heads)
        if ROLE == 0:
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < q_len
            stat = stat_offset(b, head, q_start, stride_lb, stride_lh) + offs_m
            lse2 = load_lse2(Lse, stat, m_ok, log2e)
            beta = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
            mass = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
            centre = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
        else:
            do = load_head_rows(
                dOut, b, q_start, head, stride_dob, stride_dot, stride_doh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM
            )
            offs_m, m_ok, stat, lse2, delta = load_row_stats(
                Lse, Delta, b, head, q_start, m0, q_len, stride_lb, stride_lh, log2e, BLOCK_M
            )
            beta = tl.load(Beta + stat, mask=m_ok, other=0.0)
            psi = tl.load(Psi + stat, mask=m_ok, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)  # ROLE 0: grad dO; ROLE 1: grad q / scale
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = load_rows(K_base, start_n, k_len, stride_kt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
            v = load_rows(V_base, start_n, k_len, stride_vt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
            gk = load_rows(gK_base, start_n, k_len, stride_gkt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
            gv = load_rows(gV_base, start_n, k_len, stride_gvt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
            s = cap_scores(s, SOFTCAP)
            p = tl.math.exp2(s - lse2[:, None])
            valid = score_mask(offs_m[:, None], offs_n[None, :], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
            if HAS_KPM:
                valid = valid & key_keep(Kpm_base, offs_n, offs_n < k_len, HAS_KPM)[None, :]
            p = tl.where(valid, p, 0.0)
            if ROLE == 1:
                dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                cc = tl.dot(do, tl.trans(gv), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            bb = (
                tl.dot(gq, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                + tl.dot(q, tl.trans(gk), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            ) * sm_scale
            if SOFTCAP > 0:  # B in the capped scores' units: every formula below then holds as written
                slope = cap_slope(s, SOFTCAP)
                bb = bb * slope
            if HAS_DROPOUT:  # z r; without dropout rescale is 1
                zr = tl.where(keep_mask(key, offs_m[:, None], offs_n[None, :], k_len, dropout_p), rescale, 0.0)
            if ROLE == 0:
                p_sum = tl.sum(p, 1)
                pb_sum = tl.sum(p * bb, 1)
                # the centre is fixed by the first block with some probability mass in the row (earlier
                # blocks added nothing to acc for that row, so the choice needs no correction)
                centre = tl.where(mass > 0, centre, pb_sum / tl.where(p_sum > 0, p_sum, 1.0))
                mass += p_sum
                beta += pb_sum
                if HAS_DROPOUT:
                    pd = p * zr
                else:
                    pd = p
                w = pd * (bb - centre[:, None])
                acc += tl.dot(w.to(v.dtype), v, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                acc += tl.dot(pd.to(gv.dtype), gv, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            else:
                if HAS_DROPOUT:
                    dp = dp * zr
                    cc = cc * zr
                dpd = dp - delta[:, None]
                ds = p * dpd
                g = p * (dpd * (bb - beta[:, None]) + cc - psi[:, None])
                if SOFTCAP > 0:  # through the cap: G s' plus the curvature term dS B s''
                    g = g * slope - ds * bb * (s * (2.0 / (SOFTCAP * SOFTCAP * 1.4426950408889634)))
                    ds = ds * slope
                acc += tl.dot(ds.to(gk.dtype), gk, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                acc += tl.dot(g.to(k.dtype), k, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if ROLE == 0:
            o = load_head_rows(
                Out, b, q_start, head, stride_ob, stride_ot, stride_oh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM
            )
            acc -= (beta - centre)[:, None] * o.to(ACC_DTYPE)
            do = load_head_rows(
                dOut, b, q_start, head, stride_dob, stride_dot, stride_doh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM
            )
            tl.store(Beta + stat, beta, mask=m_ok)
            tl.store(Psi + stat, tl.sum(do.to(ACC_DTYPE) * acc, 1), mask=m_ok)
            out_base = head_base(GraddOut, b, q_start, head, stride_oqb, stride_oqt, stride_oqh)
        else:
            acc = acc * sm_scale
            out_base = head_base(GradQ, b, q_start, head, stride_oqb, stride_oqt, stride_oqh)
        store_rows(out_base, m0, q_len, stride_oqt, acc, BLOCK_M, BLOCK_D, HEAD_DIM)
    else:
        # ---- key-block roles: one key block of KV head `head`, every query block of its group that sees it
        n0 = start
        hk = head
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = load_head_rows(K, b, k_start, hk, stride_kb, stride_kt, stride_kh, n0, k_len, BLOCK_N, BLOCK_D, HEAD_DIM)
        v = load_head_rows(V, b, k_start, hk, stride_vb, stride_vt, stride_vh, n0, k_len, BLOCK_N, BLOCK_D, HEAD_DIM)
        gk = load_head_rows(
            gK, b, k_start, hk, stride_gkb, stride_gkt, stride_gkh, n0, k_len, BLOCK_N, BLOCK_D, HEAD_DIM
        )
        gv = load_head_rows(
            gV, b, k_start, hk, stride_gvb, stride_gvt, stride_gvh, n0, k_len, BLOCK_N, BLOCK_D, HEAD_DIM
        )
        kp_ok = key_keep(Kpm_base, offs_n, offs_n < k_len, HAS_KPM)
        diag, lo, n_blocks = query_range(n0, q_len, k_len, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
        acc_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
        acc_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
        # One flat loop over (query head of the group, query block), as in attn_bwd_dkdv_kernel.
        for it in range(0, group * n_blocks):
            g_idx = it // n_blocks
            h = hk * group + g_idx
            m0 = lo + (it - g_idx * n_blocks) * BLOCK_M
            q = load_head_rows(Q, b, q_start, h, stride_qb, stride_qt, stride_qh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
            do = load_head_rows(
                dOut, b, q_start, h, stride_dob, stride_dot, stride_doh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM
            )
            gq = load_head_rows(
                gQ, b, q_start, h, stride_gqb, stride_gqt, stride_gqh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM
            )
            offs_m, m_ok, stat, lse2, delta = load_row_stats(
                Lse, Delta, b, h, q_start, m0, q_len, stride_lb, stride_lh, log2e, BLOCK_M
            )
            beta = tl.load(Beta + stat, mask=m_ok, other=0.0)
            psi = tl.load(Psi + stat, mask=m_ok, other=0.0)
            sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
            sT = cap_scores(sT, SOFTCAP)
            pT = tl.math.exp2(sT - lse2[None, :])
            valid = score_mask(offs_m[None, :], offs_n[:, None], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
            if HAS_KPM:
                valid = valid & kp_ok[:, None]
            pT = tl.where(valid, pT, 0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            ccT = tl.dot(gv, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            bbT = (
                tl.dot(k, tl.trans(gq), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                + tl.dot(gk, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            ) * sm_scale
            if SOFTCAP > 0:
                slopeT = cap_slope(sT, SOFTCAP)
                bbT = bbT * slopeT
            if HAS_DROPOUT:
                keep = keep_mask(rng_key(seed, b, h, num_heads), offs_m[None, :], offs_n[:, None], k_len, dropout_p)
                zrT = tl.where(keep, rescale, 0.0)
                dpT = dpT * zrT
                ccT = ccT * zrT
                pdT = pT * zrT
            else:  # rescale is 1 without dropout
                pdT = pT
            dpdT = dpT - delta[None, :]
            if SOFTCAP > 0:  # dS B s'' (B already times s'), taken before B is centred
                curvT = pT * dpdT * bbT * (sT * (2.0 / (SOFTCAP * SOFTCAP * 1.4426950408889634)))
            bbT = bbT - beta[None, :]
            dsT = pT * dpdT
            gT = pT * (dpdT * bbT + ccT - psi[None, :])
            wT = pdT * bbT
            if SOFTCAP > 0:
                gT = gT * slopeT - curvT
                dsT = dsT * slopeT
            acc_k += tl.dot(dsT.to(gq.dtype), gq, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            acc_k += tl.dot(gT.to(q.dtype), q, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            acc_v += tl.dot(wT.to(do.dtype), do, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if ROLE == 3:
                # this key block's share of grad q for the visited query rows; other key blocks (programs)
                # add theirs to the same rows, hence the atomics
                part = tl.dot(tl.trans(dsT.to(gk.dtype)), gk, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                part += tl.dot(tl.trans(gT.to(k.dtype)), k, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                cols = tl.arange(0, BLOCK_D)
                tl.atomic_add(
                    head_base(GradQ, b, q_start, h, stride_oqb, stride_oqt, stride_oqh)
                    + offs_m.to(tl.int64)[:, None] * stride_oqt
                    + cols[None, :],
                    part * sm_scale,
                    mask=m_ok[:, None] & (cols < HEAD_DIM)[None, :],
                    sem="relaxed",
                )
        acc_k = acc_k * sm_scale
        store_rows(
            head_base(GradK, b, k_start, hk, stride_okb, stride_okt, stride_okh),
            n0,
            k_len,
            stride_okt,
            acc_k,
            BLOCK_N,
            BLOCK_D,
            HEAD_DIM,
        )
        store_rows(
            head_base(GradV, b, k_start, hk, stride_okb, stride_okt, stride_okh),
            n0,
            k_len,
            stride_okt,
            acc_v,
            BLOCK_N,
            BLOCK_D,
            HEAD_DIM,
        )
