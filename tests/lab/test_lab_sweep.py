"""The lab sweep: a tiny grid trained and analysed into a store, its numbers against numpy on the files,
masked retraining, resume; the finding sentences on synthetic sweeps where each claim holds and where
it fails; the Lab page renders on the tiny sweep's store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file as _load_torch
from streamlit.testing.v1 import AppTest

from opdviz.views import lab as VL
from opdviz.views import lab_findings as LF
from opdviz.cli import main as cli_main
from opdviz.errors import OptionsError
from opdviz.lab.grid import SweepGrid, SweepPoint
from opdviz.lab.pipeline import run_lab
from opdviz.lab.sweep import run_sweep
from opdviz.options import AnalysisOptions
from opdviz.store import Store
from test_lab import tiny_settings
from figcheck import assert_valid

ROOT = Path(__file__).resolve().parents[2]
# analyse two matrices per run (an FFN and an attention one), which keeps the tiny sweep fast
OPTS = AnalysisOptions(include=r"layers\.0\.(mlp\.down_proj|self_attn\.q_proj)\.weight", device="cpu")
GRID = SweepGrid(methods=("opd", "sft"), lrs=(1e-7, 3e-2), precisions=("fp32", "bf16"), weight_decays=(0.0,),
                 seeds=(0,), steps=2, batch=4, group=4, subnetwork=True)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    run_lab(root / "lab", seed=0, settings=tiny_settings())
    db = root / "s.duckdb"
    report = run_sweep(GRID, root / "lab", root / "out", db, options=OPTS)
    return root, db, report


def load_file(path: str) -> dict[str, np.ndarray]:
    """The bf16 tensors of a checkpoint as their raw 16-bit patterns (numpy has no bfloat16)."""
    return {k: v.view(torch.int16).numpy() for k, v in _load_torch(path).items()}


def _bits_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a == b


def test_every_grid_point_is_stored_with_its_settings(sweep):
    root, db, report = sweep
    # 2 lrs × 2 precisions × (SFT + OPD + its 2 masked retrainings)
    assert len(report) == 16 and all(r["status"] == "done" for r in report)
    runs = VL.sweep_table(Store(db))
    assert len(runs) == 16 and set(runs["status"]) == {"done"}
    assert set(runs["precision"]) == {"fp32", "bf16"} and set(runs["lr"]) == {1e-7, 3e-2}
    assert set(runs["mask"].dropna()) == {"changed", "random"}
    assert runs["accuracy"].between(0, 1).all() and runs["seed"].eq(0).all()
    extra = json.loads(Store(db).run_row(SweepPoint("opd", 3e-2, "bf16", 0.0, 0, 2, 4, 4).run_id)["extra"])
    assert extra["sweep"] is True and extra["lr"] == 3e-2 and extra["precision"] == "bf16"
    assert extra["weight_decay"] == 0.0 and extra["steps"] == 2


def test_stored_sparsity_matches_numpy_on_the_checkpoints(sweep):
    root, db, _ = sweep
    base = load_file(str(root / "lab" / "base" / "model.safetensors"))
    runs = VL.sweep_table(Store(db)).set_index("run_id")
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    for run_id in runs.index:
        post = load_file(str(root / "out" / run_id / "model.safetensors"))
        same = [_bits_equal(base[n], post[n]) for n in names]
        want = sum(int(s.sum()) for s in same) / sum(s.size for s in same)
        assert runs.at[run_id, "sparsity_exact"] == pytest.approx(want, abs=1e-12)
        assert runs.at[run_id, "sparsity_exact_ffn"] == pytest.approx(float(same[0].mean()), abs=1e-12)
        assert runs.at[run_id, "sparsity_exact_attn"] == pytest.approx(float(same[1].mean()), abs=1e-12)


def test_bf16_throughout_rounds_tiny_updates_away(sweep):
    """At lr 1e-7, two AdamW steps move a weight by a few 1e-7; in bf16 (8 significant bits) that is below
    half a step of any |w| > 1e-3, so only near-zero weights can change."""
    root, db, _ = sweep
    runs = VL.sweep_table(Store(db))
    tiny = runs[(runs["lr"] == 1e-7) & (runs["precision"] == "bf16") & runs["mask"].isna()]
    assert len(tiny) == 2 and (tiny["sparsity_exact"] > 0.99).all()
    base = _load_torch(str(root / "lab" / "base" / "model.safetensors"))
    for run_id in tiny["run_id"]:
        post = _load_torch(str(root / "out" / run_id / "model.safetensors"))
        for name, w in base.items():
            moved = w.view(torch.int16) != post[name].view(torch.int16)
            assert (w.float().abs()[moved] < 1e-3).all(), name
    big = runs[(runs["lr"] == 3e-2) & runs["mask"].isna()]
    assert (big["sparsity_exact"] < 0.5).all()


def test_masked_retraining_stays_inside_the_mask(sweep):
    root, db, _ = sweep
    base = load_file(str(root / "lab" / "base" / "model.safetensors"))
    for prec in ("fp32", "bf16"):
        full = SweepPoint("opd", 3e-2, prec, 0.0, 0, 2, 4, 4)
        post = load_file(str(root / "out" / full.run_id / "model.safetensors"))
        masked = load_file(str(root / "out" / f"{full.run_id}-mask-changed" / "model.safetensors"))
        rand = load_file(str(root / "out" / f"{full.run_id}-mask-random" / "model.safetensors"))
        for name in base:
            mask = ~_bits_equal(base[name], post[name])
            assert _bits_equal(base[name], masked[name])[~mask].all(), name   # frozen outside the mask
            # the random mask has the mask's count, so at most that many coordinates move
            assert int((~_bits_equal(base[name], rand[name])).sum()) <= int(mask.sum()), name
        meta = json.loads((root / "out" / f"{full.run_id}-mask-random" / "metrics.json").read_text())
        assert meta["mask"] == "random" and meta["mask_of"] == full.run_id and 0 < meta["mask_density"] < 1


def test_a_second_run_skips_what_is_stored(sweep):
    root, db, _ = sweep
    report = run_sweep(GRID, root / "lab", root / "out", db, options=OPTS)
    assert {r["status"] for r in report} == {"skipped"}


def test_a_masked_run_without_its_full_checkpoint_says_what_to_do(sweep, tmp_path):
    root, _, _ = sweep
    p = SweepPoint("opd", 1e-3, "fp32", 0.0, 5, 1, 4, 4, mask="changed")
    with pytest.raises(OptionsError, match="rerun the sweep with the same --out"):
        run_sweep(GRID, root / "lab", tmp_path / "out", tmp_path / "x.duckdb", runs=[p], options=OPTS)


@pytest.mark.parametrize("kw, words", [({"methods": ("dpo",)}, "unknown method"),
                                       ({"precisions": ("fp16",)}, "unknown precision"),
                                       ({"lrs": (0.0,)}, "learning rates"),
                                       ({"weight_decays": (-1.0,)}, "weight decays"),
                                       ({"seeds": ()}, "at least one")])
def test_a_bad_grid_is_refused(kw, words):
    with pytest.raises(OptionsError, match=words):
        SweepGrid(**kw)


def test_the_cli_runs_a_grid_and_resumes(sweep, capsys):
    root, db, _ = sweep
    args = ["lab", "sweep", "--lab", str(root / "lab"), "--out", str(root / "out"), "--db", str(db),
            "--methods", "sft", "--lrs", "1e-7", "--precisions", "bf16", "--weight-decay", "0", "--seeds", "0",
            "--steps", "2", "--batch", "4"]
    assert cli_main(args) == 0
    assert "0 runs trained and analysed, 1 already stored" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["lab", "sweep", "--lrs", "fast"])


# ------------------------------------------------------------------------------------ findings
def _runs(rows: list[dict]) -> pd.DataFrame:
    """A sweep table from compact rows (defaults: fp32, wd 0, full run, base accuracy 0.3, 500 problems)."""
    base = {"precision": "fp32", "weight_decay": 0.0, "mask": None, "base_accuracy": 0.3, "test_size": 500,
            "sparsity_exact_ffn": 0.5, "sparsity_exact_attn": 0.5, "principal_proj_10pct": 0.05, "seed": 0}
    df = pd.DataFrame([{**base, **r} for r in rows])
    df["mask"] = df["mask"].astype(object).where(df["mask"].notna(), None)
    return df


def _grid(sparsity: dict, acc: dict, seeds=(0, 1, 2), **kw) -> pd.DataFrame:
    rows = []
    for (method, prec, lr), sp in sparsity.items():
        for s in seeds:
            rows.append({"method": method, "precision": prec, "lr": lr, "seed": s, "sparsity_exact": sp + 0.001 * s,
                         "accuracy": acc[(method, prec, lr)] + 0.002 * s, **kw})
    return _runs(rows)


def test_sparse_regime_found_when_sparse_runs_improve():
    runs = _grid({("OPD", "bf16", 3e-5): 0.8, ("OPD", "fp32", 3e-5): 0.1},
                 {("OPD", "bf16", 3e-5): 0.45, ("OPD", "fp32", 3e-5): 0.5})
    text = LF.finding_sparse_regime(runs)
    assert "in 1 of 2 settings" in text and "OPD at lr 3e-5 (bf16" in text and "80 % unchanged" in text


def test_sparse_regime_absent_when_sparse_runs_do_not_improve():
    # sparse runs gain 1 point: within two standard errors of a 500-problem test (≈ 4 points)
    runs = _grid({("OPD", "bf16", 1e-6): 0.9, ("OPD", "fp32", 1e-4): 0.05},
                 {("OPD", "bf16", 1e-6): 0.31, ("OPD", "fp32", 1e-4): 0.6})
    assert LF.finding_sparse_regime(runs).startswith("No setting of the sweep")


def test_precision_finding_counts_matched_runs():
    runs = _grid({("OPD", "bf16", 1e-5): 0.8, ("OPD", "fp32", 1e-5): 0.2}, {("OPD", "bf16", 1e-5): 0.4,
                                                                           ("OPD", "fp32", 1e-5): 0.4})
    text = LF.finding_precision(runs)
    assert "bf16 is sparser in 3 of 3 matched runs" in text and "80 %" in text and "20 %" in text
    assert "not measured" in LF.finding_precision(runs[runs["precision"] == "bf16"])


@pytest.mark.parametrize("opd, sft, verdict", [(0.8, 0.3, "the claim reproduces for OPD"),
                                               (0.3, 0.31, "the claim does not reproduce for OPD")])
def test_method_claim_uses_the_seed_range(opd, sft, verdict):
    runs = _grid({("OPD", "bf16", 1e-5): opd, ("SFT", "bf16", 1e-5): sft},
                 {("OPD", "bf16", 1e-5): 0.4, ("SFT", "bf16", 1e-5): 0.4})
    assert verdict in LF.finding_methods(runs)


@pytest.mark.parametrize("ffn, attn, verdict", [(0.2, 0.6, "reproduces"), (0.7, 0.3, "does not reproduce")])
def test_ffn_claim(ffn, attn, verdict):
    runs = _grid({("OPD", "bf16", 1e-5): 0.5}, {("OPD", "bf16", 1e-5): 0.4},
                 sparsity_exact_ffn=ffn, sparsity_exact_attn=attn)
    assert f"the claim {verdict} here" in LF.finding_blocks(runs)


@pytest.mark.parametrize("opd, sft, verdict", [(0.01, 0.05, "reproduces"), (0.08, 0.05, "does not reproduce")])
def test_principal_claim(opd, sft, verdict):
    """Matched runs (same precision, rate, seed): OPD below SFT in all 3 or in none."""
    a = _grid({("OPD", "bf16", 1e-5): 0.5}, {("OPD", "bf16", 1e-5): 0.4}, principal_proj_10pct=opd)
    b = _grid({("SFT", "bf16", 1e-5): 0.5}, {("SFT", "bf16", 1e-5): 0.4}, principal_proj_10pct=sft)
    assert f"{verdict} here" in LF.finding_principal(pd.concat([a, b], ignore_index=True))


@pytest.mark.parametrize("masked, rand, verdict", [(0.5, 0.32, "holds in 1 of 1"), (0.5, 0.5, "holds in 0 of 1"),
                                                   (0.3, 0.2, "holds in 0 of 1")])
def test_subnetwork_claim(masked, rand, verdict):
    rows = []
    for s in (0, 1, 2):
        for mask, acc in ((None, 0.5), ("changed", masked), ("random", rand)):
            rows.append({"method": "OPD", "precision": "bf16", "lr": 3e-5, "seed": s, "mask": mask,
                         "accuracy": acc + 0.002 * s, "sparsity_exact": 0.8})
    table = VL.subnetwork_table(_runs(rows))
    assert list(table["training"]) == ["full OPD", "OPD mask", "random mask"]
    assert table["seeds"].tolist() == [3, 3, 3] and table["mask_density"].iloc[0] == pytest.approx(0.2)
    text = LF.finding_subnetwork(table)
    assert verdict in text and "mask 20 % of coordinates" in text


def test_empty_sweep_says_so():
    empty = pd.DataFrame(columns=list(VL.COLUMNS))
    assert "No lab sweep runs" in LF.finding_sparse_regime(empty)
    assert VL.fig_unchanged(empty).layout.meta["empty"]
    assert "not tested" in LF.finding_subnetwork(VL.subnetwork_table(empty))


def test_figures_draw_one_line_per_method_and_panel():
    runs = _grid({("OPD", "bf16", 1e-5): 0.8, ("OPD", "bf16", 1e-4): 0.4, ("SFT", "bf16", 1e-5): 0.5,
                  ("SFT", "bf16", 1e-4): 0.1, ("OPD", "fp32", 1e-5): 0.1},
                 {k: 0.4 for k in [("OPD", "bf16", 1e-5), ("OPD", "bf16", 1e-4), ("SFT", "bf16", 1e-5),
                                   ("SFT", "bf16", 1e-4), ("OPD", "fp32", 1e-5)]})
    fig = VL.fig_unchanged(runs)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 3        # bf16: OPD, SFT; fp32: OPD
    opd = next(t for t in lines if t.name == "OPD" and list(t.x) == [1e-5, 1e-4])
    assert list(opd.y) == pytest.approx([80.1, 40.1])            # mean over seeds, in %
    assert list(opd.error_y.array) == pytest.approx([0.1, 0.1])  # max − mean
    assert len([t for t in VL.fig_blocks(runs).data if t.mode == "lines+markers"]) == 6
    for make in (VL.fig_unchanged, VL.fig_accuracy, VL.fig_blocks, VL.fig_principal):
        assert_valid(make(runs))
    assert_valid(VL.fig_subnetwork(VL.subnetwork_table(runs), 0.5))


# ------------------------------------------------------------------------------------ page
def test_lab_page_renders_the_sweep(monkeypatch, sweep):
    _, db, _ = sweep
    sys.path.insert(0, str(ROOT))
    monkeypatch.setenv("OPDVIZ_DB", str(db))
    monkeypatch.setenv("OPDVIZ_PREWARM", "0")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/lab.py").run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error
    charts = at.get("plotly_chart")
    assert len(charts) == 5
    text = " ".join(m.value for m in at.markdown)
    assert "Subnetwork claim" in text and "Keeping the weights in bf16" in text


def test_overview_sentence_groups_runs_by_their_settings(sweep):
    _, db, _ = sweep
    text = LF.overview_sentence(Store(db))
    assert text.startswith("You are looking at 8 post-trained runs")      # masked retrainings left out
    assert "at lr 3e-2 with weights in bf16 throughout, no weight decay" in text
    assert "at lr 1e-7 with fp32 master weights saved as bf16" in text
    assert LF.overview_sentence(Store(db.parent / "missing.duckdb")) == ""


def test_markdown_escape_neutralises_links_and_emphasis():
    assert LF.markdown_escape("[x](javascript:1) *a* `b`") == "\\[x\\]\\(javascript:1\\) \\*a\\* \\`b\\`"
