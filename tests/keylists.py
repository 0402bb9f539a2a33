"""Full HF state-dict key lists (name → shape) of the model families opdviz parses, at tiny sizes.

Each ``*_keys(cfg)`` writes out the keys a published checkpoint of that family holds (names and
layouts as in the HF ``model.safetensors`` files and ``config.json`` field names), for a config
shrunk to a few layers/experts/features. ``FAMILIES`` maps a family id to (keys, config).
"""

from __future__ import annotations


def _llama_layer(p: str, c: dict, *, qkv_bias=False, qk_norm=False, gemma_norms=False) -> dict:
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    nh, kv = c["num_attention_heads"], c["num_key_value_heads"]
    k = {
        f"{p}input_layernorm.weight": (h,),
        f"{p}self_attn.q_proj.weight": (nh * hd, h),
        f"{p}self_attn.k_proj.weight": (kv * hd, h),
        f"{p}self_attn.v_proj.weight": (kv * hd, h),
        f"{p}self_attn.o_proj.weight": (h, nh * hd),
        f"{p}post_attention_layernorm.weight": (h,),
        f"{p}mlp.gate_proj.weight": (i, h),
        f"{p}mlp.up_proj.weight": (i, h),
        f"{p}mlp.down_proj.weight": (h, i),
    }
    if qkv_bias:
        k |= {f"{p}self_attn.q_proj.bias": (nh * hd,), f"{p}self_attn.k_proj.bias": (kv * hd,),
              f"{p}self_attn.v_proj.bias": (kv * hd,)}
    if qk_norm:
        k |= {f"{p}self_attn.q_norm.weight": (hd,), f"{p}self_attn.k_norm.weight": (hd,)}
    if gemma_norms:
        k |= {f"{p}pre_feedforward_layernorm.weight": (h,), f"{p}post_feedforward_layernorm.weight": (h,)}
    return k


def _decoder(prefix: str, c: dict, layer_fn, head_prefix: str = "") -> dict:
    k = {f"{prefix}embed_tokens.weight": (c["vocab_size"], c["hidden_size"])}
    for n in range(c["num_hidden_layers"]):
        k |= layer_fn(f"{prefix}layers.{n}.", c)
    k[f"{prefix}norm.weight"] = (c["hidden_size"],)
    if not c.get("tie_word_embeddings"):
        k[f"{head_prefix}lm_head.weight"] = (c["vocab_size"], c["hidden_size"])
    return k


def _base(model_type, **kw) -> dict:
    c = {"model_type": model_type, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 50}
    return c | kw


LLAMA = _base("llama")
MISTRAL = _base("mistral")
QWEN2 = _base("qwen2")
QWEN3 = _base("qwen3", head_dim=16)  # Qwen3 decouples head_dim from hidden/heads
GEMMA2 = _base("gemma2", tie_word_embeddings=True, head_dim=16)


def llama_keys(c=LLAMA):
    return _decoder("model.", c, _llama_layer)


def qwen2_keys(c=QWEN2):
    return _decoder("model.", c, lambda p, c: _llama_layer(p, c, qkv_bias=True))


def qwen3_keys(c=QWEN3):
    return _decoder("model.", c, lambda p, c: _llama_layer(p, c, qk_norm=True))


def gemma2_keys(c=GEMMA2):
    return _decoder("model.", c, lambda p, c: _llama_layer(p, c, gemma_norms=True))


