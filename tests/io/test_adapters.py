"""PEFT LoRA adapters as the post-trained side, checked against PEFT's own merge_and_unload()."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from opdviz.io.adapters import AdapterCheckpoint, LoraAdapter, lowrank_sigma, open_post  # noqa: E402
from opdviz.errors import CheckpointError  # noqa: E402
from opdviz.engine.runner import JobSpec, run_job  # noqa: E402
from opdviz.options import AnalysisOptions  # noqa: E402
from opdviz.io.reader import Checkpoint  # noqa: E402
from opdviz.store import Store  # noqa: E402


def tiny_llama(dtype):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def make_adapter(tmp, model, lora_config, seed=1):
    """Save base, the adapter (random B, so ΔW ≠ 0; modules_to_save perturbed) and PEFT's merged model."""
    base_dir, ad_dir, merged_dir = tmp / "base", tmp / "adapter", tmp / "merged"
    model.save_pretrained(base_dir)
    pm = peft.get_peft_model(model, lora_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_A" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
    pm.save_pretrained(ad_dir)
    pm.merge_and_unload().save_pretrained(merged_dir)
    return base_dir, ad_dir, merged_dir


def assert_equals_merge(base_dir, ad_dir, merged_dir):
    merged = load_file(str(merged_dir / "model.safetensors"))
    with Checkpoint.open(base_dir) as b, open_post(ad_dir, b) as post:
        assert isinstance(post, AdapterCheckpoint)
        assert set(post.infos) == set(merged)
        for name, want in merged.items():
            got = post.load(name)
            assert got.dtype == want.dtype, name
            assert torch.equal(got, want), (name, (got.float() - want.float()).abs().max())
        return post.run_extra["adapter"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_lora_equals_peft_merge(tmp_path, dtype):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                          modules_to_save=["lm_head"], rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    dirs = make_adapter(tmp_path, tiny_llama(dtype), cfg)
    info = assert_equals_merge(*dirs)
    ranks = info["ranks"]
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 4
    assert ranks["model.layers.1.self_attn.v_proj.weight"] == 2
    assert ranks["model.embed_tokens.weight"] == 4
    assert info["modules_to_save"] == ["lm_head"]
    assert info["full_tensors"] == ["lm_head.weight", "model.embed_tokens.weight"]   # + save_embedding_layers


def test_rslora_scale_equals_peft_merge(tmp_path):
    cfg = peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "up_proj"])
    base_dir, ad_dir, merged_dir = make_adapter(tmp_path, tiny_llama(torch.float32), cfg)
    assert_equals_merge(base_dir, ad_dir, merged_dir)
    with Checkpoint.open(base_dir) as b, open_post(ad_dir, b) as post:
        t = post.targets["model.layers.0.mlp.up_proj.weight"]
        assert t.scale == pytest.approx(4 / np.sqrt(8))


def test_gpt2_fan_in_fan_out_equals_peft_merge(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    base_dir, ad_dir, merged_dir = make_adapter(tmp_path, tiny_gpt2(), cfg)
    assert_equals_merge(base_dir, ad_dir, merged_dir)
    with Checkpoint.open(base_dir) as b, open_post(ad_dir, b) as post:
        t = post.targets["transformer.h.0.attn.c_attn.weight"]
        assert t.transpose and tuple(b.infos["transformer.h.0.attn.c_attn.weight"].shape) == (32, 96)


def test_job_results_equal_the_merged_checkpoint(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"], modules_to_save=["lm_head"])
    base_dir, ad_dir, merged_dir = make_adapter(tmp_path, tiny_llama(torch.bfloat16), cfg)
    db = tmp_path / "s.duckdb"
    opts = AnalysisOptions(spectrum="exact")
    run_job(JobSpec(base_dir, ad_dir, "lora", "SFT", db, opts), progress=False, log=lambda *a: None)
    run_job(JobSpec(base_dir, merged_dir, "merged", "SFT", db, opts), progress=False, log=lambda *a: None)
    store = Store(db)
    m = store.query("SELECT run_id, tensor, metric, value FROM metrics")
    a = m[m.run_id == "lora"].set_index(["tensor", "metric"])["value"]
    b = m[m.run_id == "merged"].set_index(["tensor", "metric"])["value"]
    common = b.index
    assert set(a.index) - set(common) == {i for i in a.index if i[1].startswith("adapter_")}
    np.testing.assert_array_equal(a.loc[common].to_numpy(), b.loc[common].to_numpy())
    assert len(common) > 500
    # the adapter's rank and scale per tensor, and in the run's details
    assert a.loc[("model.layers.0.self_attn.q_proj.weight", "adapter_rank")] == 4
    assert a.loc[("model.layers.0.self_attn.q_proj.weight", "adapter_scale")] == 2.0
    extra = json.loads(store.runs().set_index("run_id").loc["lora", "extra"])
    assert extra["adapter"]["r"] == 4 and extra["adapter"]["n_lora_modules"] == 6
    # unchanged tensors are analysed (ΔW = 0), as in the merged checkpoint
    assert a.loc[("model.layers.0.self_attn.k_proj.weight", "delta_fro")] == 0.0
    # the stored low-rank spectrum is the σ of scale·B·A (float64 reference)
    arr = store.query("SELECT tensor, name, \"values\" FROM arrays WHERE run_id = 'lora' AND name = 'adapter_spectrum'")
    assert len(arr) == 6
    ad = load_file(str(ad_dir / "adapter_model.safetensors"))
    row = arr[arr.tensor == "model.layers.1.mlp.gate_proj.weight"].iloc[0]
    key = "base_model.model.model.layers.1.mlp.gate_proj"
    want = np.linalg.svd(2.0 * ad[key + ".lora_B.weight"].double().numpy() @ ad[key + ".lora_A.weight"].double().numpy(),
                         compute_uv=False)[:4]
    np.testing.assert_allclose(np.asarray(row["values"]), want, rtol=1e-10)


def test_lowrank_sigma_against_numpy():
    g = torch.Generator().manual_seed(3)
    b, a = torch.randn(50, 5, generator=g), torch.randn(5, 70, generator=g)
    want = np.linalg.svd(-0.7 * b.double().numpy() @ a.double().numpy(), compute_uv=False)[:5]
    np.testing.assert_allclose(lowrank_sigma(b, a, -0.7), want, rtol=1e-12)


def test_dora_is_refused(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    _, ad_dir, _ = make_adapter(tmp_path, tiny_llama(torch.float32), cfg)
    with pytest.raises(CheckpointError, match="DoRA.*merge_and_unload"):
        LoraAdapter.open(ad_dir)


@pytest.mark.parametrize("patch, match", [
    ({"peft_type": "IA3"}, "LoRA adapters"),
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"lora_bias": True}, "lora_bias"),
    ({"r": 3}, "disagree"),
])
def test_other_variants_and_bad_configs_are_refused(tmp_path, patch, match):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    base_dir, ad_dir, _ = make_adapter(tmp_path, tiny_llama(torch.float32), cfg)
    path = ad_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **patch}))
    with pytest.raises(CheckpointError, match=match):
        with Checkpoint.open(base_dir) as b:
            open_post(ad_dir, b)


