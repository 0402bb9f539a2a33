"""``run_lab``: regenerate the demo lab — teacher, student base, OPD/SFT/RL runs, subnetwork check.

    from opdviz.lab.pipeline import run_lab
    run_lab(Path("data/demo"), seed=0, progress=print)      # or: opdviz lab --out data/demo

Deterministic for a given seed and settings (explicit generators, deterministic algorithms,
2 threads): two runs write byte-identical ``model.safetensors`` files. Layout: see ``README_TEXT``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from opdviz.lab.model import Llama, LlamaConfig, bf16_state, save_hf
from opdviz.lab.settings import LOSS_NAMES, METHODS, LabSettings  # noqa: F401 (LOSS_NAMES: lab.json)
from opdviz.lab.subnetwork import MaskedTrainer, changed_masks, random_masks_like
from opdviz.lab.task import AdditionTask
from opdviz.lab.train import Clock, RunSpec, accuracy, train

def checkpoint_steps(steps: int, n: int) -> tuple[int, ...]:
    """``n`` evenly spaced intermediate steps strictly between 0 and ``steps``."""
    return tuple(sorted({round(k * steps / (n + 1)) for k in range(1, n + 1)} - {0, steps}))


def run_lab(out: Path, seed: int = 0, steps: int | None = None,
            progress: Callable[[str], None] | None = None, settings: LabSettings | None = None) -> dict:
    """Regenerate the lab under ``out`` (replacing what the lab wrote there before).

    Args: ``steps`` — post-training steps per run (teacher/base scaled alike; default from settings);
    ``progress`` — called with one line per update (phase, step/total, ETA); ``settings`` — sizes
    and hyper-parameters (default ``LabSettings()``).
    Returns the summary also written to ``<out>/lab.json`` (accuracies per run, wall time).
    """
    settings = settings or LabSettings()
    if steps is not None:
        settings = settings.scaled(steps)
    out = Path(out)
    prev = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    try:
        return _run(out, seed, settings, Clock(progress))
    finally:  # leave the process as we found it
        torch.use_deterministic_algorithms(prev[0])
        torch.set_num_threads(prev[1])


def _run(out: Path, seed: int, s: LabSettings, clock: Clock) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    for sub in ("teacher", "base", "sparse", *METHODS):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    task = AdditionTask(digits=s.digits, test_size=s.test_size)
    test, val = task.test_pairs(seed), task.val_pairs(seed)
    tok = {"lab_tokenizer.json": task.tokenizer.to_json()}
    common = {"seed": seed, "torch": torch.__version__, "dtype": "bfloat16", "device": "cpu",
              "task": f"{s.digits}-digit addition, exact match on {s.test_size} held-out problems"}

    def pretrain(name: str, cfg: LlamaConfig, n_steps: int, stop: float, index: int) -> tuple[Llama, dict]:
        t = time.perf_counter()
        model = Llama(cfg, seed=seed * 1000 + index)
        spec = RunSpec("pretrain", n_steps, s.pretrain_lr, s.pretrain_batch, weight_decay=s.weight_decay,
                       warmup=min(30, n_steps), stop_at=stop, check_every=max(1, min(10, n_steps // 10)))
        g = torch.Generator().manual_seed(seed * 1000 + index)
        hist = train(model, spec, task, test, g, progress=clock.phase(name), val_pairs=val)
        metrics = {"method": "SFT on true answers", "steps": len(hist), "max_steps": n_steps,
                   "stop_at_val_accuracy": stop, "accuracy": hist[-1]["accuracy"],
                   "loss": _tail_loss(hist), "loss_name": "cross_entropy", "lr": s.pretrain_lr,
                   "batch": s.pretrain_batch, "n_params": cfg.n_params(), **common,
                   "wall_s": round(time.perf_counter() - t, 1), "history": hist}
        save_hf(model, out / name, {**tok, "metrics.json": metrics})
        return model, metrics

    teacher, t_metrics = pretrain("teacher", s.teacher, s.teacher_steps, s.teacher_stop, 1)
    teacher.eval()
    base, b_metrics = pretrain("base", s.student, s.base_steps, s.base_stop, 2)
    # post-training starts from the released (bf16) base, in fp32 master weights
    base_sd = bf16_state(base)
    base_acc = accuracy(base, task, test)

    def post(method: str, index: int, folder: Path | None, masks=None, label=None) -> tuple[Llama, dict]:
        t = time.perf_counter()
        model = Llama(s.student)
        model.load_state_dict({k: v.float() for k, v in base_sd.items()})
        cps = checkpoint_steps(s.post_steps, s.intermediates) if folder is not None else ()
        spec = RunSpec(method, s.post_steps, s.post_lr, s.post_batch, weight_decay=s.weight_decay,
                       group=s.group, checkpoints=cps)
        g = torch.Generator().manual_seed(seed * 1000 + 10 + index)
        saved = []

        def on_checkpoint(step: int, acc: float) -> None:
            if folder is not None and step != s.post_steps:
                meta = {"method": METHODS[method], "step": step, "accuracy": acc, "base_accuracy": base_acc}
                save_hf(model, folder / f"checkpoint-{step}", {**tok, "metrics.json": meta})
                saved.append(f"checkpoint-{step}")

        hist = train(model, spec, task, test, g, teacher=teacher, masks=masks, on_checkpoint=on_checkpoint,
                     progress=clock.phase(label or method), val_pairs=val)
        metrics = {"method": METHODS[method], "steps": s.post_steps, "accuracy": hist[-1]["accuracy"],
                   "base_accuracy": base_acc, "teacher_accuracy": t_metrics["accuracy"],
                   "loss": _tail_loss(hist), "loss_name": LOSS_NAMES[method], "lr": s.post_lr,
                   "batch": s.post_batch, "weight_decay": s.weight_decay, "checkpoints": saved, **common,
                   "wall_s": round(time.perf_counter() - t, 1), "history": hist}
        if method == "rl":
            metrics["group"] = s.group
        if folder is not None:
            save_hf(model, folder, {**tok, "metrics.json": metrics})
        return model, metrics

    runs = {}
    for i, method in enumerate(METHODS):
        model, runs[method] = post(method, 0 if method == "opd" else i, out / method)
        if method == "opd":
            opd_sd = bf16_state(model)

    # functional sparsity: retrain OPD (same data and samples seed) on only what full OPD changed
    masks = changed_masks(base_sd, opd_sd)
    rand = random_masks_like(masks, seed=seed * 1000 + 99)
    _, m_opd = post("opd", 0, None, masks=masks, label="opd-subnet")
    _, m_rand = post("opd", 0, None, masks=rand, label="opd-random")
    sub = {
        "steps": s.post_steps, "seed": seed, "base_accuracy": base_acc,
        "full_opd_accuracy": runs["opd"]["accuracy"], "opd_mask_accuracy": m_opd["accuracy"],
        "random_mask_accuracy": m_rand["accuracy"], "density": round(MaskedTrainer.density(masks), 6),
        "per_tensor_density": {k: round(m.float().mean().item(), 6) for k, m in masks.items()},
        "mask": "coordinates whose bf16 bits differ between base and final OPD; random mask: same count per "
                "tensor, uniformly placed",
        "history": {"opd_mask": m_opd["history"], "random_mask": m_rand["history"]},
    }
    (out / "subnetwork.json").write_text(json.dumps(sub, indent=2) + "\n")

    summary = {
        "seed": seed, "wall_s": round(time.perf_counter() - t0, 1), "settings": s.to_json(), **common,
        "accuracy": {"teacher": t_metrics["accuracy"], "base": base_acc,
                     **{METHODS[m]: r["accuracy"] for m, r in runs.items()},
                     "OPD subnetwork": m_opd["accuracy"], "OPD random mask": m_rand["accuracy"]},
        "opd_changed_fraction": sub["density"],
    }
    # the sparse regime next to the runs above: bf16 throughout at a lower rate (opdviz.lab.sweep)
    from opdviz.lab.sweep import sparse_points, write_demo_sparse

    sparse = write_demo_sparse(out, sparse_points(s, seed), progress=clock.emit, data_seed=seed,
                               task=(s.digits, s.test_size))
    summary["accuracy"].update({f"{METHODS[m]} sparse": r["accuracy"] for m, r in sparse.items()})
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "lab.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(README_TEXT.format(**_readme_fields(s, summary)))
    if clock.emit:
        clock.emit(f"[lab] done in {summary['wall_s']:.1f}s → {out}: {summary['accuracy']}")
    return summary


def _tail_loss(hist: list[dict]) -> float:
    tail = hist[-max(1, len(hist) // 10):]
    return round(sum(r["loss"] for r in tail) / len(tail), 6)


def _readme_fields(s: LabSettings, summary: dict) -> dict:
    acc = summary["accuracy"]
    prompt, answer = AdditionTask(digits=s.digits).text(57 % 10 ** s.digits, 312 % 10 ** s.digits)
    return {"example_prompt": prompt, "example_answer": answer, "digits": s.digits, "test_size": s.test_size, "post_steps": s.post_steps,
            "n_inter": s.intermediates, "student_params": s.student.n_params(),
            "teacher_params": s.teacher.n_params(), "lr": s.post_lr, "batch": s.post_batch,
            "group": s.group, "t_stop": s.teacher_stop, "b_stop": s.base_stop, "wd": s.weight_decay, "seed": summary["seed"], "wall_s": summary["wall_s"],
            "sparse_desc": _sparse_desc(s),
            "acc_table": "\n".join(f"| {k} | {v:.3f} |" for k, v in acc.items())}


def _sparse_desc(s: LabSettings) -> str:
    return (f"AdamW lr {s.sparse_lr:g}, no weight decay, {s.sparse_steps} steps of {s.sparse_batch} "
            "sequences (`opdviz.lab.sweep.sparse_points`)")


README_TEXT = """\
# opdviz demo lab

