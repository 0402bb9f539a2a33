"""Layouts of stored tensors: orientation as [out, in] matrices, and the parts of fused tensors.

``matrix_view`` orients a stored tensor as a 2-D ``[out, in]`` matrix (GPT-2 Conv1D and GPT-OSS /
Llama-4 expert stacks are stored ``[in, out]``). ``fused_parts`` / ``split_part`` cut fused tensors
(q/k/v, gate/up, per-expert slices of 3-D stacks) into the matrices the model really multiplies by.
Names are parsed by ``opdviz.io.naming``; the layout of a fused tensor comes from its config.

Run its tests with ``.venv/bin/pytest tests/io/test_naming.py -q``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from opdviz.errors import OpdvizError
from opdviz.io.naming import parse_name

# ---------------------------------------------------------------------------------------------
# Configs


def _subconfig(name: str, config: dict | None) -> dict:
    """The config block that describes the tower ``name`` belongs to (VLMs nest text/vision configs)."""
    if not config:
        return {}
    tower = parse_name(name).tower
    key = {"text": "text_config", "vision": "vision_config", "audio": "audio_config"}[tower]
    sub = config.get(key)
    if isinstance(sub, dict):
        merged = dict(sub)
        merged.setdefault("model_type", sub.get("model_type") or config.get("model_type"))
        return merged
    return config


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _model_type(cfg: dict) -> str:
    return str(cfg.get("model_type") or "").lower()


# ---------------------------------------------------------------------------------------------
# Orientation

# GPT-2's Conv1D stores weights [in, out]; GPT-BigCode and Qwen-1 reuse the ``c_attn`` names with
# nn.Linear ([out, in]). Without a model_type we assume GPT-2.
_CONV1D_MODULES = re.compile(r"(?:^|\.)(?:c_attn|c_proj|c_fc|q_attn)\.weight$")
_CONV1D_MODEL_TYPES = {"", "gpt2", "imagegpt", "decision_transformer"}
# Expert stacks stored [E, in, out] (they multiply with bmm(x, W)); others are [E, out, in].
_IN_OUT_EXPERT_MODEL_TYPES = {"gpt_oss", "llama4", "llama4_text"}
_EXPERTS_RE = re.compile(r"experts\.(?P<which>gate_up_proj|down_proj)(?P<p>_bias)?$")


# 2-D weights stored [in, out] whatever the model type (used as ``x @ W``).
_IN_OUT_2D = re.compile(r"(?:^|\.)mm_input_projection_weight$")  # Gemma-3 projector


def _is_conv1d(name: str, cfg: dict) -> bool:
    """True for 2-D weights stored [in, out]: GPT-2 Conv1D and a few ``x @ W`` parameters."""
    if _IN_OUT_2D.search(name):
        return True
    return bool(_CONV1D_MODULES.search(name)) and _model_type(cfg) in _CONV1D_MODEL_TYPES


def _experts_in_out(name: str, shape: tuple[int, ...], cfg: dict) -> bool:
    """True when a 3-D expert stack is stored [E, in, out].

    Rule: with hidden_size and the expert width (``moe_intermediate_size``, else
    ``intermediate_size``) in the config, the shape decides: gate_up [E, 2I, H] / down [E, H, I] are
    [out, in]; gate_up [E, H, 2I] / down [E, I, H] are [in, out]. When the shape cannot tell
    (H == 2I, or no sizes), model_type decides (gpt_oss, llama4 → [in, out]); default [out, in],
    the transformers convention for converted Mixtral/Qwen-MoE/DeepSeek stacks.
    """
    which = _EXPERTS_RE.search(name)["which"]
    hidden = _get(cfg, "hidden_size", "d_model")
    inter = _get(cfg, "moe_intermediate_size", "intermediate_size")
    if hidden and inter:
        out_in, in_out = ((2 * inter, hidden), (hidden, 2 * inter)) if which == "gate_up_proj" \
            else ((hidden, inter), (inter, hidden))
        if tuple(shape[1:]) == out_in and out_in != in_out:
            return False
        if tuple(shape[1:]) == in_out and out_in != in_out:
            return True
    return _model_type(cfg) in _IN_OUT_EXPERT_MODEL_TYPES


def matrix_view(name: str, tensor: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """A view of ``tensor`` as a matrix oriented [out, in] (rows = output features).

    2-D weights: as stored, except GPT-2 Conv1D weights (``c_attn``, ``c_proj``, ``c_fc``, when
    model_type is gpt2 or absent) and Gemma-3's ``mm_input_projection_weight``, which are stored
    [in, out] and returned transposed (a non-contiguous ``.T`` view). 1-D and 0-D tensors are returned unchanged.
    3-D fused expert stacks → (E·out, in) (a copy only when stored [E, in, out]). Other N-D tensors
    (conv patch embeddings, [out, in, kh, kw(, kt)]) → (shape[0], -1).
    """
    cfg = _subconfig(name, config)
    if tensor.dim() <= 1:
        return tensor
    if tensor.dim() == 2:
        return tensor.T if _is_conv1d(name, cfg) else tensor
    if tensor.dim() == 3 and _EXPERTS_RE.search(name):
        if _experts_in_out(name, tuple(tensor.shape), cfg):
            tensor = tensor.transpose(1, 2)
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor.reshape(tensor.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# Fused layouts


@dataclass(frozen=True)
class Part:
    """One piece of a fused tensor: ``suffix`` ("q", "up", "3.gate", "3.down") names it."""

    suffix: str
    module: str
    expert: int | None

    def name(self, parent: str) -> str:
        return f"{parent}[{self.suffix}]"


def _qkv_rows(name: str, rows: int, cfg: dict) -> dict[str, torch.Tensor | slice] | None:
    """Row selections of q, k, v inside an oriented fused qkv tensor, or None if unknown.

    Layouts (rows of the [out, in] matrix):
      concatenated q | k | v  — Phi-3 ``qkv_proj`` (GQA sizes from heads/kv heads/head_dim),
          GPT-2 ``c_attn``, Qwen-VL ``attn.qkv``, nn.MultiheadAttention ``in_proj`` (thirds),
          Falcon multi-query (n_head q heads, then 1 k head, then 1 v head), GPT-BigCode MQA.
      per head [heads, 3, head_dim] — GPT-NeoX, BLOOM, Falcon without multi_query.
      grouped [kv_heads, q_per_kv + 2, head_dim] — Falcon new_decoder_architecture.
    """
    mt = _model_type(cfg)
    heads = _get(cfg, "num_attention_heads", "n_head", "num_heads")
    hidden = _get(cfg, "hidden_size", "n_embd", "d_model", "embed_dim")
    head_dim = _get(cfg, "head_dim") or (hidden // heads if hidden and heads else None)

    def concat(sizes: tuple[int, int, int]):
        if sum(sizes) != rows:
            return None
        a, b = sizes[0], sizes[0] + sizes[1]
        return {"q": slice(0, a), "k": slice(a, b), "v": slice(b, rows)}

    if "query_key_value" in name:
        if not heads or not head_dim:
            return None
        falcon = mt in {"falcon", "refinedweb", "refinedwebmodel"} or (
            mt not in {"bloom", "gpt_neox"} and ("new_decoder_architecture" in cfg or "multi_query" in cfg))
        # old "RefinedWeb" configs (Falcon-40B) imply the new decoder architecture without the key
        if falcon and cfg.get("new_decoder_architecture", mt == "refinedweb"):
            kv = _get(cfg, "num_kv_heads", "n_head_kv", "num_key_value_heads", default=heads)
            if kv <= 0 or heads % kv or kv * (heads // kv + 2) * head_dim != rows:
                return None
            grid = torch.arange(rows).view(kv, heads // kv + 2, head_dim)
            return {"q": grid[:, :-2].reshape(-1), "k": grid[:, -2].reshape(-1), "v": grid[:, -1].reshape(-1)}
        if falcon and cfg.get("multi_query", True):
            return concat((heads * head_dim, head_dim, head_dim))
        if not falcon and mt not in _PER_HEAD_QKV_MODEL_TYPES:  # e.g. ChatGLM: another layout
            return None
        if heads * 3 * head_dim != rows:
            return None
        grid = torch.arange(rows).view(heads, 3, head_dim)
        return {"q": grid[:, 0].reshape(-1), "k": grid[:, 1].reshape(-1), "v": grid[:, 2].reshape(-1)}
    if "qkv_proj" in name or "Wqkv" in name:
        kv = _get(cfg, "num_key_value_heads", default=heads)
        if not heads or not head_dim:
            return None
        return concat((heads * head_dim, kv * head_dim, kv * head_dim))
    if "c_attn" in name and mt == "gpt_bigcode" and cfg.get("multi_query", True):
        return concat((hidden, head_dim, head_dim)) if hidden and head_dim else None
    if rows % 3 == 0:  # c_attn (GPT-2), attn.qkv (Qwen-VL vision), head.attention.in_proj (SigLIP)
        t = rows // 3
        return concat((t, t, t))
    return None


# ``query_key_value`` laid out per head [heads, 3, head_dim] (besides Falcon without multi_query).
_PER_HEAD_QKV_MODEL_TYPES = {"gpt_neox", "bloom", "persimmon"}


def _gate_up_rows(rows: int, interleaved: bool) -> dict[str, torch.Tensor | slice] | None:
    if rows % 2:
        return None
    if interleaved:  # GPT-OSS: gate = even rows, up = odd rows
        return {"gate": slice(0, rows, 2), "up": slice(1, rows, 2)}
    return {"gate": slice(0, rows // 2), "up": slice(rows // 2, rows)}


def _part_rows(name: str, rows: int, cfg: dict) -> dict[str, torch.Tensor | slice] | None:
    """Row selections of the parts of one (per-expert) oriented matrix; None when not fused/unknown."""
    p = parse_name(name)
    if p.module == "qkv":
        return _qkv_rows(name, rows, cfg)
    if p.module == "gate_up":
        return _gate_up_rows(rows, interleaved=False)
    if p.module == "experts" and "gate_up_proj" in name:
        return _gate_up_rows(rows, interleaved=_model_type(cfg) == "gpt_oss")
    return None


def _oriented_rows(name: str, shape: tuple[int, ...], cfg: dict) -> int:
    """Number of output rows of one (per-expert) matrix after orientation."""
    if len(shape) == 3:
        return shape[1] if not _experts_in_out(name, shape, cfg) else shape[2]
    if len(shape) == 2 and _EXPERTS_RE.search(name):  # expert bias stack [E, out]
        return shape[1]
    if len(shape) == 2 and _is_conv1d(name, cfg):
        return shape[1]
    return shape[0]


def fused_parts(name: str, shape: tuple[int, ...], config: dict | None) -> list[Part]:
    """The parts of a fused tensor, or [] when it is not fused or its layout cannot be known.

    Covers q/k/v of fused attention (weights and biases), gate/up of ``gate_up_proj``, and 3-D
    expert stacks (``experts.gate_up_proj`` → "E.gate", "E.up"; ``experts.down_proj`` → "E.down";
    their 2-D ``*_bias`` stacks likewise). Sizes are checked against ``shape``; a mismatch gives [].
    """
    cfg = _subconfig(name, config)
    shape = tuple(shape)
    module = parse_name(name).module
    stacked = bool(_EXPERTS_RE.search(name)) and len(shape) in (2, 3) and module == "experts"
    if not stacked and (len(shape) not in (1, 2) or module == "experts"):
        return []
    if stacked and len(shape) == 3 and parse_name(name).param != "weight":
        return []
    rows = _oriented_rows(name, shape, cfg)
    sel = _part_rows(name, rows, cfg)
    if stacked:
        if "down_proj" in name:
            return [Part(f"{e}.down", "down", e) for e in range(shape[0])]
        if sel is None:  # odd gate_up width: still split per expert, whole
            return [Part(str(e), "experts", e) for e in range(shape[0])]
        return [Part(f"{e}.{k}", k, e) for e in range(shape[0]) for k in sel]
    if sel is None:
        return []
    return [Part(k, k, None) for k in sel]


def split_part(name: str, tensor: torch.Tensor, part: Part, config: dict | None) -> torch.Tensor:
    """The part's own matrix, oriented [out, in] (1-D for bias parts).

    Args: ``tensor`` — the ORIGINAL stored tensor (not ``matrix_view``'s output); ``part`` — one of
    ``fused_parts(name, tensor.shape, config)``. Concatenated and GPT-OSS interleaved parts are
    (possibly strided) views; per-head layouts (NeoX, BLOOM, Falcon) are gathered into copies.
    Raises: ``OpdvizError`` when ``part`` does not belong to this tensor's layout.
    """
    cfg = _subconfig(name, config)
    x = tensor
    if part.expert is not None and _EXPERTS_RE.search(name):
        x = tensor[part.expert]
        if x.dim() == 2 and _experts_in_out(name, tuple(tensor.shape), cfg):
            x = x.T
        key = part.suffix.split(".", 1)[1] if "." in part.suffix else None
    else:
        x = matrix_view(name, tensor, config)
        key = part.suffix
    if key is None or key == "down":
        return x
    sel = _part_rows(name, x.shape[0], cfg)
    if sel is None or key not in sel:
        raise OpdvizError(f"{name}: no part {part.suffix!r} in this layout; use fused_parts() to list parts")
    return x[sel[key]]
