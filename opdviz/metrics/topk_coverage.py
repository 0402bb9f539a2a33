"""Principal coverage counts: how many changed entries fall among the top-k entries of the rank-r
reconstruction of W_base, for every (α, rank, mask) at once. A histogram over float32 bit patterns selects
the k-th largest |R| without sorting (a stable sort below ``SMALL_SELECT`` entries); ties go by flat index.
Used by ``opdviz.metrics.geometry.principal_coverage``; source arXiv 2606.13657."""

from __future__ import annotations

import torch

from opdviz.metrics.linalg import chunk_rows, floor_frac
from opdviz.options import AnalysisOptions, fmt_pct

_BUCKETS = 1 << 15            # |R| float32 bit patterns >> 16: sign dropped, 8 exponent + 7 mantissa bits


def principal_coverage_counts(w_b: torch.Tensor, base_v: torch.Tensor, codes: list[torch.Tensor],
                        transposed: bool, mn: int, opts: AnalysisOptions) -> list[dict[str, float]]:
    m, n = w_b.shape
    numel = m * n
    plan: dict[int, list[tuple[str, str, int]]] = {}     # rank → [(name default, name exact, K)]
    nan_names: list[str] = []
    avail = base_v.shape[1]
    for a in opts.coverage_alphas:
        K, lab = floor_frac(a, numel), fmt_pct(a)
        fixed = opts.coverage_fixed_rank
        for r, d_name, e_name in ((max(1, floor_frac(a, mn)), f"principal_coverage_{lab}",
                                   f"principal_coverage_exact_{lab}"),
                                  (min(fixed, mn), f"principal_coverage_r{fixed}_{lab}",
                                   f"principal_coverage_r{fixed}_exact_{lab}")):
            if r > avail:
                nan_names += [d_name, e_name]
            else:
                plan.setdefault(r, []).append((d_name, e_name, K))
    outs = [{name: float("nan") for name in nan_names} for _ in codes]
    if not plan or not codes:
        return outs
    select = _topk_mask_counts_sorted if numel <= SMALL_SELECT else _topk_mask_counts
    for out, (counts, tot_d, tot_e) in zip(outs, select(w_b, base_v, plan, codes, transposed)):
        for (d_name, e_name), (c_d, c_e) in counts.items():
            out[d_name] = c_d / tot_d if tot_d else float("nan")
            out[e_name] = c_e / tot_e if tot_e else float("nan")
    return outs


def mask_code(masks: dict[str, torch.Tensor], transposed: bool, m: int, n: int) -> torch.Tensor:
    """uint8 m×n in working orientation: bit 1 = default mask, bit 0 = exact mask."""
    md, me = masks["default"], masks["exact"]
    if transposed:
        md, me = md.T, me.T
    code = torch.empty(m, n, dtype=torch.uint8, device=md.device)
    code.copy_(md)
    code.mul_(2)
    code.add_(me)
    return code


SMALL_SELECT = 1 << 15        # below this many entries a stable sort beats the histogram's fixed cost


def _topk_mask_counts_sorted(w: torch.Tensor, v: torch.Tensor, plan: dict[int, list[tuple[str, str, int]]],
                             codes: list[torch.Tensor], transposed: bool):
    """Small-matrix twin of ``_topk_mask_counts`` (same results, same tie rule): a stable sort of
    -|R| in the original [out, in] flat order per rank, then prefix counts of each code's mask bits."""
    wf = w.to(torch.float32)
    R = torch.zeros(wf.shape, dtype=torch.float32, device=w.device)
    codes_o = [(code.T if transposed else code).reshape(-1).to(torch.int64) for code in codes]
    totals = [(int(((c & 2) > 0).sum()), int((c & 1).sum())) for c in codes_o]
    results: list[dict[tuple[str, str], tuple[int, int]]] = [{} for _ in codes]
    prev_r = 0
    for r in sorted(plan):
        vs = v[:, prev_r:r].to(torch.float32)
        R.addmm_(wf @ vs, vs.T)
        prev_r = r
        a = (R.T if transposed else R).reshape(-1).abs().neg()
        order = torch.sort(a, stable=True).indices
        for res, code_o in zip(results, codes_o):
            c = code_o[order]
            cd, ce = ((c & 2) > 0).cumsum(0), (c & 1).cumsum(0)
            for d_name, e_name, K in plan[r]:
                K = min(K, c.numel())
                res[(d_name, e_name)] = (int(cd[K - 1]), int(ce[K - 1])) if K > 0 else (0, 0)
    return [(res, t[0], t[1]) for res, t in zip(results, totals)]


