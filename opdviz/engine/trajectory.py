"""Trajectories: the checkpoints of one training run at steps t, each compared with the base.

``opdviz trajectory BASE CKPTS... --name NAME`` runs the normal job once per checkpoint (run
``NAME@t``, ``runs.trajectory = NAME``, ``runs.step = t``), so every per-pair metric is available
against the step; then one streaming pass computes the metrics that need several checkpoints at
once and stores them in the ``trajectory`` table (trajectory, step, tensor, metric, value).
With Δ_t = W_t − W_base, T the last step and t−1 the previous checkpoint (the base before the first):

  density_{c}              |M_t| / numel, M_t = changed(W_base → W_t) under criterion c
  sparsity_consec_{c}      share of coordinates unchanged between W_{t−1} and W_t
  outside_final_{c}        |M_t \\ M_T| / |M_t|: updates present at t that the final mask lacks (NaN if M_t = ∅)
  step_outside_final_{c}   |C_t \\ M_T| / |C_t|, C_t = changed(W_{t−1} → W_t): this step's changes outside M_T
  sim_k{K}                 (1/K)‖V_K(t)ᵀ V_K(T)‖F², V_K the top-K right singular vectors of Δ_t (2606.07082);
                           NaN when Δ_t or Δ_T has fewer than K directions above 1e-6·σ₁
  stable_rank, delta_fro   ‖Δ_t‖F²/σ₁² and ‖Δ_t‖F (as in the per-step runs)
  hill_alpha_{p}           Hill estimate of the power-law exponent of the ESD of Δ_t (below)

c ∈ {the default criterion, exact}. Matrix metrics use the [out, in] view of 2-D (and stacked)
tensors; 1-D tensors get the elementwise ones only; fused tensors are not split here.

Hill estimator: λ_1 ≥ λ_2 ≥ … the nonzero eigenvalues of Δ_tᵀΔ_t (σᵢ², σᵢ > 1e-6·σ₁), r of them;
k = max(2, ceil(p·r)) with p = ``--hill-frac`` (default 10 %), needing r > k;
α̂ = 1 + k / Σ_{i=1..k} ln(λ_i / λ_{k+1}) — the exponent of the density p(λ) ∝ λ^−α of the top-k
tail (WeightWatcher's α convention; the classical Hill tail index of the survival function is α̂ − 1).

Memory: one tensor at a time — base, the final masks, the current and the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from opdviz.io.adapters import open_post
from opdviz.errors import OpdvizError, OptionsError
from opdviz.engine.analyse import resolve_device
from opdviz.engine.progress import run_lock
from opdviz.engine.runner import JobSpec, name_filter, run_jobs, run_keyed
from opdviz.engine.masks import changed_chunks
from opdviz.metrics.linalg import VALID_REL, chunk_rows, eigh_desc, lowrank
from opdviz.io.layouts import matrix_view
from opdviz.options import MAX_LABEL_CHARS, AnalysisOptions, check_label, fmt_pct
from opdviz.io.reader import Checkpoint, plan_pairs
from opdviz.store import Store
from opdviz.store.progress import trajectory_done, trajectory_stored

STEP_RE = re.compile(r"^(?:checkpoint|step|global_step|ckpt|iter)[-_]?(\d+)$", re.IGNORECASE)
DEFAULT_K = 16
DEFAULT_HILL_FRAC = 0.10


@dataclass(frozen=True)
class TrajectorySpec:
    base: Path
    checkpoints: tuple[tuple[int, Path], ...]    # (step, path), ascending steps
    name: str
    method: str
    db: Path
    options: AnalysisOptions = AnalysisOptions()
    k: int = DEFAULT_K
    hill_frac: float = DEFAULT_HILL_FRAC

    def __post_init__(self) -> None:
        check_label(self.name, "trajectory name", MAX_LABEL_CHARS - 24)   # its runs are NAME@STEP
        check_label(self.method, "method label")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise OptionsError(f"--k must be an integer ≥ 1, got {self.k!r}")
        if isinstance(self.hill_frac, bool) or not isinstance(self.hill_frac, (int, float)) \
                or not 0 < self.hill_frac < 1:
            raise OptionsError(f"--hill-frac must be a number in (0, 1), got {self.hill_frac!r}")
        for step, _ in self.checkpoints:
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise OptionsError(f"steps must be non-negative integers, got {step!r}")


# ------------------------------------------------------------------------------------ finding checkpoints
def find_checkpoints(paths: list[Path], steps: list[int] | None = None) -> tuple[tuple[int, Path], ...]:
    """(step, path) pairs, ascending. One folder holding ``checkpoint-N``-style subfolders → those;
    otherwise the given paths with ``steps`` (same length) or steps read from their names."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir() and not steps:
        subs = [(int(m.group(1)), p) for p in paths[0].iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
        links = [p.name for _, p in subs if p.is_symlink()]
        if links:          # the folder is untrusted: a step folder must not lead elsewhere
            raise OptionsError(f"{paths[0]}: {', '.join(sorted(links))} is a symlink; refusing to follow it. "
                               "Pass the checkpoints themselves with --steps if they are meant to be used")
        if subs:
            paths = [p for _, p in sorted(subs)]
            steps = [s for s, _ in sorted(subs)]
    if steps is None:
        steps = []
        for p in paths:
            m = STEP_RE.match(p.stem if p.is_file() else p.name) or re.search(r"(\d+)$", p.stem)
            if not m:
                raise OptionsError(f"cannot tell the step of {p}: name checkpoints like checkpoint-100/, or pass "
                                   "--steps with one step per checkpoint")
            steps.append(int(m.group(1)))
    if len(steps) != len(paths):
        raise OptionsError(f"--steps got {len(steps)} steps for {len(paths)} checkpoints")
    if len(set(steps)) != len(steps):
        raise OptionsError(f"steps must differ, got {steps}")
    if not paths:
        raise OptionsError("no checkpoints given")
    return tuple(sorted(zip(steps, paths)))


# ------------------------------------------------------------------------------------ pure metrics
def hill_alpha(lam: np.ndarray, frac: float = DEFAULT_HILL_FRAC) -> float:
    """Hill estimate α̂ = 1 + k / Σ_{i≤k} ln(λ_i/λ_{k+1}) over the positive eigenvalues ``lam`` (any order),
    k = max(2, ceil(frac·r)), r = #positive; NaN when r ≤ k or the top k+1 are all equal."""
    lam = np.sort(np.asarray(lam, dtype=np.float64)[np.asarray(lam) > 0])[::-1]
    r = len(lam)
    k = max(2, math.ceil(frac * r))
    if r <= k:
        return float("nan")
    s = float(np.log(lam[:k] / lam[k]).sum())
    return 1.0 + k / s if s > 0 else float("nan")


@dataclass
class Spectrum:
    sigma: np.ndarray          # descending singular values of Δ (all, or top q when approx)
    v: torch.Tensor            # n×K' float64 top right singular vectors (K' ≤ K)
    fro2: float
    exact: bool


def delta_spectrum(wb: torch.Tensor, wt: torch.Tensor, k: int, exact: bool, q: int = 256, seed: int = 0) -> Spectrum:
    """σ of Δ = float32(wt) − float32(wb) ([out, in] matrices) and its top-k right singular vectors.

    Exact: float64 Gram of the smaller side, accumulated over row chunks (no m×n float64 copy); for a
    wide Δ the Gram is ΔΔᵀ and V = ΔᵀU/σ. Approx: seeded ``svd_lowrank`` of Δ (float32), top q."""
    m, n = wb.shape
    dev = wb.device
    if not exact:
        d = wt.float() - wb.float()
        fro2 = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
        _, s, v = lowrank(d, min(max(q, k), m, n), seed)
        return Spectrum(s.double().cpu().numpy(), v[:, :k].double(), fro2, False)
    wide = m < n
    a_b, a_t = (wb.T, wt.T) if wide else (wb, wt)       # working tall view: rows ≥ cols
    rows, cols = a_b.shape
    step = min(rows, chunk_rows(cols, dev))
    g = torch.zeros(cols, cols, dtype=torch.float64, device=dev)
    for i in range(0, rows, step):
        d = (a_t[i:i + step].float() - a_b[i:i + step].float()).double()
        g.addmm_(d.T, d)
    sig, w = eigh_desc(g)
    fro2 = float(torch.trace(g))
    kk = min(k, cols)
    if not wide:
        v = w[:, :kk]
    else:   # w holds left vectors of Δ: v_j = Δᵀu_j/σ_j = (rows of a) · u_j / σ_j, computed by chunks
        v = torch.zeros(rows, kk, dtype=torch.float64, device=dev)
        s = sig[:kk].clone()
        s[s <= 0] = float("nan")
        for i in range(0, rows, step):
            d = (a_t[i:i + step].float() - a_b[i:i + step].float()).double()
            v[i:i + step] = (d @ w[:, :kk]) / s
    return Spectrum(sig.cpu().numpy(), v, fro2, True)


def subspace_sim(v_t: torch.Tensor, v_T: torch.Tensor, k: int) -> float:
    """(1/k)‖V_k(t)ᵀ V_k(T)‖F² for orthonormal n×k bases (1 = same subspace, k/n ≈ random)."""
    if v_t.shape[1] < k or v_T.shape[1] < k or torch.isnan(v_t).any() or torch.isnan(v_T).any():
        return float("nan")
    return float((v_t[:, :k].T @ v_T[:, :k]).pow(2).sum() / k)


def _valid_k(spec: Spectrum, k: int) -> int:
    s = spec.sigma
    if len(s) == 0 or s[0] <= 0:
        return 0
    return min(k, int((s > VALID_REL * s[0]).sum()))


# ------------------------------------------------------------------------------------ the job
def metric_names(opts: AnalysisOptions, k: int, hill_frac: float) -> set[str]:
    crits = dict.fromkeys((opts.criterion, "exact"))
    names = {f"{m}_{c}" for c in crits for m in ("density", "sparsity_consec", "outside_final", "step_outside_final")}
    return names | {f"sim_k{k}", "stable_rank", "delta_fro", f"hill_alpha_{fmt_pct(hill_frac)}", "failed"}


def tensor_trajectory(name: str, base: Checkpoint, cks: list[tuple[int, Checkpoint, str]], opts: AnalysisOptions,
                      k: int, hill_frac: float, device: torch.device) -> list[dict]:
    """All trajectory rows of base tensor ``name`` (every step), streaming the checkpoints in step order.
    ``cks``: (step, checkpoint, the tensor's name in that checkpoint), ascending steps."""
    crits = tuple(dict.fromkeys((opts.criterion, "exact")))
    chunk = opts.chunk_elems
    config = base.config
    wb = base.load(name, device)
    final = cks[-1][1].load(cks[-1][2], device)
    numel = wb.numel()
    # the final masks, flat, one per criterion (the final tensor itself is then dropped)
    final_masks = {c: torch.empty(numel, dtype=torch.bool, device=device) for c in crits}
    for sl, ms in changed_chunks(wb, final, crits, chunk):
        for c in crits:
            final_masks[c][sl] = ms[c]
    is_matrix = wb.dim() >= 2 and min(matrix_view(name, wb, config).shape) >= 2
    exact = opts.spectrum == "exact" or (opts.spectrum == "auto" and not (
        device.type == "cpu" and is_matrix and min(matrix_view(name, wb, config).shape) > opts.exact_max_dim))
    spec_T = (delta_spectrum(matrix_view(name, wb, config), matrix_view(name, final, config), k, exact,
                             opts.approx_rank, opts.seed) if is_matrix else None)
    del final
    k_T = _valid_k(spec_T, k) if spec_T else 0
    rows: list[dict] = []
    prev = wb
    for step, ck, post_name in cks:
        cur = ck.load(post_name, device)
        n_m = {c: 0 for c in crits}
        n_m_out = {c: 0 for c in crits}
        n_c = {c: 0 for c in crits}
        n_c_out = {c: 0 for c in crits}
        for (sl, mt), (_, ct) in zip(changed_chunks(wb, cur, crits, chunk), changed_chunks(prev, cur, crits, chunk)):
            for c in crits:
                outside = ~final_masks[c][sl]
                n_m[c] += int(torch.count_nonzero(mt[c]))
                n_m_out[c] += int(torch.count_nonzero(mt[c] & outside))
                n_c[c] += int(torch.count_nonzero(ct[c]))
                n_c_out[c] += int(torch.count_nonzero(ct[c] & outside))
        vals: dict[str, float] = {}
        for c in crits:
            vals[f"density_{c}"] = n_m[c] / numel
            vals[f"sparsity_consec_{c}"] = 1.0 - n_c[c] / numel
            vals[f"outside_final_{c}"] = n_m_out[c] / n_m[c] if n_m[c] else float("nan")
            vals[f"step_outside_final_{c}"] = n_c_out[c] / n_c[c] if n_c[c] else float("nan")
        if spec_T is not None:
            sp = delta_spectrum(matrix_view(name, wb, config), matrix_view(name, cur, config), k, exact,
                                opts.approx_rank, opts.seed)
            s1 = float(sp.sigma[0]) if len(sp.sigma) else 0.0
            kk = min(k, min(matrix_view(name, wb, config).shape))
            vals[f"sim_k{k}"] = (subspace_sim(sp.v, spec_T.v, kk)
                                 if _valid_k(sp, k) >= kk and k_T >= kk else float("nan"))
            vals["stable_rank"] = sp.fro2 / s1 ** 2 if s1 > 0 else float("nan")
            vals["delta_fro"] = math.sqrt(sp.fro2)
            lam = sp.sigma[sp.sigma > VALID_REL * s1] ** 2 if s1 > 0 else np.array([])
            vals[f"hill_alpha_{fmt_pct(hill_frac)}"] = hill_alpha(lam, hill_frac)
        else:
            d = cur.float() - wb.float()
            vals["delta_fro"] = float(torch.linalg.vector_norm(d, dtype=torch.float64))
            del d
        rows.extend({"step": step, "tensor": name, "metric": m, "value": float(v)} for m, v in vals.items())
        prev = cur
        del cur
    return rows


def run_trajectory(spec: TrajectorySpec, *, progress: bool = True, overwrite: bool = False, log=print) -> dict:
    """Per-step runs (the normal job for each checkpoint), then the trajectory metrics. Resumable."""
    opts = spec.options
    if spec.k < 1 or not 0 < spec.hill_frac < 1:
        raise OptionsError("--k must be ≥ 1 and --hill-frac in (0, 1)")
    store = Store(spec.db)
    store.check()          # before any work: a foreign or broken --db is refused untouched
    steps = [s for s, _ in spec.checkpoints]
    extra = {"trajectory_k": spec.k, "hill_frac": spec.hill_frac, "steps": steps}
    # one job for every step: each base tensor is read and decomposed once for all of them
    specs = [JobSpec(base=Path(spec.base), post=Path(path), run_id=f"{spec.name}@{step}", method=spec.method,
                     db=Path(spec.db), options=opts, trajectory=spec.name, step=step, extra=extra)
             for step, path in spec.checkpoints]
    for (step, _), row in zip(spec.checkpoints, run_jobs(specs, progress=progress, overwrite=overwrite, log=log)):
        log(f"{spec.name}@{step}: {row['status']} — {row['n_done']} tensors in {row['wall_s']:.1f} s")

    device = resolve_device(opts.device)
    expected = metric_names(opts, spec.k, spec.hill_frac)
    with contextlib.ExitStack() as stack, run_lock(store, f"trajectory:{spec.name}"):
        base = stack.enter_context(Checkpoint.open(spec.base, allow_pickle=opts.allow_pickle))
        cks = [(s, stack.enter_context(open_post(p, base, allow_pickle=opts.allow_pickle))) for s, p in spec.checkpoints]
        names, post_names = None, []
        for _, ck in cks:        # tensors comparable with the base in every checkpoint, in base order
            ok = {i.name: i.post.name for i in plan_pairs(base, ck) if i.status == "ok"}
            post_names.append(ok)
            names = list(ok) if names is None else [n for n in names if n in ok]
        names = sorted(names, key=lambda n: (base.files.index(base.infos[n].file), base.infos[n].offset))
        keep = name_filter(opts)
        names = [n for n in names if keep(n)]
        stored_steps, stored_metrics = trajectory_stored(store, spec.name)
        if not overwrite and stored_steps and (stored_steps != set(steps) or not stored_metrics <= expected):
            raise OptionsError(f"trajectory {spec.name!r} is stored with other steps or options (steps "
                               f"{sorted(stored_steps)}); pass the same checkpoints, --k and --hill-frac, "
                               "or --overwrite")
        done = set() if overwrite else trajectory_done(store, spec.name)
        failed = 0

        def compute(name: str) -> list[dict]:
            nonlocal failed
            try:
                per_step = [(s, ck, pn[name]) for (s, ck), pn in zip(cks, post_names)]
                rows = tensor_trajectory(name, base, per_step, opts, spec.k, spec.hill_frac, device)
            except (OpdvizError, RuntimeError, ValueError) as exc:   # recorded; the job goes on
                failed += 1
                log(f"trajectory {spec.name}: {name} failed: {type(exc).__name__}: {exc}")
                rows = [{"step": steps[-1], "tensor": name, "metric": "failed", "value": 1.0}]
            return [{**r, "trajectory": spec.name} for r in rows]

        # bytes read per tensor: the base, every checkpoint, and the final one once more for its masks
        units = [(n, base.infos[n].nbytes * (1 + len(cks) + 1)) for n in names]
        wall = run_keyed(store, f"trajectory:{spec.name}", "trajectory", units, done, compute, progress=progress,
                         log=log, busy_note=f"note: {spec.db} was busy; results stay readable in {store.staging}.")
    return {"trajectory": spec.name, "steps": steps, "n_tensors": len(names), "n_failed": failed, "wall_s": wall}

