"""Tests of opdviz.io.naming and opdviz.io.layouts: name parsing over full HF key lists, orientation, fused-tensor splits.

Splits are checked against fused tensors built here from known parts with each family's own
layout (concatenation, NeoX per-head interleave, Falcon groups, GPT-OSS interleaved gate/up).
"""

from __future__ import annotations

import re

import pytest
import torch

from keylists import (DEEPSEEK_V3, FALCON_7B, FALCON_40B, FALCON_RW, FAMILIES, GPT2, GPT_OSS, NEOX, PHI3,
                      QWEN2_VL, QWEN3_MOE, SIGLIP)
from opdviz.errors import OpdvizError
from opdviz.io.layouts import Part, fused_parts, matrix_view, split_part
from opdviz.io.naming import ParsedName, parse_name

# Modules that are legitimately block "other": buffers, MTP glue, VLM projectors/mergers, SigLIP probe.
ALLOWED_OTHER = {"attn_mask", "rotary", "eh_proj", "merger_in", "merger_out", "projector_in",
                 "projector_out", "projector", "probe"}
KNOWN_MODULES = ALLOWED_OTHER | {
    "q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "fc_in", "fc_out", "q_a", "q_b", "kv_a",
    "kv_b", "experts", "shared_gate", "shared_up", "shared_down", "shared_expert_gate", "embed", "lm_head",
    "norm", "router", "patch_embed", "pos_embed", "cls_embed", "sinks"}
LAYER_IN_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
VISION_PREFIXES = ("visual.", "model.visual.", "vision_tower.", "model.vision_tower.", "vision_model.",
                   "multi_modal_projector.", "model.multi_modal_projector.")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_key_list_parses(family):
    keys, _ = FAMILIES[family]
    for name in keys():
        p = parse_name(name)
        assert p.module in KNOWN_MODULES, (name, p)
        assert p.block != "other" or p.module in ALLOWED_OTHER, (name, p)
        m = LAYER_IN_NAME.search(name)
        assert p.layer == (int(m[1]) if m else None), (name, p)
        assert p.tower == ("vision" if name.startswith(VISION_PREFIXES) else "text"), (name, p)
        assert p.param in {"weight", "bias", "e_score_correction_bias", "inv_freq", "masked_bias", "sinks",
                           "probe"}, (name, p)
        ex = re.search(r"experts\.(\d+)\.", name)
        assert p.expert == (int(ex[1]) if ex else None), (name, p)


