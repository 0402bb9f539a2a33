"""Benchmark the precompute job on a Qwen2.5-0.5B-shaped bf16 pair, with a profile and a floor.

    .venv/bin/python bench/bench_engine.py [--out bench/out] [--device cpu] [--layers 24] [--posts 3]
                                           [--policy passive active] [--threads N]

Generates (once, cached under --out) a base and post-trained checkpoints with the shapes of
Qwen2.5-0.5B — 24 layers, hidden 896, FFN 4864, 14 heads / 2 KV heads (head_dim 64), vocab 151936,
untied lm_head, q/k/v biases; about 1.2 GB each in bf16 (``--layers 2`` for a quick iteration: the
two 151936×896 matrices stay, the layers go). Then, in child processes, for each OpenMP wait policy
asked for (``OMP_WAIT_POLICY``, stated beside every number):

- floor: a bare pass that reads every tensor pair and computes the exact singular values of W_base
  and ΔW (float64 Gram, eigvalsh; the same row chunks, symmetric Gram blocks and threads as the job):
  the least any exact analysis must do;
- one pair: ``opdviz compute BASE POST1``, every metric exact;
- ``--posts`` posts of one base: ``opdviz compute BASE POST1 … POSTn`` (each base tensor read and
  decomposed once).

Each reports wall time, peak RSS of its process, the load average around it, and for the jobs the
time by stage (reading, elementwise sparsity, base decomposition, update decomposition, geometry,
storing: ``job_stages_s`` of the job's progress file) and the share of the floor reached
(floor wall / job wall). A CPU job analyses two tensors at once (``opdviz.engine.parallel``), so its
stage times, summed over the tensors, add up to more than its wall; ``$OPDVIZ_TENSOR_WORKERS`` passes
through to the jobs (1: one tensor at a time, the stages then add up to the wall); ``--tensor-workers 2 1``
measures the jobs both ways, one after the other.

The post-trained weights are base + a sparse update (a random 35 % of coordinates, biased to
small |W|, magnitude ~1e-3·RMS) plus a rank-8 component, rounded to bf16 — the regime of
OPD/RL updates — so thresholds, masks and spectra do real work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CFG = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
       "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 151936, "tie_word_embeddings": False,
       "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "bfloat16",
       "attention_bias": True}
# Llama-2-7B (32 layers × 4096, FFN 11008, 32 heads, vocab 32000): 13.5 GB a checkpoint in bf16
CFG_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32000, "tie_word_embeddings": False,
          "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
          "attention_bias": False}
SHAPES = {"0.5b": CFG, "7b": CFG_7B}


def shapes(layers: int, cfg: dict = CFG) -> dict[str, tuple[int, ...]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out = {"model.embed_tokens.weight": (v, h)}
    bias = cfg.get("attention_bias")
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            out[p + f"self_attn.{proj}_proj.weight"] = (rows, h)
            if bias:
                out[p + f"self_attn.{proj}_proj.bias"] = (rows,)
        out.update({p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (f, h),
                    p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def generate(out: Path, layers: int, seed: int = 0, posts: int = 1, cfg: dict = CFG) -> tuple[Path, list[Path]]:
    """The base and ``posts`` post-trained checkpoints (post 0 as before; post i from seed + i)."""
    base_dir, post_dir = generate_pair(out, layers, seed, cfg)
    extra = [generate_post(out, layers, seed, i, cfg) for i in range(1, posts)]
    return base_dir, [post_dir, *extra]


def generate_post(out: Path, layers: int, seed: int, i: int, cfg: dict = CFG) -> Path:
    """Another post-trained checkpoint of the cached base: a different update (seed + i)."""
    folder = out / f"post{i}"
    stamp = out / f"generated-{layers}-post{i}.json"
    if stamp.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}, indent=1))
    g = torch.Generator().manual_seed(seed + 1000 * i)
    from opdviz.io.reader import Checkpoint

    names = shapes(layers, cfg)
    sd = {}
    with Checkpoint.open(out / "base") as base:
        for name, shape in names.items():
            wf = base.load(name).float()
            rms = wf.pow(2).mean().sqrt()
            upd = torch.randn(shape, generator=g) * ((1 + 0.5 * i) * 1e-3 * rms)
            if len(shape) == 2:
                a = torch.randn(shape[0], 8, generator=g)
                b = torch.randn(8, shape[1], generator=g)
                upd += (a @ b) * (3e-4 * rms / 8 ** 0.5)
            p_keep = torch.where(wf.abs() < wf.abs().median(), 0.5, 0.2) * (1 - 0.2 * i)
            upd *= torch.rand(shape, generator=g) < p_keep
            sd[name] = (wf + upd).to(torch.bfloat16)
            del wf, upd, p_keep
    _save(sd, folder, _split(list(names), 3))
    stamp.write_text(json.dumps({"layers": layers, "seed": seed, "post": i}))
    return folder


def generate_pair(out: Path, layers: int, seed: int = 0, cfg: dict = CFG) -> tuple[Path, Path]:
    base_dir, post_dir = out / "base", out / "post"
    stamp = out / (f"generated-{layers}.json" if cfg is CFG else f"generated-{cfg['model_type']}-{layers}.json")
    if stamp.exists():
        return base_dir, post_dir
    for old in out.glob("generated-*-post*.json"):      # other posts belong to the old base
        old.unlink()
    shutil.rmtree(base_dir, ignore_errors=True)
    shutil.rmtree(post_dir, ignore_errors=True)
    base_dir.mkdir(parents=True)
    post_dir.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    names = shapes(layers, cfg)
    # shard like HF: base in 2 shards, post in 3, so they differ
    order = list(names)
    for folder, n_shards, which in ((base_dir, 2, "base"), (post_dir, 3, "post")):
        (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}, indent=1))
    base_shards = _split(order, 2)
    post_shards = _split(order, 3)
    base_sd: dict[str, torch.Tensor] = {}
    post_sd: dict[str, torch.Tensor] = {}
    for name in order:
        shape = names[name]
        if len(shape) == 1:
            w = 1 + 0.05 * torch.randn(shape, generator=g) if "norm" in name else 0.02 * torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) / shape[1] ** 0.5
        wb = w.to(torch.bfloat16)
        wf = wb.float()
        rms = wf.pow(2).mean().sqrt()
        upd = torch.randn(shape, generator=g) * (1e-3 * rms)
        if len(shape) == 2:
            a = torch.randn(shape[0], 8, generator=g)
            b = torch.randn(8, shape[1], generator=g)
            upd += (a @ b) * (3e-4 * rms / 8 ** 0.5)
        p_keep = torch.where(wf.abs() < wf.abs().median(), 0.5, 0.2)
        upd *= torch.rand(shape, generator=g) < p_keep
        base_sd[name] = wb
        post_sd[name] = (wf + upd).to(torch.bfloat16)
        del w, wf, upd, p_keep
    _save(base_sd, base_dir, base_shards)
    _save(post_sd, post_dir, post_shards)
    stamp.write_text(json.dumps({"layers": layers, "seed": seed}))
    return base_dir, post_dir


def _split(order: list[str], n: int) -> list[list[str]]:
    per = -(-len(order) // n)
    return [order[i * per:(i + 1) * per] for i in range(n)]


def _save(sd: dict[str, torch.Tensor], folder: Path, shards: list[list[str]]) -> None:
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k] for k in names}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def floor_pass(base: Path, post: Path, device: str = "cpu") -> dict:
    """The floor: read every tensor pair; for 2-D ones the exact σ of W_base and ΔW (float64 Gram of the
    smaller side, lower triangle only as the job's ``add_sym_gram``, eigvalsh), row-chunked like the job.
    Returns seconds and what was done."""
    from opdviz.metrics.linalg import add_sym_gram, chunk_rows
    from opdviz.io.reader import Checkpoint, plan_pairs

    dev = torch.device("cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    read_s = n = 0
    with Checkpoint.open(base) as b, Checkpoint.open(post) as p:
        for item in plan_pairs(b, p):
            if item.status != "ok":
                continue
            t = time.perf_counter()
            wb, wp = b.load(item.base.name, dev), p.load(item.post.name, dev)
            read_s += time.perf_counter() - t
            n += 1
            if wb.dim() != 2 or min(wb.shape) < 2:
                continue
            if wb.shape[0] < wb.shape[1]:
                wb, wp = wb.T, wp.T
            m, k = wb.shape
            rows = min(m, chunk_rows(k, wb.device))
            f64 = dict(dtype=torch.float64, device=dev)
            gb, gd = torch.zeros(k, k, **f64), torch.zeros(k, k, **f64)
            b64, d64 = torch.empty(rows, k, **f64), torch.empty(rows, k, **f64)
            d32 = torch.empty(rows, k, dtype=torch.float32, device=dev)
            for i in range(0, m, rows):
                r = min(rows, m - i)
                d32[:r].copy_(wp[i:i + r])
                d32[:r].sub_(wb[i:i + r])
                b64[:r].copy_(wb[i:i + r])
                d64[:r].copy_(d32[:r])
                add_sym_gram(gb, b64[:r])
                add_sym_gram(gd, d64[:r])
            # eigvalsh reads the lower triangle, the one add_sym_gram fills (the float() synchronises a GPU)
            float(torch.linalg.eigvalsh(gb)[-1] + torch.linalg.eigvalsh(gd)[-1])
            del wb, wp
    return {"wall_s": time.perf_counter() - t0, "read_s": read_s, "tensors": n, "device": str(dev)}


STAGES = ("read", "elementwise", "base_decomposition", "base_cache", "update_decomposition", "geometry", "store")


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` under a small wrapper process that reports its own peak RSS; plus wall and load."""
    wrapper = [sys.executable, "-c", "import json, resource, subprocess, sys, time; t = time.time(); "
               "rc = subprocess.run(sys.argv[1:]).returncode; "
               "print(json.dumps({'rc': rc, 'wall_s': time.time() - t, "
               "'rss_gb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2}))", *cmd]
    load0 = os.getloadavg()[0]
    proc = subprocess.run(wrapper, capture_output=True, text=True, env=env)
    load1 = os.getloadavg()[0]
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    out = json.loads(lines[-1])
    if out["rc"] != 0:
        raise SystemExit(f"benchmark step failed ({out['rc']}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    out.update(load=(load0, load1), stdout="\n".join(lines[:-1]))
    return out


def job_stages(db: Path, run: str) -> dict:
    from opdviz.store import slug

    path = Path(str(db) + ".staging") / "progress" / f"{slug(run)}.json"
    return json.loads(path.read_text()).get("job_stages_s") or {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b",
                    help="0.5b: Qwen2.5-0.5B shapes (default); 7b: Llama-2-7B shapes (13.5 GB a checkpoint)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--spectrum", default="exact")
    ap.add_argument("--posts", type=int, default=3, help="posts of one base in the shared run (1: skip it)")
    ap.add_argument("--policy", nargs="+", default=["passive"], choices=["passive", "active"],
                    help="OpenMP wait policies to measure (OMP_WAIT_POLICY); default: passive")
    ap.add_argument("--threads", type=int, default=None, help="--threads of the job (default: its own choice)")
    ap.add_argument("--tensor-workers", nargs="+", type=int, default=None, metavar="N",
                    help="tensors analysed at once by the jobs ($OPDVIZ_TENSOR_WORKERS), each value measured in "
                         "turn, e.g. 2 1 (default: the job's own choice)")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--no-cache-run", dest="cache_run", action="store_false",
                    help="skip the second one-pair job that reuses the base cache of the first")
    ap.add_argument("--floor", nargs=2, type=Path, metavar=("BASE", "POST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    if args.floor:                      # child mode: the floor pass, one JSON line
        from opdviz.engine.threads import apply_threads

        apply_threads(args.threads)
        print(json.dumps(floor_pass(*args.floor, device=args.device)))
        return 0

    cfg = SHAPES[args.shape]
    args.layers = args.layers or cfg["num_hidden_layers"]
    t0 = time.time()
    base, posts = generate(args.out, args.layers, posts=max(1, args.posts), cfg=cfg)
    gen_s = time.time() - t0
    pair_bytes = sum(f.stat().st_size for d in (base, posts[0]) for f in d.glob("*.safetensors"))
    from opdviz.engine.threads import choose_threads

    threads = choose_threads(args.threads)
    model = "Qwen2.5-0.5B" if args.shape == "0.5b" else "Llama-2-7B"
    print(f"input: {model}-shaped bf16, {args.layers} layers, {pair_bytes / 1e9:.2f} GB a pair, "
          f"{len(posts)} post(s) (generated/cached in {gen_s:.0f} s)")
    print(f"device: {args.device}, spectrum: {args.spectrum}, torch threads: {threads} "
          f"(cores available: {len(os.sched_getaffinity(0))}), policies: {', '.join(args.policy)}")
    thread_flag = ["--threads", str(args.threads)] if args.threads else []
    results = []
    for policy in args.policy:
        env = {**os.environ, "OMP_WAIT_POLICY": policy.upper(), "PYTHONPATH": str(root)}
        floor = None
        if not args.skip_floor:
            f = measure([sys.executable, __file__, "--floor", str(base), str(posts[0]), "--device", args.device,
                         *thread_flag], env)
            floor = {**json.loads(f["stdout"].splitlines()[-1]), "rss_gb": f["rss_gb"], "load": f["load"]}
            print(f"\n[{policy}] floor (read every pair + float64 Gram eigvalsh of W_base and ΔW): "
                  f"{floor['wall_s']:.1f} s (reading {floor['read_s']:.1f} s), peak RSS {floor['rss_gb']:.2f} GB, "
                  f"load {floor['load'][0]:.1f}→{floor['load'][1]:.1f}")
        for workers in args.tensor_workers or [None]:
            wenv = {**env, "OPDVIZ_TENSOR_WORKERS": str(workers)} if workers else env
            tag = f"{policy}, {workers} tensor(s) at once" if workers else policy
            suffix = f"-w{workers}" if workers else ""
            runs = [("one pair", posts[:1], "one", True)]
            if len(posts) > 1:
                runs.append((f"{len(posts)} posts of one base", posts, "posts", True))
            if args.cache_run:
                runs.append(("one pair again, base cache kept by the first", posts[:1], "one", False))
            one_wall = None
            for label, ps, db_name, fresh in runs:
                db = args.out / f"bench-{policy}-{db_name}{suffix}.duckdb"
                if fresh:
                    for p in (db, *(Path(str(db) + x) for x in (".staging", ".wal", ".cache"))):
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                names = [f"bench{i}" if fresh else f"again{i}" for i in range(len(ps))]
                cmd = [sys.executable, "-m", "opdviz.cli", "compute", str(base), *map(str, ps), "--name", *names,
                       "--method", "synthetic", "--db", str(db), "--device", args.device, "--spectrum", args.spectrum,
                       "--no-progress", *thread_flag]
                r = measure(cmd, wenv)
                st = job_stages(db, names[0])
                one_wall = one_wall or r["wall_s"]
                line = (f"[{tag}] {label}: wall {r['wall_s']:.1f} s, peak RSS {r['rss_gb']:.2f} GB, "
                        f"load {r['load'][0]:.1f}→{r['load'][1]:.1f}")
                if floor:
                    line += f", floor/wall {floor['wall_s'] / r['wall_s']:.0%}" + (
                        f" (floor × {len(ps)} posts: {len(ps) * floor['wall_s'] / r['wall_s']:.0%})" if len(ps) > 1 else "")
                if label != "one pair":
                    line += f", {r['wall_s'] / one_wall:.2f}× one pair"
                if st.get("gpu_peak_gb"):
                    line += f", peak GPU memory {st['gpu_peak_gb']:.2f} GB"
                print(line)
                known = sum(st.get(k, 0.0) for k in STAGES)
                wall = st.get("wall", r["wall_s"])
                print("   stages: " + ", ".join(f"{k} {st.get(k, 0.0):.1f} s" for k in STAGES)
                      + (f", other {wall - known:.1f} s" if known <= wall else
                         f" (summed over the tensors analysed at once: {known / wall:.2f}× the job's wall)")
                      + f" (job wall {st.get('wall', 0):.1f} s)")
                results.append({"policy": policy, "tensor_workers": workers, "run": label,
                                **{k: v for k, v in r.items() if k != "stdout"}, "stages": st, "floor": floor})
    if args.posts >= 1:
        from opdviz.store import Store

        last = (args.tensor_workers or [None])[-1]
        st = Store(args.out / f"bench-{args.policy[0]}-one{f'-w{last}' if last else ''}.duckdb")
        q = "FROM tensors WHERE run_id = 'bench0'"
        counts = st.query(f"SELECT status, count(*) AS n {q} AND parent = '' GROUP BY status")
        exact = st.query("SELECT avg(value) AS e FROM metrics WHERE metric = 'spectrum_exact' AND run_id = 'bench0'"
                         )["e"][0]
        slowest = st.query(f"SELECT tensor, seconds {q} ORDER BY seconds DESC LIMIT 5")
        print(f"\ntensors by status (one pair): {dict(zip(counts['status'], counts['n']))}; "
              f"share with exact spectrum: {exact:.2f}")
        print("slowest tensors (one pair):\n" + slowest.to_string(index=False))
    (args.out / "bench_engine.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
