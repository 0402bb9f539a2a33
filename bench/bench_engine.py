"""Benchmark the precompute job on a Qwen2.5-0.5B-shaped bf16 pair.

    .venv/bin/python bench/bench_engine.py [--out bench/out] [--device cpu] [--layers 24]

Generates (once, cached under --out) a base and a post-trained checkpoint with the shapes of
Qwen2.5-0.5B — 24 layers, hidden 896, FFN 4864, 14 heads / 2 KV heads (head_dim 64), vocab 151936,
untied lm_head, q/k/v biases; about 1.2 GB each in bf16 — then runs a full exact
``opdviz compute`` in a child process and reports wall time, throughput (bytes of checkpoint pairs
per second, tensors per second) and the child's peak RSS.

The post-trained weights are base + a sparse update (a random 35 % of coordinates, biased to
small |W|, magnitude ~1e-3·RMS) plus a rank-8 component, rounded to bf16 — the regime of
OPD/RL updates — so thresholds, masks and spectra do real work.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CFG = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
       "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 151936, "tie_word_embeddings": False,
       "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "bfloat16"}


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, f, v = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"]
    q, kv = CFG["num_attention_heads"] * CFG["head_dim"], CFG["num_key_value_heads"] * CFG["head_dim"]
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (f, h),
                    p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def generate(out: Path, layers: int, seed: int = 0) -> tuple[Path, Path]:
    base_dir, post_dir = out / "base", out / "post"
    stamp = out / f"generated-{layers}.json"
    if stamp.exists():
        return base_dir, post_dir
    shutil.rmtree(base_dir, ignore_errors=True)
    shutil.rmtree(post_dir, ignore_errors=True)
    base_dir.mkdir(parents=True)
    post_dir.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    names = shapes(layers)
    # shard like HF: base in 2 shards, post in 3, so they differ
    order = list(names)
    for folder, n_shards, which in ((base_dir, 2, "base"), (post_dir, 3, "post")):
        (folder / "config.json").write_text(json.dumps({**CFG, "num_hidden_layers": layers}, indent=1))
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out", type=Path)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--spectrum", default="exact")
    args = ap.parse_args()
    t0 = time.time()
    base, post = generate(args.out, args.layers)
    gen_s = time.time() - t0
    db = args.out / "bench.duckdb"
    for p in (db, Path(str(db) + ".staging")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    nbytes = sum(f.stat().st_size for d in (base, post) for f in d.glob("*.safetensors"))
    cmd = [sys.executable, "-m", "opdviz.cli", "compute", str(base), str(post), "--name", "bench",
           "--method", "synthetic", "--db", str(db), "--device", args.device, "--spectrum", args.spectrum,
           "--no-progress"]
    t1 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t1
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return proc.returncode
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from opdviz.store import Store

    st = Store(db)
    counts = st.query("SELECT status, count(*) AS n FROM tensors WHERE parent = '' GROUP BY status")
    exact = st.query("SELECT avg(value) AS e FROM metrics WHERE metric = 'spectrum_exact'")["e"][0]
    slowest = st.query("SELECT tensor, seconds FROM tensors ORDER BY seconds DESC LIMIT 5")
    n_tensors = int(counts["n"].sum())
    print(f"input: Qwen2.5-0.5B-shaped bf16 pair, {args.layers} layers, {nbytes / 1e9:.2f} GB of checkpoints "
          f"(generated/cached in {gen_s:.0f} s)")
    print(f"device: {args.device}, spectrum: {args.spectrum}, torch threads: {torch.get_num_threads()}")
    print(f"wall time: {wall:.1f} s   throughput: {nbytes / wall / 1e6:.1f} MB/s, {n_tensors / wall:.2f} tensors/s")
    print(f"peak RSS (job process): {peak_kb / 1024 ** 2:.2f} GB")
    print(f"tensors by status: {dict(zip(counts['status'], counts['n']))}; share with exact spectrum: {exact:.2f}")
    print("slowest tensors:\n" + slowest.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