@pytest.mark.parametrize("name, expected", [
    ("model.layers.3.self_attn.q_proj.weight", ("text", 3, "attn", "q", None, "weight")),
    ("model.layers.0.self_attn.k_proj.bias", ("text", 0, "attn", "k", None, "bias")),
    ("model.layers.1.self_attn.q_norm.weight", ("text", 1, "norm", "norm", None, "weight")),
    ("model.layers.1.pre_feedforward_layernorm.weight", ("text", 1, "norm", "norm", None, "weight")),
    ("model.layers.2.mlp.down_proj.weight", ("text", 2, "ffn", "down", None, "weight")),
    ("model.embed_tokens.weight", ("text", None, "embed", "embed", None, "weight")),
    ("model.norm.weight", ("text", None, "norm", "norm", None, "weight")),
    ("lm_head.weight", ("text", None, "head", "lm_head", None, "weight")),
    ("model.layers.5.self_attn.qkv_proj.weight", ("text", 5, "attn", "qkv", None, "weight")),
    ("model.layers.5.mlp.gate_up_proj.weight", ("text", 5, "ffn", "gate_up", None, "weight")),
    ("transformer.h.11.attn.c_attn.weight", ("text", 11, "attn", "qkv", None, "weight")),
    ("h.0.attn.c_proj.bias", ("text", 0, "attn", "o", None, "bias")),
    ("transformer.h.2.mlp.c_fc.weight", ("text", 2, "ffn", "fc_in", None, "weight")),
    ("transformer.h.2.mlp.c_proj.weight", ("text", 2, "ffn", "fc_out", None, "weight")),
    ("transformer.wpe.weight", ("text", None, "embed", "pos_embed", None, "weight")),
    ("transformer.ln_f.bias", ("text", None, "norm", "norm", None, "bias")),
    ("gpt_neox.layers.4.attention.query_key_value.weight", ("text", 4, "attn", "qkv", None, "weight")),
    ("gpt_neox.layers.4.attention.dense.weight", ("text", 4, "attn", "o", None, "weight")),
    ("gpt_neox.layers.4.mlp.dense_4h_to_h.weight", ("text", 4, "ffn", "fc_out", None, "weight")),
    ("gpt_neox.embed_in.weight", ("text", None, "embed", "embed", None, "weight")),
    ("embed_out.weight", ("text", None, "head", "lm_head", None, "weight")),
    ("transformer.h.7.self_attention.query_key_value.weight", ("text", 7, "attn", "qkv", None, "weight")),
    ("transformer.word_embeddings.weight", ("text", None, "embed", "embed", None, "weight")),
    ("transformer.h.7.ln_mlp.weight", ("text", 7, "norm", "norm", None, "weight")),
    ("model.layers.9.block_sparse_moe.experts.6.w1.weight", ("text", 9, "ffn", "gate", 6, "weight")),
    ("model.layers.9.block_sparse_moe.experts.6.w2.weight", ("text", 9, "ffn", "down", 6, "weight")),
    ("model.layers.9.block_sparse_moe.experts.6.w3.weight", ("text", 9, "ffn", "up", 6, "weight")),
    ("model.layers.9.block_sparse_moe.gate.weight", ("text", 9, "router", "router", None, "weight")),
    ("model.layers.1.mlp.experts.63.up_proj.weight", ("text", 1, "ffn", "up", 63, "weight")),
    ("model.layers.1.mlp.gate.weight", ("text", 1, "router", "router", None, "weight")),
    ("model.layers.1.mlp.shared_expert.gate_proj.weight", ("text", 1, "ffn", "shared_gate", None, "weight")),
    ("model.layers.1.mlp.shared_expert_gate.weight", ("text", 1, "router", "shared_expert_gate", None, "weight")),
    ("model.layers.1.mlp.experts.gate_up_proj", ("text", 1, "ffn", "experts", None, "weight")),
    ("model.layers.1.mlp.experts.down_proj_bias", ("text", 1, "ffn", "experts", None, "bias")),
    ("model.layers.1.mlp.router.bias", ("text", 1, "router", "router", None, "bias")),
    ("model.layers.1.self_attn.sinks", ("text", 1, "attn", "sinks", None, "sinks")),
    ("model.layers.3.self_attn.q_a_proj.weight", ("text", 3, "attn", "q_a", None, "weight")),
    ("model.layers.3.self_attn.q_a_layernorm.weight", ("text", 3, "norm", "norm", None, "weight")),
    ("model.layers.3.self_attn.kv_a_proj_with_mqa.weight", ("text", 3, "attn", "kv_a", None, "weight")),
    ("model.layers.3.self_attn.kv_b_proj.weight", ("text", 3, "attn", "kv_b", None, "weight")),
    ("model.layers.3.mlp.shared_experts.down_proj.weight", ("text", 3, "ffn", "shared_down", None, "weight")),
    ("model.layers.3.mlp.gate.e_score_correction_bias",
     ("text", 3, "router", "router", None, "e_score_correction_bias")),
    ("model.layers.61.shared_head.head.weight", ("text", 61, "head", "lm_head", None, "weight")),
    ("visual.blocks.0.attn.qkv.weight", ("vision", 0, "attn", "qkv", None, "weight")),
    ("model.visual.blocks.31.attn.proj.bias", ("vision", 31, "attn", "o", None, "bias")),
    ("visual.blocks.0.mlp.fc1.weight", ("vision", 0, "ffn", "fc_in", None, "weight")),
    ("model.visual.blocks.0.mlp.gate_proj.weight", ("vision", 0, "ffn", "gate", None, "weight")),
    ("visual.blocks.0.norm2.weight", ("vision", 0, "norm", "norm", None, "weight")),
    ("visual.patch_embed.proj.weight", ("vision", None, "embed", "patch_embed", None, "weight")),
    ("visual.merger.ln_q.weight", ("vision", None, "norm", "norm", None, "weight")),
    ("model.language_model.layers.2.mlp.up_proj.weight", ("text", 2, "ffn", "up", None, "weight")),
    ("language_model.model.layers.2.self_attn.o_proj.weight", ("text", 2, "attn", "o", None, "weight")),
    ("language_model.lm_head.weight", ("text", None, "head", "lm_head", None, "weight")),
    ("vision_tower.vision_model.encoder.layers.4.self_attn.out_proj.weight",
     ("vision", 4, "attn", "o", None, "weight")),
    ("vision_tower.vision_model.encoder.layers.4.layer_norm1.bias", ("vision", 4, "norm", "norm", None, "bias")),
    ("vision_tower.vision_model.pre_layrnorm.weight", ("vision", None, "norm", "norm", None, "weight")),
    ("vision_tower.vision_model.embeddings.class_embedding",
     ("vision", None, "embed", "cls_embed", None, "weight")),
    ("multi_modal_projector.linear_1.weight", ("vision", None, "other", "projector_in", None, "weight")),
    ("vision_model.head.attention.in_proj_weight", ("vision", None, "attn", "qkv", None, "weight")),
    ("vision_model.head.attention.out_proj.weight", ("vision", None, "attn", "o", None, "weight")),
    ("vision_model.embeddings.patch_embedding.weight", ("vision", None, "embed", "patch_embed", None, "weight")),
])
def test_spot_checks(name, expected):
    assert parse_name(name) == ParsedName(*expected)


