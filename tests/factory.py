"""Tiny real checkpoints for tests: Llama-named bf16 safetensors, single-file or sharded HF folders.

``make_llama_state(...)`` builds a base state dict; ``post_train(state, ...)`` derives a
post-trained one with a sparse, low-magnitude-biased update (like OPD/RL); ``save_checkpoint``
writes it as a single file or as shards with ``model.safetensors.index.json`` and ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_config(layers=2, hidden=64, ffn=160, heads=4, kv_heads=2, vocab=96, tied=False) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "head_dim": hidden // heads, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
    }


def make_llama_state(cfg: dict | None = None, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A random Llama state dict with HF names, [out, in] weights, in ``dtype``."""
    cfg = cfg or llama_config()
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(out, inp):
        return (torch.randn(out, inp, generator=g) / inp ** 0.5).to(dtype)

    sd = {"model.embed_tokens.weight": w(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = w(q, h)
        sd[p + "self_attn.k_proj.weight"] = w(kv, h)
        sd[p + "self_attn.v_proj.weight"] = w(kv, h)
        sd[p + "self_attn.o_proj.weight"] = w(h, q)
        sd[p + "mlp.gate_proj.weight"] = w(f, h)
        sd[p + "mlp.up_proj.weight"] = w(f, h)
        sd[p + "mlp.down_proj.weight"] = w(h, f)
        sd[p + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
        sd[p + "post_attention_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
    sd["model.norm.weight"] = torch.ones(h, dtype=dtype)
    if not cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = w(v, h)
    return sd


def post_train(base: dict[str, torch.Tensor], seed: int = 1, density: float = 0.3,
               scale: float = 2e-3, low_rank: int = 2) -> dict[str, torch.Tensor]:
    """A post-trained copy: a sparse update on a random subset of coordinates, biased to small |W|,
    plus a low-rank component on 2-D tensors, rounded back to the base dtype (so bf16 absorbs some)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in base.items():
        wf = w.float()
        noise = torch.randn(wf.shape, generator=g) * scale
        if wf.dim() == 2 and min(wf.shape) > low_rank:
            a = torch.randn(wf.shape[0], low_rank, generator=g)
            b = torch.randn(low_rank, wf.shape[1], generator=g)
            noise = noise + scale * (a @ b) / low_rank
        small = wf.abs() < wf.abs().median()
        keep = torch.rand(wf.shape, generator=g) < torch.where(small, 1.5 * density, 0.5 * density).clamp(max=1)
        out[name] = (wf + noise * keep).to(w.dtype)
    return out


def save_checkpoint(sd: dict[str, torch.Tensor], folder: Path, *, shards: int = 1, config: dict | None = None,
                    single_file: bool = False) -> Path:
    """Write ``sd`` under ``folder``: ``model.safetensors`` (shards=1), or N shards plus an index.

    With ``single_file=True`` returns the path of a bare ``.safetensors`` file instead of a folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if single_file:
        path = folder / "weights.safetensors"
        save_file(sd, str(path))
        return path
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    if shards <= 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def make_pair(root: Path, *, cfg: dict | None = None, base_shards: int = 2, post_shards: int = 3,
              seed: int = 0, **post_kw) -> tuple[Path, Path]:
    """A base folder and a post-trained folder sharded differently; returns (base_dir, post_dir)."""
    cfg = cfg or llama_config()
    base = make_llama_state(cfg, seed=seed)
    post = post_train(base, seed=seed + 1, **post_kw)
    b = save_checkpoint(base, Path(root) / "base", shards=base_shards, config=cfg)
    p = save_checkpoint(post, Path(root) / "post", shards=post_shards, config=cfg)
    return b, p
