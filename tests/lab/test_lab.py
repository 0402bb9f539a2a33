"""The demo lab: HF Llama names/shapes, save/load round trip, masked training, a tiny full run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open

from opdviz.lab.command import register
from opdviz.lab.model import Llama, LlamaConfig, load_hf, save_hf
from opdviz.lab.pipeline import LabSettings, run_lab
from opdviz.lab.subnetwork import MaskedTrainer, changed_masks, random_masks_like
from opdviz.lab.task import AdditionTask

TINY = LlamaConfig(vocab_size=15, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


def tiny_settings() -> LabSettings:
    teacher = LlamaConfig(vocab_size=15, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    return LabSettings(digits=2, test_size=40, student=TINY, teacher=teacher, teacher_steps=3, base_steps=3,
                       pretrain_batch=16, post_steps=4, post_batch=8, group=4, intermediates=2)


def hf_llama_shapes(c: dict) -> dict[str, tuple]:
    """Written from the HF config independently of opdviz.lab.model.expected_tensor_shapes."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        for name, shape in [("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, q)),
                            ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)), ("mlp.down_proj", (h, f)),
                            ("input_layernorm", (h,)), ("post_attention_layernorm", (h,))]:
            out[f"model.layers.{i}.{name}.weight"] = shape
    return out


@pytest.mark.parametrize("cfg", [TINY, LabSettings().student, LabSettings().teacher], ids=["tiny", "student", "teacher"])
def test_state_dict_matches_hf_llama(cfg):
    hf = cfg.to_hf()
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert hf["tie_word_embeddings"] is False and hf["torch_dtype"] == "bfloat16"
    for key in ("rms_norm_eps", "rope_theta", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert key in hf
    got = {k: tuple(v.shape) for k, v in Llama(cfg, seed=0).state_dict().items()}
    assert got == hf_llama_shapes(hf)


def test_rope_and_gqa_match_reference():
    """One attention layer against a float64 reference written with HF's formulas."""
    model = Llama(TINY, seed=1).double()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, TINY.hidden_size, dtype=torch.float64)
    hd, nh, nkv = TINY.head_dim, TINY.num_attention_heads, TINY.num_key_value_heads
    inv = 1.0 / (TINY.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(5, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()

    def rot(t):
        return torch.cat((-t[..., hd // 2:], t[..., : hd // 2]), -1)

    q = (x @ attn.q_proj.weight.T).view(2, 5, nh, hd).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(2, 5, nkv, hd).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(2, 5, nkv, hd).transpose(1, 2)
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    outs = []
    for h in range(nh):  # query head h reads KV head h // (nh / nkv), as HF's repeat_kv
        kh, vh = k[:, h // (nh // nkv)], v[:, h // (nh // nkv)]
        s = q[:, h] @ kh.transpose(-1, -2) / hd ** 0.5
        s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(s.softmax(-1) @ vh)
    want = torch.cat(outs, -1) @ attn.o_proj.weight.T
    mask = torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)
    got = attn(x, cos, sin, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_saved_folder_reproduces_bf16_logits(tmp_path):
    model = Llama(TINY, seed=3)
    folder = save_hf(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    rounded = Llama(TINY)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    ids = AdditionTask(digits=2).prompts(torch.tensor([[12, 34], [99, 7]]))
    loaded = load_hf(folder)
    torch.testing.assert_close(loaded(ids), rounded(ids), rtol=0, atol=1e-6)
    # and the rounding is real: fp32 logits differ
    assert not torch.equal(model(ids), rounded(ids))


@pytest.mark.parametrize("weight_decay", [0.1])
def test_masked_trainer_freezes_bitwise(weight_decay):
    torch.manual_seed(0)
    model = Llama(TINY, seed=4)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(v.shape, generator=g) < 0.3 for k, v in before.items()}
    trainer = MaskedTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay), masks)
    ids = torch.randint(0, TINY.vocab_size, (4, 9), generator=g)
    for _ in range(5):
        trainer.zero_grad()
        torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        trainer.step()
    after = model.state_dict()
    for k, m in masks.items():
        assert torch.equal(after[k][~m], before[k][~m]), k
    moved = sum(int((after[k][m] != before[k][m]).sum()) for k, m in masks.items())
    assert moved > 0.9 * sum(int(m.sum()) for m in masks.values())


def test_changed_and_random_masks():
    a = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    b = {"w": torch.tensor([1.0, 2.0001, 3.5, 4.0])}  # 2.0001 rounds back to 2.0 in bf16
    m = changed_masks(a, b)
    assert m["w"].tolist() == [False, False, True, False]
    r = random_masks_like({"w": torch.tensor([True, False] * 50)}, seed=0)
    assert int(r["w"].sum()) == 50


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    lines = []
    summary = run_lab(out, seed=0, settings=tiny_settings(), progress=lines.append)
    return out, summary, lines


def test_tiny_lab_layout(tiny_lab):
    out, summary, lines = tiny_lab
    assert lines and "done" in lines[-1]
    for name in ("teacher", "base", "opd", "sft", "rl"):
        folder = out / name
        for f in ("config.json", "model.safetensors", "lab_tokenizer.json", "metrics.json"):
            assert (folder / f).is_file(), folder / f
        load_hf(folder)
    for name in ("opd", "sft", "rl"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert {"method", "steps", "accuracy", "base_accuracy", "loss", "seed", "wall_s", "history"} <= set(metrics)
        assert metrics["steps"] == 4 and len(metrics["history"]) == 4
        assert metrics["checkpoints"] == ["checkpoint-1", "checkpoint-3"]
        for cp in metrics["checkpoints"]:
            load_hf(out / name / cp)
    sub = json.loads((out / "subnetwork.json").read_text())
    assert {"full_opd_accuracy", "opd_mask_accuracy", "random_mask_accuracy", "density"} <= set(sub)
    assert (out / "README.md").is_file() and (out / "lab.json").is_file()


def test_tiny_lab_is_deterministic(tiny_lab, tmp_path):
    out, summary, _ = tiny_lab
    run_lab(tmp_path / "again", seed=0, settings=tiny_settings())
    files = sorted(p.relative_to(out) for p in out.rglob("model.safetensors"))
    assert len(files) == 5 + 3 * 2 + 3     # teacher, base, 3 runs × (final + 2 intermediates), sparse/{opd,rl,sft}
    assert {f.parts[0] for f in files} >= {"sparse"}
    for rel in files:
        assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_cli_registers_lab(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lab", "--out", str(tmp_path), "--steps", "3"])
    assert args.func and args.out == str(tmp_path) and args.steps == 3 and args.seed == 0