@pytest.mark.parametrize("name, module, layer", [
    ("model.layers.2.mlp.mystery_proj.weight", "mystery_proj", 2),
    ("something.else.entirely", "entirely", None),
    ("model.layers.0.block.7", "block", 0),
])
def test_unknown_names_are_other(name, module, layer):
    p = parse_name(name)
    assert (p.block, p.module, p.layer) == ("other", module, layer)


# ---------------------------------------------------------------------------------------------
# Orientation


def test_conv1d_is_transposed_to_out_in():
    h = GPT2["n_embd"]
    w = torch.randn(h, 3 * h)  # Conv1D stores [in, out]
    v = matrix_view("transformer.h.0.attn.c_attn.weight", w, GPT2)
    assert v.shape == (3 * h, h) and v.data_ptr() == w.data_ptr()  # a view, no copy
    assert torch.equal(v, w.T)
    assert matrix_view("h.0.mlp.c_fc.weight", torch.randn(h, 4 * h)).shape == (4 * h, h)  # no config: GPT-2
    assert matrix_view("h.0.mlp.c_proj.weight", torch.randn(4 * h, h), GPT2).shape == (h, 4 * h)


def test_linear_c_attn_of_other_model_types_is_not_transposed():
    w = torch.randn(24 + 2 * 6, 24)  # GPT-BigCode multi-query c_attn, nn.Linear [out, in]
    assert matrix_view("transformer.h.0.attn.c_attn.weight", w, {"model_type": "gpt_bigcode"}) is w


def test_other_shapes():
    b = torch.randn(7)
    assert matrix_view("model.norm.weight", b) is b
    w = torch.randn(5, 3)
    assert matrix_view("model.layers.0.self_attn.q_proj.weight", w) is w
    conv = torch.randn(8, 3, 2, 4, 4)
    assert matrix_view("visual.patch_embed.proj.weight", conv).shape == (8, 3 * 2 * 4 * 4)
    proj = torch.randn(24, 32)  # Gemma-3 projector, used as x @ W: [in, out]
    assert matrix_view("model.multi_modal_projector.mm_input_projection_weight", proj).shape == (32, 24)


@pytest.mark.parametrize("config", [QWEN3_MOE, {"model_type": "qwen3_moe"}, None])
def test_fused_experts_out_in(config):
    e, h, i = 4, 32, 12
    gu, down = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    assert torch.equal(matrix_view("model.layers.0.mlp.experts.gate_up_proj", gu, config), gu.reshape(e * 2 * i, h))
    assert torch.equal(matrix_view("model.layers.0.mlp.experts.down_proj", down, config), down.reshape(e * h, i))