def test_adapter_on_the_wrong_base_is_refused(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    _, ad_dir, _ = make_adapter(tmp_path / "g", tiny_gpt2(), cfg)
    llama = tmp_path / "llama"
    tiny_llama(torch.float32).save_pretrained(llama)
    with Checkpoint.open(llama) as b, pytest.raises(CheckpointError, match="base"):
        open_post(ad_dir, b)


def test_adapter_folder_as_base_says_what_it_is(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    _, ad_dir, _ = make_adapter(tmp_path, tiny_llama(torch.float32), cfg)
    with pytest.raises(CheckpointError, match="PEFT adapter"):
        Checkpoint.open(ad_dir)


def test_adapter_by_hub_id_through_the_cli(tmp_path, monkeypatch, capsys):
    from test_hub import cache_model

    from opdviz.cli import main

    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    base_dir, ad_dir, _ = make_adapter(tmp_path, tiny_llama(torch.bfloat16), cfg)
    cache = tmp_path / "hub"
    cache_model(cache, "acme/base", base_dir, commit="c" * 40)
    cache_model(cache, "acme/lora", ad_dir, commit="d" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    db = tmp_path / "s.duckdb"
    assert main(["compute", "acme/base", "acme/lora", "--db", str(db), "--no-progress", "--method", "SFT"]) == 0
    run = Store(db).runs().set_index("run_id").loc["lora"]
    assert run["status"] == "done" and json.loads(run["extra"])["adapter"]["r"] == 2
    assert "adapter_rank" in set(Store(db).query("SELECT metric FROM metrics WHERE run_id = 'lora'")["metric"])


def test_dashboard_validation_reads_adapters(tmp_path, monkeypatch):
    from opdviz.io import folders, validation

    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_rslora=True)
    base_dir, ad_dir, _ = make_adapter(tmp_path, tiny_llama(torch.float32), cfg)
    rep = validation.validate_checkpoint(ad_dir)
    assert rep.ok and "LoRA adapter (r = 2, alpha = 4, rsLoRA, 2 modules)" in rep.summary()
    pair = validation.validate_pair(base_dir, ad_dir)
    assert pair.ok and pair.n_analysed == len(load_file(str(base_dir / "model.safetensors")))
    monkeypatch.setenv("OPDVIZ_CHECKPOINT_ROOTS", str(tmp_path))
    assert ad_dir in folders.list_checkpoints()
    dora = tmp_path / "dora"
    make_adapter(dora, tiny_llama(torch.float32), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert not validation.validate_pair(base_dir, dora / "adapter").ok


@pytest.mark.parametrize("which", ["adapter_config.json", "adapter_model.safetensors"])
def test_symlinked_adapter_files_are_refused(tmp_path, which):
    """Issue 12: an adapter file that is a symlink (here to a copy outside the folder) is refused, and nothing of
    the outside file is read."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    base_dir, ad_dir, _ = make_adapter(tmp_path, tiny_llama(torch.float32), cfg)
    outside = tmp_path / "outside" / which
    outside.parent.mkdir()
    (ad_dir / which).rename(outside)
    (ad_dir / which).symlink_to(outside)
    with pytest.raises(CheckpointError, match="symlink"):
        with Checkpoint.open(base_dir) as b:
            open_post(ad_dir, b)


def test_deeply_nested_adapter_config_is_a_clear_error(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    base_dir, ad_dir, _ = make_adapter(tmp_path, tiny_llama(torch.float32), cfg)
    (ad_dir / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match="nest"):
        with Checkpoint.open(base_dir) as b:
            open_post(ad_dir, b)