PHI3 = {"model_type": "phi3", "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50}  # head_dim = 32 / 4


def phi3_keys(c=PHI3):
    def layer(p, c):
        h, i, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
        rows = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * hd
        return {f"{p}input_layernorm.weight": (h,), f"{p}self_attn.qkv_proj.weight": (rows, h),
                f"{p}self_attn.o_proj.weight": (h, h), f"{p}post_attention_layernorm.weight": (h,),
                f"{p}mlp.gate_up_proj.weight": (2 * i, h), f"{p}mlp.down_proj.weight": (h, i)}
    return _decoder("model.", c, layer)


GPT2 = {"model_type": "gpt2", "n_embd": 24, "n_head": 4, "n_layer": 2, "vocab_size": 50, "n_positions": 16}


def gpt2_keys(c=GPT2, prefix="transformer.", mask_buffers=False):
    """GPT-2: Conv1D weights stored [in, out]. The hub's gpt2 file has no ``transformer.`` prefix."""
    h, p = c["n_embd"], prefix
    k = {f"{p}wte.weight": (c["vocab_size"], h), f"{p}wpe.weight": (c["n_positions"], h)}
    for n in range(c["n_layer"]):
        q = f"{p}h.{n}."
        k |= {f"{q}ln_1.weight": (h,), f"{q}ln_1.bias": (h,),
              f"{q}attn.c_attn.weight": (h, 3 * h), f"{q}attn.c_attn.bias": (3 * h,),
              f"{q}attn.c_proj.weight": (h, h), f"{q}attn.c_proj.bias": (h,),
              f"{q}ln_2.weight": (h,), f"{q}ln_2.bias": (h,),
              f"{q}mlp.c_fc.weight": (h, 4 * h), f"{q}mlp.c_fc.bias": (4 * h,),
              f"{q}mlp.c_proj.weight": (4 * h, h), f"{q}mlp.c_proj.bias": (h,)}
        if mask_buffers:
            k |= {f"{q}attn.bias": (1, 1, 16, 16), f"{q}attn.masked_bias": ()}
    k |= {f"{p}ln_f.weight": (h,), f"{p}ln_f.bias": (h,)}
    return k


NEOX = {"model_type": "gpt_neox", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 50}


def neox_keys(c=NEOX):
    h, i = c["hidden_size"], c["intermediate_size"]
    k = {"gpt_neox.embed_in.weight": (c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        q = f"gpt_neox.layers.{n}."
        k |= {f"{q}input_layernorm.weight": (h,), f"{q}input_layernorm.bias": (h,),
              f"{q}post_attention_layernorm.weight": (h,), f"{q}post_attention_layernorm.bias": (h,),
              f"{q}attention.query_key_value.weight": (3 * h, h), f"{q}attention.query_key_value.bias": (3 * h,),
              f"{q}attention.dense.weight": (h, h), f"{q}attention.dense.bias": (h,),
              f"{q}attention.rotary_emb.inv_freq": (h // c["num_attention_heads"] // 4,),
              f"{q}mlp.dense_h_to_4h.weight": (i, h), f"{q}mlp.dense_h_to_4h.bias": (i,),
              f"{q}mlp.dense_4h_to_h.weight": (h, i), f"{q}mlp.dense_4h_to_h.bias": (h,)}
    k |= {"gpt_neox.final_layer_norm.weight": (h,), "gpt_neox.final_layer_norm.bias": (h,),
          "embed_out.weight": (c["vocab_size"], h)}
    return k


# Falcon-7B: multi-query (71 q heads + 1 k + 1 v), parallel attention, one input_layernorm.
FALCON_7B = {"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
             "multi_query": True, "new_decoder_architecture": False, "parallel_attn": True, "vocab_size": 50}
# Falcon-40B: new decoder architecture, 8 kv groups of (q_per_kv + 2) heads, ln_attn + ln_mlp.
FALCON_40B = {"model_type": "falcon", "hidden_size": 48, "num_attention_heads": 6, "num_kv_heads": 2,
              "num_hidden_layers": 2, "new_decoder_architecture": True, "vocab_size": 50}
# Falcon-RW: neither → per-head [heads, 3, head_dim] like NeoX.
FALCON_RW = {"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
             "multi_query": False, "new_decoder_architecture": False, "vocab_size": 50}


def falcon_keys(c=FALCON_7B):
    h, nh = c["hidden_size"], c["num_attention_heads"]
    hd = h // nh
    if c.get("new_decoder_architecture"):
        rows = (nh + 2 * c["num_kv_heads"]) * hd
    elif c.get("multi_query"):
        rows = (nh + 2) * hd
    else:
        rows = 3 * h
    k = {"transformer.word_embeddings.weight": (c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        q = f"transformer.h.{n}."
        if c.get("new_decoder_architecture"):
            norms = ["ln_attn", "ln_mlp"]
        else:
            norms = ["input_layernorm"] + ([] if c.get("parallel_attn") else ["post_attention_layernorm"])
        for nm in norms:
            k |= {f"{q}{nm}.weight": (h,), f"{q}{nm}.bias": (h,)}
        k |= {f"{q}self_attention.query_key_value.weight": (rows, h),
              f"{q}self_attention.dense.weight": (h, h),
              f"{q}mlp.dense_h_to_4h.weight": (4 * h, h), f"{q}mlp.dense_4h_to_h.weight": (h, 4 * h)}
    k |= {"transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,), "lm_head.weight": (c["vocab_size"], h)}
    return k


MIXTRAL = _base("mixtral", num_local_experts=4, num_experts_per_tok=2)


def mixtral_keys(c=MIXTRAL):
    def layer(p, c):
        h, i, hd, nh, kv = (c[x] for x in ("hidden_size", "intermediate_size", "head_dim",
                                           "num_attention_heads", "num_key_value_heads"))
        k = {f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,),
             f"{p}self_attn.q_proj.weight": (nh * hd, h), f"{p}self_attn.k_proj.weight": (kv * hd, h),
             f"{p}self_attn.v_proj.weight": (kv * hd, h), f"{p}self_attn.o_proj.weight": (h, nh * hd),
             f"{p}block_sparse_moe.gate.weight": (c["num_local_experts"], h)}
        for e in range(c["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            k |= {f"{q}w1.weight": (i, h), f"{q}w2.weight": (h, i), f"{q}w3.weight": (i, h)}
        return k
    return _decoder("model.", c, layer)


QWEN2_MOE = _base("qwen2_moe", num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=40)
QWEN3_MOE = _base("qwen3_moe", num_experts=4, moe_intermediate_size=12, head_dim=16)


def _attn(p, c, **kw):
    return {k: v for k, v in _llama_layer(p, c, **kw).items() if ".mlp." not in k}


def qwen_moe_keys(c=QWEN2_MOE):
    qwen2 = c["model_type"] == "qwen2_moe"

    def layer(p, c):
        h, mi = c["hidden_size"], c["moe_intermediate_size"]
        k = _attn(p, c, qkv_bias=qwen2, qk_norm=not qwen2) | {f"{p}mlp.gate.weight": (c["num_experts"], h)}
        for e in range(c["num_experts"]):
            q = f"{p}mlp.experts.{e}."
            k |= {f"{q}gate_proj.weight": (mi, h), f"{q}up_proj.weight": (mi, h), f"{q}down_proj.weight": (h, mi)}
        if qwen2:
            si = c["shared_expert_intermediate_size"]
            k |= {f"{p}mlp.shared_expert.gate_proj.weight": (si, h), f"{p}mlp.shared_expert.up_proj.weight": (si, h),
                  f"{p}mlp.shared_expert.down_proj.weight": (h, si), f"{p}mlp.shared_expert_gate.weight": (1, h)}
        return k
    return _decoder("model.", c, layer)


def qwen3_moe_fused_keys(c=QWEN3_MOE):
    """transformers 5 layout: experts fused into 3-D [E, out, in] stacks, gate rows then up rows."""
    def layer(p, c):
        h, mi, ne = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"]
        return _attn(p, c, qk_norm=True) | {f"{p}mlp.gate.weight": (ne, h),
                                            f"{p}mlp.experts.gate_up_proj": (ne, 2 * mi, h),
                                            f"{p}mlp.experts.down_proj": (ne, h, mi)}
    return _decoder("model.", c, layer)


GPT_OSS = _base("gpt_oss", num_local_experts=4, intermediate_size=12, head_dim=8)


def gpt_oss_keys(c=GPT_OSS):
    """GPT-OSS: [E, in, out] stacks used with bmm(x, W); gate/up interleaved along out; biases; sinks."""
    def layer(p, c):
        h, i, ne = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]
        k = _attn(p, c, qkv_bias=True) | {f"{p}self_attn.o_proj.bias": (h,),
                                           f"{p}self_attn.sinks": (c["num_attention_heads"],),
                                           f"{p}mlp.router.weight": (ne, h), f"{p}mlp.router.bias": (ne,)}
        return k | {f"{p}mlp.experts.gate_up_proj": (ne, h, 2 * i), f"{p}mlp.experts.gate_up_proj_bias": (ne, 2 * i),
                    f"{p}mlp.experts.down_proj": (ne, i, h), f"{p}mlp.experts.down_proj_bias": (ne, h)}
    return _decoder("model.", c, layer)


DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
               "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 4, "n_shared_experts": 1,
               "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 12, "kv_lora_rank": 8,
               "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "vocab_size": 50,
               "num_nextn_predict_layers": 1}
DEEPSEEK_V2_LITE = DEEPSEEK_V3 | {"model_type": "deepseek_v2", "q_lora_rank": None, "num_nextn_predict_layers": 0}


def deepseek_keys(c=DEEPSEEK_V3):
    """DeepSeek-V2/V3 MLA + MoE; V3 checkpoints carry the MTP layer as an extra ``layers.N``."""
    h, nh = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]

    def layer(p, n):
        k = {f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,),
             f"{p}self_attn.kv_a_proj_with_mqa.weight": (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
             f"{p}self_attn.kv_a_layernorm.weight": (c["kv_lora_rank"],),
             f"{p}self_attn.kv_b_proj.weight": (nh * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
             f"{p}self_attn.o_proj.weight": (h, nh * c["v_head_dim"])}
        if c["q_lora_rank"]:
            k |= {f"{p}self_attn.q_a_proj.weight": (c["q_lora_rank"], h),
                  f"{p}self_attn.q_a_layernorm.weight": (c["q_lora_rank"],),
                  f"{p}self_attn.q_b_proj.weight": (nh * qk, c["q_lora_rank"])}
        else:
            k[f"{p}self_attn.q_proj.weight"] = (nh * qk, h)
        if n < c["first_k_dense_replace"]:
            i = c["intermediate_size"]
            return k | {f"{p}mlp.gate_proj.weight": (i, h), f"{p}mlp.up_proj.weight": (i, h),
                        f"{p}mlp.down_proj.weight": (h, i)}
        mi, si = c["moe_intermediate_size"], c["moe_intermediate_size"] * c["n_shared_experts"]
        k |= {f"{p}mlp.gate.weight": (c["n_routed_experts"], h)}
        if c["model_type"] == "deepseek_v3":
            k[f"{p}mlp.gate.e_score_correction_bias"] = (c["n_routed_experts"],)
        for e in range(c["n_routed_experts"]):
            q = f"{p}mlp.experts.{e}."
            k |= {f"{q}gate_proj.weight": (mi, h), f"{q}up_proj.weight": (mi, h), f"{q}down_proj.weight": (h, mi)}
        s = f"{p}mlp.shared_experts."
        return k | {f"{s}gate_proj.weight": (si, h), f"{s}up_proj.weight": (si, h), f"{s}down_proj.weight": (h, si)}

    k = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        k |= layer(f"model.layers.{n}.", n)
    for n in range(c["num_hidden_layers"], c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        p = f"model.layers.{n}."
        k |= layer(p, n) | {f"{p}embed_tokens.weight": (c["vocab_size"], h), f"{p}enorm.weight": (h,),
                            f"{p}hnorm.weight": (h,), f"{p}eh_proj.weight": (h, 2 * h),
                            f"{p}shared_head.norm.weight": (h,), f"{p}shared_head.head.weight": (c["vocab_size"], h)}
    return k | {"model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)}


QWEN2_VL = {"model_type": "qwen2_vl", **{k: v for k, v in _base("qwen2_vl").items() if k != "model_type"},
            "vision_config": {"depth": 2, "embed_dim": 24, "hidden_size": 32, "mlp_ratio": 2, "num_heads": 4,
                              "patch_size": 2, "temporal_patch_size": 2, "in_chans": 3, "spatial_merge_size": 2}}
QWEN2_5_VL = QWEN2_VL | {"model_type": "qwen2_5_vl",
                         "vision_config": {"depth": 2, "hidden_size": 24, "intermediate_size": 40, "num_heads": 4,
                                           "out_hidden_size": 32, "patch_size": 2, "temporal_patch_size": 2,
                                           "in_channels": 3, "spatial_merge_size": 2}}


def qwen_vl_keys(c=QWEN2_VL, new_prefixes=False):
    """Qwen2-VL (vision fc1/fc2, LayerNorm with bias) or Qwen2.5-VL (vision gate/up/down, RMSNorm).

    ``new_prefixes``: transformers >= 4.52 names (``model.visual.``, ``model.language_model.``).
    """
    v = c["vision_config"]
    two5 = c["model_type"] == "qwen2_5_vl"
    d = v["hidden_size"] if two5 else v["embed_dim"]
    out = v.get("out_hidden_size", v["hidden_size"])
    vp = "model.visual." if new_prefixes else "visual."
    tin = v["in_channels"] if two5 else v["in_chans"]
    k = {f"{vp}patch_embed.proj.weight": (d, tin, v["temporal_patch_size"], v["patch_size"], v["patch_size"])}
    for n in range(v["depth"]):
        q = f"{vp}blocks.{n}."
        k |= {f"{q}norm1.weight": (d,), f"{q}norm2.weight": (d,),
              f"{q}attn.qkv.weight": (3 * d, d), f"{q}attn.qkv.bias": (3 * d,),
              f"{q}attn.proj.weight": (d, d), f"{q}attn.proj.bias": (d,)}
        if two5:
            i = v["intermediate_size"]
            for m, shp in (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i))):
                k |= {f"{q}mlp.{m}.weight": shp, f"{q}mlp.{m}.bias": (shp[0],)}
        else:
            i = d * v["mlp_ratio"]
            k |= {f"{q}norm1.bias": (d,), f"{q}norm2.bias": (d,), f"{q}mlp.fc1.weight": (i, d),
                  f"{q}mlp.fc1.bias": (i,), f"{q}mlp.fc2.weight": (d, i), f"{q}mlp.fc2.bias": (d,)}
    m = d * v["spatial_merge_size"] ** 2
    k |= {f"{vp}merger.ln_q.weight": (d,), f"{vp}merger.mlp.0.weight": (m, m), f"{vp}merger.mlp.0.bias": (m,),
          f"{vp}merger.mlp.2.weight": (out, m), f"{vp}merger.mlp.2.bias": (out,)}
    if not two5:
        k[f"{vp}merger.ln_q.bias"] = (d,)
    tp = "model.language_model." if new_prefixes else "model."
    return k | _decoder(tp, c, lambda p, c: _llama_layer(p, c, qkv_bias=True))


CLIP_VISION = {"model_type": "clip_vision_model", "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 8, "patch_size": 4, "num_channels": 3}
LLAVA = {"model_type": "llava", "vision_config": CLIP_VISION, "text_config": LLAMA | {"hidden_size": 32}}


def _clip_encoder(p: str, v: dict) -> dict:
    d, i = v["hidden_size"], v["intermediate_size"]
    k = {}
    for n in range(v["num_hidden_layers"]):
        q = f"{p}encoder.layers.{n}."
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            k |= {f"{q}self_attn.{m}.weight": (d, d), f"{q}self_attn.{m}.bias": (d,)}
        for nm in ("layer_norm1", "layer_norm2"):
            k |= {f"{q}{nm}.weight": (d,), f"{q}{nm}.bias": (d,)}
        k |= {f"{q}mlp.fc1.weight": (i, d), f"{q}mlp.fc1.bias": (i,), f"{q}mlp.fc2.weight": (d, i),
              f"{q}mlp.fc2.bias": (d,)}
    return k


def llava_keys(c=LLAVA, new_prefixes=False):
    """LLaVA-1.5: CLIP ViT tower + 2-layer projector + Llama. Old (<4.52) or new key prefixes."""
    v, t = c["vision_config"], c["text_config"]
    d, ps = v["hidden_size"], v["patch_size"]
    vp = "model.vision_tower.vision_model." if new_prefixes else "vision_tower.vision_model."
    pp = "model.multi_modal_projector." if new_prefixes else "multi_modal_projector."
    npos = (v["image_size"] // ps) ** 2 + 1
    k = {f"{vp}embeddings.class_embedding": (d,), f"{vp}embeddings.patch_embedding.weight": (d, 3, ps, ps),
         f"{vp}embeddings.position_embedding.weight": (npos, d),
         f"{vp}pre_layrnorm.weight": (d,), f"{vp}pre_layrnorm.bias": (d,),
         f"{vp}post_layernorm.weight": (d,), f"{vp}post_layernorm.bias": (d,)}
    k |= _clip_encoder(vp, v)
    h = t["hidden_size"]
    k |= {f"{pp}linear_1.weight": (h, d), f"{pp}linear_1.bias": (h,), f"{pp}linear_2.weight": (h, h),
          f"{pp}linear_2.bias": (h,)}
    if new_prefixes:
        return k | _decoder("model.language_model.", t, _llama_layer, head_prefix="")
    return k | _decoder("language_model.model.", t, _llama_layer, head_prefix="language_model.")


SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 8, "patch_size": 4, "num_channels": 3}


def siglip_keys(c=SIGLIP):
    """SiglipVisionModel with its attention-pooling head (nn.MultiheadAttention in_proj [3d, d])."""
    d, ps, i = c["hidden_size"], c["patch_size"], c["intermediate_size"]
    p = "vision_model."
    k = {f"{p}embeddings.patch_embedding.weight": (d, 3, ps, ps), f"{p}embeddings.patch_embedding.bias": (d,),
         f"{p}embeddings.position_embedding.weight": ((c["image_size"] // ps) ** 2, d),
         f"{p}post_layernorm.weight": (d,), f"{p}post_layernorm.bias": (d,)}
    k |= _clip_encoder(p, c)
    return k | {f"{p}head.probe": (1, 1, d), f"{p}head.attention.in_proj_weight": (3 * d, d),
                f"{p}head.attention.in_proj_bias": (3 * d,), f"{p}head.attention.out_proj.weight": (d, d),
                f"{p}head.attention.out_proj.bias": (d,), f"{p}head.layernorm.weight": (d,),
                f"{p}head.layernorm.bias": (d,), f"{p}head.mlp.fc1.weight": (i, d), f"{p}head.mlp.fc1.bias": (i,),
                f"{p}head.mlp.fc2.weight": (d, i), f"{p}head.mlp.fc2.bias": (d,)}


GEMMA3 = {"model_type": "gemma3", "text_config": _base("gemma3_text", head_dim=16) | {"tie_word_embeddings": True},
          "vision_config": SIGLIP}


def gemma3_keys(c=GEMMA3):
    """Gemma-3 VLM (transformers >= 4.52 names): SigLIP tower without head, projector, Gemma-3 text."""
    v, t = c["vision_config"], c["text_config"]
    vp = "model.vision_tower.vision_model."
    d, ps = v["hidden_size"], v["patch_size"]
    k = {f"{vp}embeddings.patch_embedding.weight": (d, 3, ps, ps), f"{vp}embeddings.patch_embedding.bias": (d,),
         f"{vp}embeddings.position_embedding.weight": ((v["image_size"] // ps) ** 2, d),
         f"{vp}post_layernorm.weight": (d,), f"{vp}post_layernorm.bias": (d,)}
    k |= _clip_encoder(vp, v)
    k |= {"model.multi_modal_projector.mm_input_projection_weight": (d, t["hidden_size"]),
          "model.multi_modal_projector.mm_soft_emb_norm.weight": (d,)}
    return k | _decoder("model.language_model.", t,
                        lambda p, c: _llama_layer(p, c, qk_norm=True, gemma_norms=True))


# family id → (zero-arg key-list builder, config passed to opdviz.io.naming/layouts)
FAMILIES = {
    "llama": (llama_keys, LLAMA),
    "mistral": (lambda: llama_keys(MISTRAL), MISTRAL),
    "qwen2": (qwen2_keys, QWEN2),
    "qwen3": (qwen3_keys, QWEN3),
    "gemma2": (gemma2_keys, GEMMA2),
    "phi3": (phi3_keys, PHI3),
    "gpt2": (gpt2_keys, GPT2),
    "gpt2_hub": (lambda: gpt2_keys(prefix="", mask_buffers=True), GPT2),
    "gpt_neox": (neox_keys, NEOX),
    "falcon_7b": (falcon_keys, FALCON_7B),
    "falcon_40b": (lambda: falcon_keys(FALCON_40B), FALCON_40B),
    "falcon_rw": (lambda: falcon_keys(FALCON_RW), FALCON_RW),
    "mixtral": (mixtral_keys, MIXTRAL),
    "qwen2_moe": (qwen_moe_keys, QWEN2_MOE),
    "qwen3_moe": (lambda: qwen_moe_keys(QWEN3_MOE), QWEN3_MOE),
    "qwen3_moe_fused": (qwen3_moe_fused_keys, QWEN3_MOE),
    "gpt_oss": (gpt_oss_keys, GPT_OSS),
    "deepseek_v3": (deepseek_keys, DEEPSEEK_V3),
    "deepseek_v2_lite": (lambda: deepseek_keys(DEEPSEEK_V2_LITE), DEEPSEEK_V2_LITE),
    "qwen2_vl": (qwen_vl_keys, QWEN2_VL),
    "qwen2_5_vl": (lambda: qwen_vl_keys(QWEN2_5_VL, new_prefixes=True), QWEN2_5_VL),
    "llava": (llava_keys, LLAVA),
    "llava_new": (lambda: llava_keys(new_prefixes=True), LLAVA),
    "siglip": (siglip_keys, SIGLIP),
    "gemma3": (gemma3_keys, GEMMA3),
}