@pytest.mark.parametrize("config", [
    GPT_OSS, {"model_type": "gpt_oss"},
    {"model_type": "gpt_oss", "hidden_size": 24, "intermediate_size": 12},  # H == 2I: model_type decides
    {"hidden_size": 32, "intermediate_size": 100, "moe_intermediate_size": 12},  # shape decides, moe size first
])
def test_fused_experts_in_out(config):
    """GPT-OSS stores [E, in, out]; the shape decides when sizes are known, else model_type (incl. H == 2I)."""
    e, h, i = 4, config.get("hidden_size", 32), 12
    gu, down = torch.randn(e, h, 2 * i), torch.randn(e, i, h)
    v = matrix_view("model.layers.0.mlp.experts.gate_up_proj", gu, config)
    assert torch.equal(v, gu.transpose(1, 2).reshape(e * 2 * i, h))
    v = matrix_view("model.layers.0.mlp.experts.down_proj", down, config)
    assert torch.equal(v, down.transpose(1, 2).reshape(e * h, i))


def test_shape_overrides_model_type_for_expert_orientation():
    # a Mixtral-style [E, 2I, H] stack under a gpt_oss config with distinct sizes is still [out, in]
    gu = torch.randn(4, 24, 32)
    assert torch.equal(matrix_view("mlp.experts.gate_up_proj", gu, GPT_OSS), gu.reshape(-1, 32))


# ---------------------------------------------------------------------------------------------
# Fused splits: build the stored tensor from known parts in each family's layout


def _rand(*shape, g):
    return torch.randn(*shape, generator=g)


def _concat(sizes, cols):
    def build(g):
        parts = {k: _rand(n, *cols, g=g) for k, n in sizes.items()}
        return torch.cat(list(parts.values())), parts
    return build


def _per_head(heads, hd, cols):
    """NeoX / BLOOM / Falcon-RW: rows laid out [heads, 3, head_dim]."""
    def build(g):
        parts = {k: _rand(heads * hd, *cols, g=g) for k in "qkv"}
        grid = torch.stack([parts[k].reshape(heads, hd, *cols) for k in "qkv"], dim=1)
        return grid.reshape(heads * 3 * hd, *cols), parts
    return build


