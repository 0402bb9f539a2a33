"""A tiny decoder-only transformer with exactly the Hugging Face Llama architecture and tensor names.

Pure torch, no ``transformers``: RMSNorm (fp32 variance), rotary embeddings in HF's ``rotate_half``
convention, grouped-query attention (query head ``h`` reads KV head ``h // (heads / kv_heads)``,
as HF's ``repeat_kv``), SwiGLU MLP, untied ``lm_head``, no biases. ``save_hf`` writes a folder that
``LlamaForCausalLM.from_pretrained`` loads as is: ``config.json`` + bf16 ``model.safetensors``.

    model = Llama(LlamaConfig(hidden_size=128, ...)); save_hf(model, "out/base"); load_hf("out/base")
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from opdviz.errors import CheckpointError
from opdviz.io.safefiles import Limits, read_json


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of the model; field names are those of HF ``LlamaConfig`` / ``config.json``."""

    vocab_size: int = 16
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf(self) -> dict:
        """The ``config.json`` dict (every key HF's LlamaConfig reads for this architecture)."""
        d = dataclasses.asdict(self)
        d.update({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": self.head_dim,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_scaling": None,
            "pretraining_tp": 1, "use_cache": True,
        })
        return dict(sorted(d.items()))

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        cfg = cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
        if d.get("head_dim", cfg.head_dim) != cfg.head_dim or d.get("tie_word_embeddings"):
            raise CheckpointError("the lab model needs head_dim == hidden_size / heads and untied embeddings; "
                                  f"config.json has head_dim={d.get('head_dim')}, "
                                  f"tie_word_embeddings={d.get('tie_word_embeddings')}")
        return cfg

    def n_params(self) -> int:
        h, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = 2 * h * self.num_attention_heads * hd + 2 * h * self.num_key_value_heads * hd
        return 2 * self.vocab_size * h + h + self.num_hidden_layers * (attn + 3 * h * f + 2 * h)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # HF computes the variance in fp32 and multiplies the weight after casting back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(cfg: LlamaConfig, seq_len: int, dtype=torch.float32):
    """cos, sin of shape [seq, head_dim]; frequencies duplicated (cat(f, f)) as HF does."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(h, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, h, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.nkv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # eager attention (as HF "eager"): explicit scores keep CPU results deterministic
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd) + mask
        out = scores.softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """``LlamaForCausalLM`` in miniature: ``model(input_ids [b, s]) -> logits [b, s, vocab]`` (fp32)."""

    def __init__(self, cfg: LlamaConfig, seed: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():  # HF init: N(0, initializer_range) for matrices, ones for norms
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * cfg.initializer_range)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        if s > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {s} tokens exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, s, x.dtype)
        mask = torch.full((s, s), float("-inf"), dtype=x.dtype).triu(1)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x)).float()


def expected_tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names → shapes ([out, in] for matrices) for ``cfg``."""
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, h),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, h),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * hd),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)}


def bf16_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict rounded to bf16 (round-to-nearest-even), contiguous, as it is saved."""
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def save_hf(model: Llama, folder: Path, extra_files: dict[str, dict] | None = None) -> Path:
    """Write ``config.json`` and bf16 ``model.safetensors`` (metadata format=pt) plus JSON ``extra_files``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
    save_file(bf16_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name, obj in (extra_files or {}).items():
        (folder / name).write_text(json.dumps(obj, indent=2) + "\n")
    return folder


def load_hf(folder: Path, dtype=torch.float32) -> Llama:
    """A ``Llama`` from an HF folder written by ``save_hf`` (weights cast to ``dtype``)."""
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing; regenerate the lab with `opdviz lab --out DIR`")
    cfg = LlamaConfig.from_hf(read_json(folder, "config.json", Limits.from_env()))
    model = Llama(cfg)
    sd = load_file(str(folder / "model.safetensors"))
    missing = set(model.state_dict()) ^ set(sd)
    if missing:
        raise CheckpointError(f"{folder / 'model.safetensors'}: tensor names differ from the config's: "
                              f"{sorted(missing)[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return model.to(dtype)
