"""A realistic synthetic result store, written through ``RunWriter`` — no checkpoints, no torch.

Used by the figure, view, export and app tests and by the page-speed benchmark:

    from synthetic import make_synthetic_store, SEVEN_B
    store = make_synthetic_store(tmp_path / "s.duckdb")                  # 3 runs × 4 layers, seconds
    store = make_synthetic_store(tmp_path / "7b.duckdb", **SEVEN_B)     # 32 layers × 7 modules + embed/head

Every metric and array the engine stores is present with plausible, mutually consistent values
(derived scalars are computed from the synthetic spectra / sweeps, so a figure built from arrays
agrees with one built from scalars). Methods get different profiles, following the seed paper:
OPD and RL updates are sparse and avoid the principal directions of W_base, SFT updates are dense.

Layout per run: embed, head and final norm; ``layers`` decoder layers of ``modules``; layer 0's
q/k/v are a fused ``qkv_proj`` analysed whole and as parts ``[q] [k] [v]`` (the parent is hidden by
``Selection.leaves_only``); one skipped tensor (``rotary_emb.inv_freq``) in every run; one failed
tensor (the last layer's ``down_proj``) in the first run, with its ``failures`` row. Runs share one
``base_fingerprint`` and carry ``{"accuracy", "base_accuracy"}`` in ``extra``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from opdviz.metrics.rankgrid import rank_grid
from opdviz.store import RunWriter, Store, now


MODULES = ("q", "k", "v", "o", "gate", "up", "down")
SEVEN_B = {"layers": 32, "hidden": 4096, "ffn": 11008, "vocab": 32000}   # Llama-2-7B shapes

CRITERIA_ABS = {"abs_1e-8": 1e-8, "abs_1e-7": 1e-7, "abs_1e-6": 1e-6, "abs_1e-5": 1e-5, "abs_1e-4": 1e-4}
ALPHAS = (1, 5, 10, 20, 30, 50)
TOPK = (1, 2, 4, 8, 16, 32, 64)
ANGLE_K = (16, 64, 512)
PROJ_R = (1, 5, 10, 20)
SWEEP_EPS = 10.0 ** (-10 + 0.5 * np.arange(19))       # 1e-10 … 1e-1, half decades

# (sparsity at abs 1e-5, relative change, spectral decay exponent, low-mag enrichment exponent,
#  principal-coverage exponent, principal-projection exponent, principal angle scale rad, accuracy gain)
PROFILES = {
    "OPD": (0.74, 2.0e-3, 0.55, 1.9, 0.55, 1.30, 0.020, 0.09),
    "RL": (0.86, 7.0e-4, 0.35, 1.6, 0.70, 1.20, 0.008, 0.06),
    "GRPO": (0.84, 8.0e-4, 0.38, 1.6, 0.72, 1.18, 0.009, 0.07),
    "SFT": (0.18, 1.2e-2, 0.85, 1.15, 0.92, 0.85, 0.080, 0.04),
    "DPO": (0.55, 3.0e-3, 0.60, 1.4, 0.80, 1.05, 0.030, 0.03),
}
MODULE_EFFECT = {"q": 0.3, "k": 0.5, "v": -0.2, "o": -0.1, "gate": 0.1, "up": 0.0, "down": -0.3,
                 "embed": 1.5, "lm_head": -0.4, "norm": 0.8}
BLOCK_OF = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "qkv": "attn",
            "gate": "ffn", "up": "ffn", "down": "ffn", "gate_up": "ffn"}
HF_NAME = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def make_synthetic_store(db_path: str | Path, runs: tuple = ("OPD", "RL", "SFT"), layers: int = 4,
                         modules: tuple[str, ...] = MODULES, seed: int = 0, hidden: int = 64,
                         finished: bool = True, ffn: int | None = None, vocab: int | None = None) -> Store:
    """Write a synthetic store at ``db_path`` and return it.

    Args:
      runs: method labels (run id == label) or ``(run_id, method)`` pairs.
      layers, modules: decoder layers and which of q k v o gate up down each has.
      hidden, ffn, vocab: matrix shapes (ffn defaults to 2.6875·hidden, vocab to 8·hidden);
        spectra have min(m, n) values, row/column fractions m and n values, maps ≤ 128×128.
      seed: everything is deterministic given the seed.
      finished: True → every run ``done`` and folded into the ``.duckdb`` file; False → the last
        run is ``running`` with only half of its tensors written, left in staging (not folded).
    """
    ffn = ffn or int(round(hidden * 2.6875))
    vocab = vocab or 8 * hidden
    store = Store(db_path)
    pairs = [(r, r) if isinstance(r, str) else tuple(r) for r in runs]
    base_fp = "sha256:" + hashlib.sha256(f"synthetic-base-{seed}".encode()).hexdigest()[:32]
    for i, (run_id, method) in enumerate(pairs):
        rng = np.random.default_rng([seed, i])
        prof = _profile(method)
        plan = _plan(layers, modules, hidden, ffn, vocab)
        partial = not finished and i == len(pairs) - 1
        if partial:
            plan = plan[: max(1, len(plan) // 2)]
        writer = RunWriter(store, run_id)
        t0 = now()
        n_done = n_failed = n_skipped = 0
        for seq, item in enumerate(plan):
            if item["kind"] == "skipped":
                writer.write_tensor(item["name"], [_row(item, seq, "skipped", "missing in the post-trained "
                                                                             "checkpoint")], [], [], [])
                n_skipped += 1
                continue
            if i == 0 and item["name"].endswith(f"layers.{layers - 1}.mlp.down_proj.weight"):
                writer.write_tensor(item["name"], [_row(item, seq, "failed", "RuntimeError: SVD did not converge")],
                                    [], [], [{"tensor": item["name"], "stage": "metrics", "error": "RuntimeError",
                                              "message": "linalg.svd: the algorithm failed to converge"}])
                n_failed += 1
                continue
            rows, metrics, arrays = [], [], []
            for unit in [item] + item.get("parts", []):
                rows.append(_row(unit, seq, "ok", ""))
                m, a = _unit_results(unit, prof, rng)
                metrics += m
                arrays += a
            writer.write_tensor(item["name"], rows, metrics, arrays, [])
            n_done += 1
        acc0 = 0.42 + 0.01 * seed
        writer.write_run({
            "method": method, "kind": "pair", "base_path": f"/models/synthetic-base-{seed}",
            "post_path": f"/models/{run_id}", "base_fingerprint": base_fp,
            "post_fingerprint": "sha256:" + hashlib.sha256(f"{run_id}-{seed}".encode()).hexdigest()[:32],
            "base_bytes": _bytes(plan), "post_bytes": _bytes(plan), "trajectory": None, "step": None,
            "options": json.dumps({"device": "cpu", "spectrum": "auto", "seed": seed}),
            "versions": json.dumps({"opdviz": "synthetic", "torch": "n/a", "duckdb": "n/a"}),
            "device": "cpu", "dtype": "bfloat16", "seed": seed,
            "status": "running" if partial else "done", "error": None, "created_at": t0,
            "finished_at": None if partial else now(), "wall_s": 12.5 * (i + 1),
            "n_tensors": len(_plan(layers, modules, hidden, ffn, vocab)), "n_done": n_done + n_failed + n_skipped,
            "n_skipped": n_skipped, "n_failed": n_failed, "bytes_total": 2 * _bytes(plan),
            "bytes_done": 2 * _bytes(plan), "extra": json.dumps({"accuracy": round(acc0 + prof[7], 4),
                                                                 "base_accuracy": acc0}),
        })
    if finished:
        store.fold(wait=30)
    return store


# ---------------------------------------------------------------------------------------- layout
def _plan(layers, modules, hidden, ffn, vocab) -> list[dict]:
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
              "gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
    plan = [_unit("model.embed_tokens.weight", None, "embed", "embed", (vocab, hidden)),
            {"kind": "skipped", "name": "model.rotary_emb.inv_freq", "layer": None, "block": "other",
             "module": "other", "shape": (hidden // 2,), "parent": "", "part": ""}]
    for layer in range(layers):
        mods = list(modules)
        if layer == 0 and {"q", "k", "v"} <= set(mods):
            name = "model.layers.0.self_attn.qkv_proj.weight"
            fused = _unit(name, 0, "attn", "qkv", (3 * hidden, hidden))
            fused["parts"] = [{**_unit(f"{name}[{p}]", 0, "attn", p, shapes[p]), "parent": name, "part": p}
                              for p in ("q", "k", "v")]
            plan.append(fused)
            mods = [m for m in mods if m not in ("q", "k", "v")]
        for mod in mods:
            plan.append(_unit(f"model.layers.{layer}.{HF_NAME[mod]}.weight", layer, BLOCK_OF[mod], mod,
                              shapes[mod]))
    plan.append(_unit("model.norm.weight", None, "norm", "norm", (hidden,)))
    plan.append(_unit("lm_head.weight", None, "head", "lm_head", (vocab, hidden)))
    return plan


def _unit(name, layer, block, module, shape) -> dict:
    return {"kind": "ok", "name": name, "layer": layer, "block": block, "module": module, "shape": shape,
            "parent": "", "part": ""}


def _row(u: dict, seq: int, status: str, reason: str) -> dict:
    shape = u["shape"]
    return {"tensor": u["name"], "parent": u["parent"], "part": u["part"], "tower": "text", "layer": u["layer"],
            "block": u["block"], "module": u["module"], "expert": None, "param": "weight", "shape": list(shape),
            "rows": shape[0], "cols": shape[1] if len(shape) > 1 else None, "numel": int(np.prod(shape)),
            "dtype": "bfloat16", "status": status, "reason": reason,
            "spectrum_exact": True if status == "ok" and len(shape) == 2 else None,
            "seconds": 1e-8 * float(np.prod(shape)), "seq": seq}


def _bytes(plan) -> int:
    return int(sum(2 * np.prod(u["shape"]) for u in plan))


def _profile(method: str) -> tuple:
    if method.upper() in PROFILES:
        return PROFILES[method.upper()]
    h = int(hashlib.sha1(method.encode()).hexdigest()[:8], 16) / 2**32
    return (0.3 + 0.5 * h, 10 ** (-3.5 + 2 * h), 0.4 + 0.4 * h, 1.2 + 0.6 * h, 0.6 + 0.3 * h, 0.9 + 0.4 * h,
            0.01 + 0.05 * h, 0.02 + 0.05 * h)


# ---------------------------------------------------------------------------------------- values
def _unit_results(u: dict, prof: tuple, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    sp0, rel0, decay, low_e, prin_e, proj_g, angle0, _ = prof
    name, shape = u["name"], u["shape"]
    numel = int(np.prod(shape))
    layer = u["layer"] if u["layer"] is not None else 0
    # sparsity: method level, shifted per module and along depth, with noise (logit space)
    logit = math.log(sp0 / (1 - sp0)) + 0.5 * MODULE_EFFECT.get(u["module"], 0) + 0.04 * layer \
        + rng.normal(0, 0.15)
    target = 1 / (1 + math.exp(-logit))
    base_rms = {"embed": 0.012, "lm_head": 0.015, "norm": 0.9}.get(u["module"], 0.02) * (1 + rng.normal(0, 0.05))
    rel = rel0 * math.exp(rng.normal(0, 0.2)) * {"ffn": 1.4, "norm": 0.05}.get(u["block"], 1.0)
    delta_rms = rel * base_rms
    # |ΔW| of changed coordinates ~ log-normal; s0 = bitwise-unchanged share; sweep(ε) = share unchanged
    s0 = 0.6 * target
    sig = 1.2
    p = (target - s0) / (1 - s0)
    mu = math.log(1e-5) - sig * _ppf(p)
    sweep = s0 + (1 - s0) * _cdf((np.log(SWEEP_EPS) - mu) / sig)

    def unchanged(eps):
        return float(s0 + (1 - s0) * _cdf((math.log(eps) - mu) / sig))

    m: dict[str, float] = {"sparsity_exact": s0}
    m.update({f"sparsity_{c}": unchanged(e) for c, e in CRITERIA_ABS.items()})
    m.update({f"sparsity_relrms_{t}": unchanged(float(t) * base_rms) for t in ("1e-4", "1e-3", "1e-2")})
    m["sparsity_bf16_1e-3"] = unchanged(1e-3 * base_rms * 0.8)
    base_sq, delta_sq = base_rms**2 * numel, delta_rms**2 * numel
    post_sq = base_sq + delta_sq
    m.update(base_fro=math.sqrt(base_sq), post_fro=math.sqrt(post_sq), delta_fro=math.sqrt(delta_sq),
             rel_change=rel, delta_max_abs=delta_rms * (6 + rng.random() * 4), delta_mean_abs=0.6 * delta_rms,
             delta_rms=delta_rms, base_rms=base_rms, delta_sq_sum=delta_sq, base_sq_sum=base_sq, post_sq_sum=post_sq)
    conc = 1 + 3 * target      # sparser updates concentrate their energy in fewer coordinates
    for pct, frac in (("0.1", 0.001), ("1", 0.01), ("5", 0.05)):
        m[f"coord_energy_top_{pct}pct"] = min(1.0, frac ** (1 / (1 + conc)) * 0.9)
    for a in ALPHAS:
        al = a / 100
        m[f"lowmag_coverage_{a}pct"] = 1 - (1 - al) ** low_e
        m[f"lowmag_coverage_exact_{a}pct"] = 1 - (1 - al) ** (low_e * 1.08)
    arrays: list[tuple[str, np.ndarray]] = [("abs_sweep_eps", SWEEP_EPS.copy()), ("abs_sweep_sparsity", sweep)]
    changed = 1 - target
    w = np.linspace(low_e, 1 / low_e, 10)                     # low-magnitude deciles change more
    arrays.append(("decile_density", np.clip(changed * w / w.mean(), 0, 1)))
    arrays.append(("decile_density_exact", np.clip((1 - s0) * w**1.1 / (w**1.1).mean(), 0, 1)))

    if len(shape) == 2:
        rows, cols = shape
        n = min(rows, cols)
        idx = np.arange(1, n + 1)
        sig_d = idx ** (-decay) * np.exp(rng.normal(0, 0.05, n)) * (1 - 0.97 * (idx / n) ** 4)
        sig_d = np.sort(sig_d)[::-1]
        sig_d *= math.sqrt(delta_sq / np.sum(sig_d**2))
        e = sig_d**2 / np.sum(sig_d**2)
        cum = np.cumsum(e)
        s1 = sig_d[0]
        m.update(stable_rank=float(np.sum(sig_d**2) / s1**2),
                 effective_rank=float(np.exp(-np.sum((q := sig_d / sig_d.sum()) * np.log(q)))),
                 sigma_max=float(s1), spectrum_exact=1.0)
        for t in ("1e-6", "1e-5", "1e-4"):
            r = int(np.sum(sig_d > float(t) * s1))
            m[f"numerical_rank_{t}"], m[f"numerical_rank_{t}_pct"] = r, 100 * r / n
        r = int(np.sum(sig_d > max(rows, cols) * 1.19e-7 * s1))
        m["numerical_rank_default"], m["numerical_rank_default_pct"] = r, 100 * r / n
        for k in TOPK:
            m[f"top{k}_energy"] = float(cum[min(k, n) - 1])
        for pct in (1, 5, 10):
            m[f"top_rank_{pct}pct_energy"] = float(cum[max(1, int(pct / 100 * n)) - 1])
        base_s = math.sqrt(base_sq) * _base_shape(n, rng)
        post_s = np.sort(base_s * (1 + rng.normal(0, rel * 0.3, n)) + 0.2 * sig_d)[::-1]
        m["nss"] = float(np.linalg.norm(post_s - base_s) / np.linalg.norm(base_s))
        r_frac = idx / n
        left, right = r_frac ** proj_g, r_frac ** (proj_g * 1.05)
        joint = left * right
        for r in PROJ_R:
            k = max(1, int(r / 100 * n)) - 1
            m[f"principal_proj_{r}pct"], m[f"principal_proj_left_{r}pct"] = joint[k], left[k]
            m[f"principal_proj_right_{r}pct"] = right[k]
        for side, scale in (("left", 1.0), ("right", 1.3)):
            for k in ANGLE_K:
                if k > n:
                    continue
                ang = np.sort(angle0 * scale * np.exp(3 * np.arange(k) / k) * np.exp(rng.normal(0, 0.1, k)))
                ang = np.clip(ang, 0, math.pi / 2)
                arrays.append((f"angles_{side}_k{k}", ang))
                m[f"angle_{side}_mean_sin_k{k}"] = float(np.mean(np.sin(ang)))
                m[f"angle_{side}_max_rad_k{k}"] = float(ang.max())
        for a in ALPHAS:
            al = a / 100
            m[f"principal_coverage_{a}pct"] = 1 - (1 - al) ** prin_e
            m[f"principal_coverage_exact_{a}pct"] = 1 - (1 - al) ** (prin_e * 0.97)
            m[f"principal_coverage_r64_{a}pct"] = 1 - (1 - al) ** (prin_e * 1.05)
            m[f"principal_coverage_r64_exact_{a}pct"] = 1 - (1 - al) ** (prin_e * 1.02)
        hr, hc = min(rows, 128), min(cols, 128)
        row_eff = np.clip(1 + 0.5 * rng.standard_normal(rows), 0.05, None)
        col_eff = np.clip(1 + 0.3 * rng.standard_normal(cols), 0.05, None)
        row_eff[rng.choice(rows, max(1, rows // 40), replace=False)] *= 2.5      # a few hot rows (outlier features)
        img = changed * np.outer(_bin(row_eff, hr), _bin(col_eff, hc)) * np.exp(rng.normal(0, 0.05, (hr, hc)))
        arrays += [("spectrum", sig_d), ("base_spectrum", base_s), ("post_spectrum", post_s),
                   ("proj_joint_by_rank", joint), ("proj_left_by_rank", left), ("proj_right_by_rank", right),
                   ("proj_joint_grid", rank_grid(joint, n)), ("proj_left_grid", rank_grid(left, n)),
                   ("proj_right_grid", rank_grid(right, n)),
                   ("sparsity_map", np.clip(img, 0, 1)),
                   ("row_changed_frac", np.clip(changed * row_eff, 0, 1)),
                   ("col_changed_frac", np.clip(changed * col_eff, 0, 1))]
    metrics = [{"tensor": name, "metric": k, "value": float(v)} for k, v in m.items()]
    arr = [{"tensor": name, "name": k, "shape": list(v.shape), "values": np.asarray(v, float).ravel().tolist()}
           for k, v in arrays]
    return metrics, arr


def _base_shape(n: int, rng) -> np.ndarray:
    """Singular values of a trained weight: a few large outliers over a Marchenko–Pastur-like bulk."""
    x = np.arange(n) / n
    s = np.sqrt(np.clip(1 - x, 1e-4, None)) * (1 + 4 * np.exp(-np.arange(n) / max(2, n * 0.005)))
    s = np.sort(s * np.exp(rng.normal(0, 0.01, n)))[::-1]
    return s / np.linalg.norm(s)


def _bin(v: np.ndarray, k: int) -> np.ndarray:
    return np.array([c.mean() for c in np.array_split(v, k)])


def _cdf(z):
    from scipy.special import ndtr  # noqa: PLC0415 — scipy is a test dependency of the engine
    return ndtr(z)


def _ppf(p: float) -> float:
    from scipy.special import ndtri  # noqa: PLC0415
    return float(ndtri(min(max(p, 1e-9), 1 - 1e-9)))