def _topk_mask_counts(w: torch.Tensor, v: torch.Tensor, plan: dict[int, list[tuple[str, str, int]]],
                      codes: list[torch.Tensor], transposed: bool):
    """For each rank r in ``plan`` and each K there: how many of the K largest |W V_r V_rᵀ| entries
    (ties → smaller original flat index first, like numpy argsort(-x, kind="stable")) lie in the
    default and in the exact mask of each code. Returns, per code, ({(d_name, e_name): (count_d,
    count_e)}, |U_d|, |U_e|).

    The selection depends on the base only, so the posts of one base share it: one float32
    reconstruction buffer R is grown in place over increasing r (R += (W V_j) V_jᵀ), never an m×n
    float64. Selection is exact on the float32 values in two fused sweeps per rank: a histogram of
    (|R| bits >> 16, mask code) per code while R is built, then — in the next rank's sweep, before R
    changes — the members of the one bucket holding the K-th value are gathered (with every code's
    bits) and resolved on their low 16 bits and flat indices."""
    m, n = w.shape
    dev = w.device
    rows = min(m, max(16, chunk_rows(n, dev) // 4))   # small chunks: temporaries stay cache-sized
    numel = m * n
    P = len(codes)
    R = torch.zeros(m, n, dtype=torch.float32, device=dev)
    wbuf = torch.empty(rows, n, dtype=torch.float32, device=dev)
    ib = torch.empty(rows, n, dtype=torch.int32, device=dev)
    ic = torch.empty(rows, n, dtype=torch.int32, device=dev) if P > 1 else None
    eqb = torch.empty(rows, n, dtype=torch.bool, device=dev)
    ranks = sorted(plan)
    results: list[dict[tuple[str, str], tuple[int, int]]] = [{} for _ in codes]
    totals: list[tuple[int, int]] | None = None
    pending: list[dict] = []           # targets of the previous rank awaiting their bucket members
    prev_r = 0
    for r in ranks + [None]:
        vs = v[:, prev_r:r].to(torch.float32) if r is not None else None
        hists = [torch.zeros(_BUCKETS * 4, dtype=torch.int64, device=dev) for _ in codes] if r is not None else []
        # members of each threshold bucket, in buffers sized by the previous histogram: nothing small is
        # kept between the chunks' temporaries (that fragmented glibc's heap by ~0.4 GB a sweep)
        sizes = {t["bucket"]: t["size"] for t in pending if t["bucket"] is not None}
        buckets = sorted(sizes)
        members = {b: (torch.empty(sizes[b], dtype=torch.int32, device=dev),
                       [torch.empty(sizes[b], dtype=torch.uint8, device=dev) for _ in codes],
                       torch.empty(sizes[b], dtype=torch.int64, device=dev), [0]) for b in buckets}
        for i in range(0, m, rows):
            c = min(rows, m - i)
            rc, kb = R[i:i + c], ib[:c]
            ccs = [code[i:i + c] for code in codes]
            bits = rc.view(torch.int32)
            if buckets:
                torch.bitwise_right_shift(bits, 16, out=kb)
                kb.bitwise_and_(0x7FFF)
                eq = eqb[:c]
                for b in buckets:
                    torch.eq(kb, b, out=eq)
                    idx = eq.view(-1).nonzero().squeeze(1)
                    k = idx.numel()
                    if k:
                        low, mcodes, widx, fill = members[b]
                        s = fill[0]
                        torch.bitwise_and(bits.view(-1)[idx], 0xFFFF, out=low[s:s + k])
                        for dst, cc in zip(mcodes, ccs):
                            torch.index_select(cc.view(-1), 0, idx, out=dst[s:s + k])
                        torch.add(idx, i * n, out=widx[s:s + k])
                        fill[0] = s + k
            if r is not None:
                wc = wbuf[:c]
                wc.copy_(w[i:i + c])
                rc.addmm_(wc @ vs, vs.T)
                torch.bitwise_right_shift(bits, 14, out=kb)
                kb.bitwise_and_(0x1FFFC)          # bucket·4; the sign bit (→ |R|) and low bits dropped
                if P == 1:
                    kb.bitwise_or_(ccs[0])
                    hists[0] += torch.bincount(kb.view(-1), minlength=_BUCKETS * 4)
                else:
                    kc = ic[:c]
                    for hist, cc in zip(hists, ccs):
                        torch.bitwise_or(kb, cc, out=kc)
                        hist += torch.bincount(kc.view(-1), minlength=_BUCKETS * 4)
        for t in pending:
            mem = members.get(t["bucket"])
            for p in range(P):
                results[p][t["names"]] = _resolve(t, p, mem, transposed, m, n)
        pending = []
        if r is None:
            break
        hs = [hist.view(_BUCKETS, 4) for hist in hists]
        if totals is None:
            totals = []
            for h in hs:
                per_code = h.sum(0)
                totals.append((int(per_code[2] + per_code[3]), int(per_code[1] + per_code[3])))
        tot = hs[0].sum(1)                            # elements per bucket: the same for every code
        ge = tot.flip(0).cumsum(0).flip(0)            # elements in buckets ≥ b
        hges = [h.flip(0).cumsum(0).flip(0) for h in hs]
        for d_name, e_name, K in plan[r]:
            t = {"names": (d_name, e_name), "K": K, "bucket": None}
            if K <= 0:
                t["fixed"] = [(0, 0)] * P
            elif K >= numel:
                t["fixed"] = list(totals)
            else:
                b = int((ge >= K).sum()) - 1
                aboves = [hge[b] - h[b] for hge, h in zip(hges, hs)]
                t.update(bucket=b, size=int(tot[b]), need=K - int(ge[b] - tot[b]),
                         above=[(int(a[2] + a[3]), int(a[1] + a[3])) for a in aboves])
            pending.append(t)
        prev_r = r
    return [(res, t[0], t[1]) for res, t in zip(results, totals)]


def _resolve(t: dict, p: int, members, transposed: bool, m: int, n: int) -> tuple[int, int]:
    """Finish one K for code ``p``: pick the ``need`` largest members of the threshold bucket (ties by
    flat index) and count that code's mask bits among them. ``members``: (low 16 bits, codes per post,
    flat working index, fill) of every element of that bucket."""
    if t["bucket"] is None:
        return t["fixed"][p]
    low, mcodes, widx, _ = members
    low, codes = low.long(), mcodes[p].long()
    need = t["need"]
    cnt = torch.bincount(low, minlength=1 << 16)
    ge = cnt.flip(0).cumsum(0).flip(0)
    lstar = int((ge >= need).sum()) - 1
    sel = low > lstar
    take = need - int(sel.sum())
    ties = (low == lstar).nonzero().squeeze(1)
    if take < ties.numel():
        wi, wj = widx[ties] // n, widx[ties] % n
        flat = wj * m + wi if transposed else widx[ties]     # order of the original [out, in] layout
        ties = ties[torch.argsort(flat)[:take]]
    chosen = torch.cat([codes[sel], codes[ties]])
    above = t["above"][p]
    return (above[0] + int(((chosen & 2) > 0).sum()), above[1] + int((chosen & 1).sum()))