Generated by `opdviz lab` (`opdviz.lab.pipeline.run_lab`, seed {seed}, {wall_s} s on CPU). Regenerate:

    opdviz lab --out DIR --seed {seed}

## Task
{digits}-digit addition with fixed widths: `<bos>{example_prompt}` → `{example_answer}<eos>`; exact-match accuracy on
{test_size} held-out problems drawn by seed and never trained on. The character tokenizer is
`lab_tokenizer.json` in every model folder (vocab: `<pad>`=0, `<bos>`=1, `<eos>`=2, digits, `+`, `=`).

## Layout
Every model folder is a Hugging Face Llama folder (`config.json` with LlamaForCausalLM,
bf16 `model.safetensors`), plus `lab_tokenizer.json` and `metrics.json`.

    teacher/                 the teacher ({teacher_params} params), SFT on true answers until
                             validation accuracy {t_stop} (validation set disjoint from the test set)
    base/                    the student base ({student_params} params), brief SFT on true answers,
                             stopped once validation accuracy reached {b_stop}
    opd/                     final OPD checkpoint
    opd/checkpoint-<step>/   {n_inter} intermediate checkpoints
    sft/, sft/checkpoint-*/  off-policy distillation: CE on the teacher's greedy completions
    rl/,  rl/checkpoint-*/   GRPO, exact-match reward
    sparse/opd, sparse/rl, sparse/sft
                             the sparse regime: the same methods with weights kept in bf16 throughout,
                             {sparse_desc}
    subnetwork.json          OPD retrained on only the coordinates full OPD changed, and on a random mask
    lab.json                 settings, versions, accuracies, wall time

So base = `base/`, post-trained = `opd/`, `sft/`, `rl/` (each a loadable HF folder).

## Runs
All from the same bf16 base, {post_steps} steps each, AdamW (lr {lr}, weight decay {wd}, fp32 master
weights), {batch} sequences per step; checkpoints rounded to bf16.

* OPD: one sampled completion per prompt (temperature 1); loss = full-vocab reverse
  KL(student ‖ teacher) at each position of the student's own sample.
* SFT: cross-entropy on the teacher's greedy completions (off-policy).
* RL: GRPO, {group} samples per prompt, exact-match reward, group-normalised advantages, no KL;
  one update per batch, so the clipped ratio is 1 and the objective is the on-policy policy gradient.

Accuracies (bf16 weights, greedy):

| model | accuracy |
|---|---|
{acc_table}
"""
