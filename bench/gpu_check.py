"""GPU against CPU on a small pair: every stored metric and array within the documented tolerances.

    python bench/gpu_check.py [--out DIR]

Builds a small bf16 Llama-shaped pair (two posts of one base, so the shared base work runs too),
computes it with ``--device cpu`` and ``--device cuda`` (exact spectra), and compares run by run:

- scalars: |gpu − cpu| ≤ 1e-6·|cpu| + 1e-9 (float64 Grams on both; GPU BLAS sums in another order),
  except principal coverage, whose float32 reconstruction may order ties differently: one selected
  element of slack, 2/|U| (U = the changed mask);
- arrays (spectra, angles, projections, maps): |gpu − cpu| ≤ 1e-6·max|cpu| + 1e-9 elementwise.

Exits 0 when everything agrees, 1 with the worst offenders otherwise, 3 without CUDA.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

REL, ABS = 1e-6, 1e-9


def build(root: Path) -> tuple[Path, list[Path]]:
    import factory

    cfg = factory.llama_config(layers=2, hidden=256, ffn=704, heads=8, kv_heads=2, vocab=4096)
    base = factory.make_llama_state(cfg, seed=0)
    b = factory.save_checkpoint(base, root / "base", shards=2, config=cfg)
    posts = [factory.save_checkpoint(factory.post_train(base, seed=1 + i, density=0.2 + 0.2 * i),
                                     root / f"post{i}", shards=2, config=cfg) for i in range(2)]
    return b, posts


def compute(base: Path, posts: list[Path], db: Path, device: str) -> None:
    from opdviz.engine.runner import JobSpec, run_jobs
    from opdviz.options import AnalysisOptions

    opts = AnalysisOptions(device=device, spectrum="exact", base_cache=False)
    specs = [JobSpec(base=base, post=p, run_id=f"r{i}", method="check", db=db, options=opts)
             for i, p in enumerate(posts)]
    rows = run_jobs(specs, progress=False)
    bad = [r for r in rows if r["status"] != "done" or r["n_failed"]]
    if bad:
        raise SystemExit(f"{device}: runs did not finish cleanly: {bad}")


def compare(cpu_db: Path, gpu_db: Path) -> list[str]:
    from opdviz.store import Store

    problems = []
    cpu, gpu = Store(cpu_db), Store(gpu_db)
    for run in ("r0", "r1"):
        q = "SELECT tensor, metric, value FROM metrics WHERE run_id = ?"
        a = cpu.query(q, [run]).set_index(["tensor", "metric"])["value"]
        b = gpu.query(q, [run]).set_index(["tensor", "metric"])["value"]
        if set(a.index) != set(b.index):
            problems.append(f"{run}: metric sets differ ({len(set(a.index) ^ set(b.index))} names)")
            continue
        b = b.loc[a.index]
        for (tensor, metric), x in a.items():
            y = b[(tensor, metric)]
            if np.isnan(x) and np.isnan(y):
                continue
            if metric.startswith("principal_coverage"):
                crit = "sparsity_exact" if "_exact_" in metric else None
                numel = int(cpu.query("SELECT numel FROM tensors WHERE run_id = ? AND tensor = ?",
                                      [run, tensor])["numel"][0])
                sp = a[(tensor, crit)] if crit else a[(tensor, "sparsity_abs_1e-5")]
                tol = 2 / max(1.0, (1 - sp) * numel)
            else:
                tol = REL * abs(x) + ABS
            if not abs(x - y) <= tol:
                problems.append(f"{run} {tensor} {metric}: cpu {x!r} gpu {y!r} (tolerance {tol:.2g})")
        q = "SELECT tensor, name, values FROM arrays WHERE run_id = ?"
        a = cpu.query(q, [run]).set_index(["tensor", "name"])["values"]
        b = gpu.query(q, [run]).set_index(["tensor", "name"])["values"]
        for key, x in a.items():
            x, y = np.asarray(x, dtype=float), np.asarray(b[key], dtype=float)
            if x.shape != y.shape:
                problems.append(f"{run} {key}: shapes {x.shape} vs {y.shape}")
                continue
            tol = REL * np.nanmax(np.abs(x), initial=0.0) + ABS
            diff = np.abs(x - y)
            both_nan = np.isnan(x) & np.isnan(y)
            if not np.all(both_nan | (diff <= tol)):
                problems.append(f"{run} {key}: max |gpu − cpu| {np.nanmax(diff):.3g} > {tol:.3g}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--dry-run-on-cpu", action="store_true",
                    help="compute the 'GPU' side on the CPU too: checks this script, proves nothing about GPUs")
    args = ap.parse_args()
    second = "cpu" if args.dry_run_on_cpu else "cuda"
    if second == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device; run this on a machine with an NVIDIA "
              "GPU and a CUDA build of torch.", file=sys.stderr)
        return 3
    work = args.out or Path(tempfile.mkdtemp(prefix="opdviz-gpu-check-"))
    try:
        base, posts = build(work / "ckpt")
        compute(base, posts, work / "cpu.duckdb", "cpu")
        compute(base, posts, work / "gpu.duckdb", second)
        problems = compare(work / "cpu.duckdb", work / "gpu.duckdb")
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: {torch.cuda.get_device_name(0) if second == 'cuda' else 'CPU dry run'}, torch {torch.__version__}")
    if problems:
        print(f"GPU and CPU disagree on {len(problems)} values:", *problems[:40], sep="\n  ")
        return 1
    print("GPU results agree with CPU results within the documented tolerances (2 runs, every metric and array).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