def _falcon_grouped(heads, kv, hd, cols):
    """Falcon new_decoder_architecture: rows laid out [kv, heads/kv + 2, head_dim]."""
    def build(g):
        parts = {"q": _rand(heads * hd, *cols, g=g), "k": _rand(kv * hd, *cols, g=g), "v": _rand(kv * hd, *cols, g=g)}
        grid = torch.cat([parts["q"].reshape(kv, heads // kv, hd, *cols), parts["k"].reshape(kv, 1, hd, *cols),
                          parts["v"].reshape(kv, 1, hd, *cols)], dim=1)
        return grid.reshape(-1, *cols), parts
    return build


def _gpt2_conv1d(h):
    def build(g):
        parts = {k: _rand(h, h, g=g) for k in "qkv"}  # each [out, in]
        return torch.cat(list(parts.values())).T.contiguous(), parts  # stored [in, 3*out]
    return build


def _experts_gate_up(e, i, h, interleaved, in_out):
    def build(g):
        parts = {}
        stored = []
        for x in range(e):
            gate, up = _rand(i, h, g=g), _rand(i, h, g=g)
            parts |= {f"{x}.gate": gate, f"{x}.up": up}
            m = torch.stack([gate, up], 1).reshape(2 * i, h) if interleaved else torch.cat([gate, up])
            stored.append(m.T if in_out else m)
        return torch.stack(stored).contiguous(), parts
    return build


def _experts_bias(e, i, interleaved):
    def build(g):
        parts, stored = {}, []
        for x in range(e):
            gate, up = _rand(i, g=g), _rand(i, g=g)
            parts |= {f"{x}.gate": gate, f"{x}.up": up}
            stored.append(torch.stack([gate, up], 1).reshape(-1) if interleaved else torch.cat([gate, up]))
        return torch.stack(stored), parts
    return build


def _experts_down(e, i, h, in_out):
    def build(g):
        parts = {f"{x}.down": _rand(h, i, g=g) for x in range(e)}
        stored = torch.stack([p.T if in_out else p for p in parts.values()]).contiguous()
        return stored, parts
    return build


_PHI_HD = PHI3["hidden_size"] // PHI3["num_attention_heads"]
_NEOX_HD = NEOX["hidden_size"] // NEOX["num_attention_heads"]
_F7_HD = FALCON_7B["hidden_size"] // FALCON_7B["num_attention_heads"]
_F40_HD = FALCON_40B["hidden_size"] // FALCON_40B["num_attention_heads"]
_VD = QWEN2_VL["vision_config"]["embed_dim"]
_SD = SIGLIP["hidden_size"]

SPLIT_CASES = {
    "phi3_qkv": ("model.layers.0.self_attn.qkv_proj.weight", PHI3,
                 _concat({"q": 4 * _PHI_HD, "k": 2 * _PHI_HD, "v": 2 * _PHI_HD}, (32,))),
    "phi3_gate_up": ("model.layers.0.mlp.gate_up_proj.weight", PHI3, _concat({"gate": 40, "up": 40}, (32,))),
    "gpt2_c_attn": ("transformer.h.0.attn.c_attn.weight", GPT2, _gpt2_conv1d(GPT2["n_embd"])),
    "gpt2_c_attn_bias": ("transformer.h.0.attn.c_attn.bias", GPT2, _concat(dict.fromkeys("qkv", 24), ())),
    "neox_qkv": ("gpt_neox.layers.0.attention.query_key_value.weight", NEOX, _per_head(4, _NEOX_HD, (32,))),
    "neox_qkv_bias": ("gpt_neox.layers.0.attention.query_key_value.bias", NEOX, _per_head(4, _NEOX_HD, ())),
    "bloom_qkv": ("transformer.h.0.self_attention.query_key_value.weight",
                  {"model_type": "bloom", "n_head": 4, "hidden_size": 32}, _per_head(4, 8, (32,))),
    "falcon_7b_mqa": ("transformer.h.0.self_attention.query_key_value.weight", FALCON_7B,
                      _concat({"q": 4 * _F7_HD, "k": _F7_HD, "v": _F7_HD}, (32,))),
    "falcon_40b_grouped": ("transformer.h.0.self_attention.query_key_value.weight", FALCON_40B,
                           _falcon_grouped(6, 2, _F40_HD, (48,))),
    "falcon_40b_old_config": ("transformer.h.0.self_attention.query_key_value.weight",
                              {"model_type": "RefinedWeb", "n_head": 6, "n_head_kv": 2, "hidden_size": 48},
                              _falcon_grouped(6, 2, 8, (48,))),
    "falcon_rw": ("transformer.h.0.self_attention.query_key_value.weight", FALCON_RW, _per_head(4, 8, (32,))),
    "qwen2_vl_qkv": ("visual.blocks.0.attn.qkv.weight", QWEN2_VL, _concat(dict.fromkeys("qkv", _VD), (_VD,))),
    "qwen2_vl_qkv_bias": ("model.visual.blocks.0.attn.qkv.bias", None, _concat(dict.fromkeys("qkv", _VD), ())),
    "siglip_in_proj": ("vision_model.head.attention.in_proj_weight", SIGLIP,
                       _concat(dict.fromkeys("qkv", _SD), (_SD,))),
    "experts_gate_up": ("model.layers.0.mlp.experts.gate_up_proj", QWEN3_MOE,
                        _experts_gate_up(4, 12, 32, interleaved=False, in_out=False)),
    "experts_down": ("model.layers.0.mlp.experts.down_proj", QWEN3_MOE, _experts_down(4, 12, 32, in_out=False)),
    "gpt_oss_gate_up": ("model.layers.0.mlp.experts.gate_up_proj", GPT_OSS,
                        _experts_gate_up(4, 12, 32, interleaved=True, in_out=True)),
    "gpt_oss_gate_up_square": ("model.layers.0.mlp.experts.gate_up_proj", GPT_OSS | {"intermediate_size": 16},
                               _experts_gate_up(4, 16, 32, interleaved=True, in_out=True)),
    "gpt_oss_gate_up_bias": ("model.layers.0.mlp.experts.gate_up_proj_bias", GPT_OSS,
                             _experts_bias(4, 12, interleaved=True)),
    "gpt_oss_down": ("model.layers.0.mlp.experts.down_proj", GPT_OSS, _experts_down(4, 12, 32, in_out=True)),
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_split_round_trip(case):
    name, config, build = SPLIT_CASES[case]
    stored, expected = build(torch.Generator().manual_seed(0))
    parts = fused_parts(name, tuple(stored.shape), config)
    assert [p.suffix for p in parts] == list(expected)
    parsed = parse_name(name)
    for part in parts:
        got = split_part(name, stored, part, config)
        assert torch.equal(got, expected[part.suffix]), part
        assert part.module == part.suffix.split(".")[-1]
        assert part.expert == (int(part.suffix.split(".")[0]) if "." in part.suffix else None)
        assert part.name(name) == f"{name}[{part.suffix}]"
    if stored.dim() >= 2 and parsed.module != "experts":  # parts tile the oriented matrix's rows
        assert sum(split_part(name, stored, p, config).shape[0] for p in parts) == \
            matrix_view(name, stored, config).shape[0]


def test_contiguous_parts_are_views():
    name = "model.layers.0.self_attn.qkv_proj.weight"
    stored, _ = SPLIT_CASES["phi3_qkv"][2](torch.Generator().manual_seed(0))
    for part in fused_parts(name, tuple(stored.shape), PHI3):
        assert split_part(name, stored, part, PHI3).untyped_storage().data_ptr() == \
            stored.untyped_storage().data_ptr()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_parts_over_key_lists(family):
    """Every fused tensor of a family splits (with its config); nothing else claims parts."""
    keys, config = FAMILIES[family]
    for name, shape in keys().items():
        p = parse_name(name)
        parts = fused_parts(name, shape, config)
        fused = p.module in {"qkv", "gate_up"} or (p.module == "experts" and p.param in {"weight", "bias"})
        assert bool(parts) == fused, (name, shape, parts)
        if parts:
            x = torch.zeros(shape)
            for part in parts:
                assert split_part(name, x, part, config).dim() == len(shape) - (p.module == "experts")


@pytest.mark.parametrize("name, shape, config", [
    ("gpt_neox.layers.0.attention.query_key_value.weight", (96, 32), None),  # heads unknown
    ("model.layers.0.self_attn.qkv_proj.weight", (64, 32), None),
    ("model.layers.0.self_attn.qkv_proj.weight", (63, 32), PHI3),  # sizes disagree with the config
    ("transformer.h.0.self_attention.query_key_value.weight", (50, 32), FALCON_7B),
    ("model.layers.0.self_attn.q_proj.weight", (32, 32), PHI3),  # not fused
    ("model.layers.0.mlp.gate_up_proj.weight", (81, 32), PHI3),
    ("transformer.encoder.layers.0.self_attention.query_key_value.weight", (96, 32),  # ChatGLM: not per head
     {"model_type": "chatglm", "num_attention_heads": 4, "hidden_size": 32}),
    ("model.layers.0.mlp.experts.gate_up_proj", (24,), QWEN3_MOE),  # not a stack
])
def test_unknown_layouts_give_no_parts(name, shape, config):
    assert fused_parts(name, shape, config) == []


def test_split_part_rejects_foreign_part():
    with pytest.raises(OpdvizError, match="no part"):
        split_part("model.layers.0.mlp.gate_up_proj.weight", torch.zeros(8, 4), Part("q", "q", None), PHI3)


def test_vlm_nested_configs_are_used():
    # Falcon-style nested text_config: the qkv layout is read from text_config, not the top level
    cfg = {"model_type": "llava", "text_config": FALCON_7B, "vision_config": SIGLIP}
    assert [p.suffix for p in fused_parts("language_model.transformer.h.0.self_attention.query_key_value.weight",
                                          (48, 32), cfg)] == ["q", "k", "v"]
    assert DEEPSEEK_V3["q_lora_rank"]  # keylists sanity: the V3 config uses the q LoRA path
