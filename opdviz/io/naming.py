"""Tensor names → fields: which tower, layer, block, module, expert and parameter a key names.

``parse_name`` turns a checkpoint key such as ``model.layers.3.self_attn.q_proj.weight`` into a
``ParsedName`` (tower, layer, block, module, expert, param) using tables of regex rows, not
if-chains: wrapper components (``model.``, ``language_model.``, ``visual.``, ...) are stripped
first and decide the tower, then a layer container (``layers.N`` / ``h.N`` / ``blocks.N``) gives the
layer index, then the rest of the path is matched against ``LAYER_ROWS`` or ``GLOBAL_ROWS``.

How such a tensor is oriented and cut into parts is ``opdviz.io.layouts``.

Run its tests with ``.venv/bin/pytest tests/io/test_naming.py -q``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class ParsedName:
    """The fields of one tensor name. See the module docstring and DESIGN.md "Reading checkpoints"."""

    tower: str  # "text" | "vision" | "audio"
    layer: int | None  # transformer block index; None for embeddings, head, final norm, projector
    block: str  # "attn" | "ffn" | "embed" | "head" | "norm" | "router" | "other"
    module: str  # q k v o qkv gate up down gate_up fc_in fc_out q_a q_b kv_a kv_b experts ...
    expert: int | None
    param: str  # "weight" | "bias" | other last component


# Leading wrapper components, stripped repeatedly; a non-None tower switches the tower.
# ``multi_modal_projector`` is kept (it is matched by GLOBAL_ROWS) but counted as vision: it is
# the vision pathway's bridge into the text model.
_WRAPPERS: dict[str, str | None] = {
    "model": None,
    "transformer": None,
    "gpt_neox": None,
    "encoder": None,
    "decoder": None,
    "language_model": "text",
    "text_model": "text",
    "visual": "vision",
    "vision_tower": "vision",
    "vision_model": "vision",
    "vision_encoder": "vision",
    "audio_tower": "audio",
    "audio_model": "audio",
}
_TOWER_HINTS = {"multi_modal_projector": "vision"}

# The layer container: ``layers.N.``, ``h.N.`` (GPT-2, Falcon, BLOOM), ``blocks.N.`` (Qwen-VL
# vision), ``layer.N.`` (BERT-style encoders).
_LAYER_RE = re.compile(r"^(?:layers|h|blocks|layer)\.(?P<layer>\d+)\.(?P<rest>.+)$")

# Last components that name the parameter rather than the module (stripped before row matching).
_PARAMS = {"weight", "bias", "e_score_correction_bias", "in_proj_weight", "in_proj_bias"}

_ATTN = r"(?:self_attn|attn|attention|self_attention)"
_E = r"(?P<expert>\d+)"
_NORM_NAME = r"[a-z_]*(?:norm|layrnorm)[a-z_0-9]*|ln_?[a-z0-9]*|[a-z]*norm\d*"

# (regex fullmatched on the in-layer path without the param, fields). ``module`` may use
# ``{group}`` templates filled from the match. First match wins, so specific rows come first.
LAYER_ROWS: list[tuple[str, dict]] = [
    # attention projections (Llama/Qwen/Gemma/Mistral/DeepSeek/CLIP/SigLIP/LLaVA)
    (rf"{_ATTN}\.(?P<m>q|k|v|o)_proj", {"block": "attn", "module": "{m}"}),
    (rf"{_ATTN}\.out_proj", {"block": "attn", "module": "o"}),
    # fused q/k/v: Phi-3, Qwen-VL vision, GPT-2 / GPT-BigCode Conv1D, GPT-NeoX, Falcon, BLOOM
    (rf"{_ATTN}\.(?:qkv_proj|qkv|c_attn|query_key_value|Wqkv)", {"block": "attn", "module": "qkv"}),
    (rf"{_ATTN}\.(?:proj|c_proj|dense)", {"block": "attn", "module": "o"}),
    # DeepSeek-V2/V3 multi-head latent attention
    (rf"{_ATTN}\.q_a_proj", {"block": "attn", "module": "q_a"}),
    (rf"{_ATTN}\.q_b_proj", {"block": "attn", "module": "q_b"}),
    (rf"{_ATTN}\.kv_a_proj_with_mqa", {"block": "attn", "module": "kv_a"}),
    (rf"{_ATTN}\.kv_b_proj", {"block": "attn", "module": "kv_b"}),
    (rf"{_ATTN}\.sinks", {"block": "attn", "module": "sinks", "param": "sinks"}),  # GPT-OSS
    # buffers some checkpoints carry (GPT-2 / NeoX causal masks, rotary inverse frequencies)
    (rf"{_ATTN}", {"block": "other", "module": "attn_mask"}),
    (rf"{_ATTN}\.masked_bias", {"block": "other", "module": "attn_mask", "param": "masked_bias"}),
    (rf"{_ATTN}\.rotary_emb\.inv_freq", {"block": "other", "module": "rotary", "param": "inv_freq"}),
    # MoE: fused 3-D expert stacks (transformers >= 4.57 / 5, GPT-OSS, Llama-4)
    (r"(?:mlp|feed_forward)\.experts\.(?:gate_up_proj|down_proj)(?P<p>_bias|_blocks|_scales)?",
     {"block": "ffn", "module": "experts", "param": "{p}"}),
    # MoE: per-expert modules (Qwen2/3-MoE, DeepSeek, OLMoE; Mixtral w1/w2/w3 = gate/down/up)
    (rf"mlp\.experts\.{_E}\.(?P<m>gate|up|down)_proj", {"block": "ffn", "module": "{m}"}),
    (rf"block_sparse_moe\.experts\.{_E}\.w1", {"block": "ffn", "module": "gate"}),
    (rf"block_sparse_moe\.experts\.{_E}\.w2", {"block": "ffn", "module": "down"}),
    (rf"block_sparse_moe\.experts\.{_E}\.w3", {"block": "ffn", "module": "up"}),
    (r"mlp\.shared_experts?\.(?P<m>gate|up|down)_proj", {"block": "ffn", "module": "shared_{m}"}),
    (r"mlp\.shared_expert_gate", {"block": "router", "module": "shared_expert_gate"}),
    (r"(?:mlp\.gate|mlp\.router|block_sparse_moe\.gate)", {"block": "router", "module": "router"}),
    # dense MLPs
    (r"mlp\.(?P<m>gate|up|down)_proj", {"block": "ffn", "module": "{m}"}),
    (r"mlp\.gate_up_proj", {"block": "ffn", "module": "gate_up"}),
    (r"mlp\.(?:fc1|c_fc|dense_h_to_4h)", {"block": "ffn", "module": "fc_in"}),
    (r"mlp\.(?:fc2|c_proj|dense_4h_to_h)", {"block": "ffn", "module": "fc_out"}),
    # DeepSeek-V3 multi-token-prediction layer extras
    (r"embed_tokens", {"block": "embed", "module": "embed"}),
    (r"shared_head\.head", {"block": "head", "module": "lm_head"}),
    (r"shared_head\.norm", {"block": "norm", "module": "norm"}),
    (r"eh_proj", {"block": "other", "module": "eh_proj"}),
    # every norm: input/post_attention/pre_/post_feedforward_layernorm, q_norm/k_norm, ln_1,
    # norm1, layer_norm1, q_a_layernorm, ln_attn/ln_mlp (Falcon), enorm/hnorm (DeepSeek MTP)
    (rf"(?:{_ATTN}\.)?(?:{_NORM_NAME})", {"block": "norm", "module": "norm"}),
]

GLOBAL_ROWS: list[tuple[str, dict]] = [
    (r"(?:embed_tokens|wte|embed_in|word_embeddings)", {"block": "embed", "module": "embed"}),
    (r"(?:lm_head|embed_out)", {"block": "head", "module": "lm_head"}),
    (r"wpe", {"block": "embed", "module": "pos_embed"}),
    # vision towers
    (r"patch_embed\.proj|embeddings\.patch_embedding", {"block": "embed", "module": "patch_embed"}),
    (r"pos_embed|embeddings\.position_embedding", {"block": "embed", "module": "pos_embed"}),
    (r"embeddings\.class_embedding", {"block": "embed", "module": "cls_embed", "param": "weight"}),
    (r"merger\.(?:ln_q|norm)", {"block": "norm", "module": "norm"}),
    (r"(?:deepstack_merger_list\.\d+\.|merger\.)(?:mlp\.0|linear_fc1)", {"block": "other", "module": "merger_in"}),
    (r"(?:deepstack_merger_list\.\d+\.|merger\.)(?:mlp\.2|linear_fc2)", {"block": "other", "module": "merger_out"}),
    (r"deepstack_merger_list\.\d+\.norm", {"block": "norm", "module": "norm"}),
    (r"multi_modal_projector\.linear_1", {"block": "other", "module": "projector_in"}),
    (r"multi_modal_projector\.linear_2", {"block": "other", "module": "projector_out"}),
    (r"multi_modal_projector\.mm_input_projection_weight",
     {"block": "other", "module": "projector", "param": "weight"}),
    (r"multi_modal_projector\.\w*norm\w*", {"block": "norm", "module": "norm"}),
    # SigLIP attention-pooling head (nn.MultiheadAttention: in_proj = q, k, v stacked)
    (r"head\.probe", {"block": "other", "module": "probe", "param": "probe"}),
    (r"head\.attention", {"block": "attn", "module": "qkv"}),
    (r"head\.attention\.out_proj", {"block": "attn", "module": "o"}),
    (r"head\.mlp\.fc1", {"block": "ffn", "module": "fc_in"}),
    (r"head\.mlp\.fc2", {"block": "ffn", "module": "fc_out"}),
    # final norms: norm, ln_f, final_layer_norm, post_layernorm, pre_layrnorm (sic, CLIP), ...
    (rf"(?:head\.)?(?:{_NORM_NAME})", {"block": "norm", "module": "norm"}),
]

_LAYER_TABLE = [(re.compile(rx), f) for rx, f in LAYER_ROWS]
_GLOBAL_TABLE = [(re.compile(rx), f) for rx, f in GLOBAL_ROWS]
_PARAM_ALIASES = {"in_proj_weight": "weight", "in_proj_bias": "bias"}
_PARAM_SUFFIX = {"_bias": "bias", "_blocks": "blocks", "_scales": "scales", "": "weight", None: "weight"}


def _strip_wrappers(parts: list[str]) -> tuple[str, list[str]]:
    tower = "text"
    while parts and parts[0] in _WRAPPERS:
        tower = _WRAPPERS[parts[0]] or tower
        parts = parts[1:]
    if parts and parts[0] in _TOWER_HINTS:
        tower = _TOWER_HINTS[parts[0]]
    return tower, parts


@lru_cache(maxsize=1 << 16)  # pure and called per tensor by several helpers
def parse_name(name: str) -> ParsedName:
    """Parse a checkpoint tensor name into its fields.

    Args: name — the full key, e.g. ``"model.language_model.layers.3.mlp.experts.7.up_proj.weight"``.
    Returns: a ``ParsedName``. Unknown names get block ``"other"`` and, as module, the last component
    of the path before the param; they never raise.
    """
    tower, parts = _strip_wrappers(name.split("."))
    path = ".".join(parts)
    layer = None
    m = _LAYER_RE.match(path)
    if m:
        layer, path = int(m["layer"]), m["rest"]
    table = _LAYER_TABLE if m else _GLOBAL_TABLE

    param = None
    comps = path.split(".")
    if len(comps) > 1 and comps[-1] in _PARAMS:
        param, path = _PARAM_ALIASES.get(comps[-1], comps[-1]), ".".join(comps[:-1])

    for rx, fields in table:
        hit = rx.fullmatch(path)
        if hit is None:
            continue
        groups = hit.groupdict()
        expert = groups.get("expert")
        module = fields["module"].format(**{k: v or "" for k, v in groups.items()})
        if param is None:
            p = fields.get("param", "weight")
            param = _PARAM_SUFFIX.get(groups.get("p"), p) if p == "{p}" else p
        return ParsedName(tower, layer, fields["block"], module,
                          int(expert) if expert is not None else None, param)

    comps = path.split(".")
    module = next((c for c in reversed(comps) if not c.isdigit()), comps[-1])
    return ParsedName(tower, layer, "other", module, None, param or comps[-1])
