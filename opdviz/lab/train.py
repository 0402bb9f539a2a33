"""Training loops of the lab: plain SFT (teacher, base), OPD, off-policy SFT and GRPO.

Every run is AdamW on fp32 master weights; checkpoints are the weights rounded to bf16 (so bf16
rounding swallows updates smaller than half a bf16 step, as it does for real checkpoints), and the
held-out accuracy reported for a checkpoint is measured on those bf16-rounded weights.

Losses, per batch of prompts (all completions have the fixed length ``answer_len``; positions after
a sampled ``<eos>`` are masked out):

* ``sft``  — cross-entropy on given targets (true answers for teacher/base; the teacher's greedy
  completions for the SFT post-training run: off-policy distillation).
* ``opd``  — the student samples one completion per prompt (temperature 1); loss is the full-vocab
  reverse KL(student ‖ teacher) at every position of that sample, averaged over tokens. The sample
  is held fixed (no gradient through the sampling), as in on-policy distillation.
* ``rl``   — GRPO: ``group`` samples per prompt, exact-match reward, advantage
  (r - mean_group) / (std_group + 1e-4), no KL term. One gradient step per sampled batch, so the
  PPO ratio is exactly 1 and the clipped objective equals the plain on-policy policy gradient
  ``-A · log π(token)``, averaged over a sequence's tokens, then over sequences.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
import torch.nn.functional as F

from opdviz.lab.model import Llama, bf16_state
from opdviz.lab.subnetwork import MaskedTrainer
from opdviz.lab.task import AdditionTask


@torch.no_grad()
def generate(model: Llama, prompts: torch.Tensor, n_tokens: int, temperature: float = 0.0,
             g: torch.Generator | None = None) -> torch.Tensor:
    """Completions [n, n_tokens]: greedy when ``temperature`` is 0, else sampled with generator ``g``."""
    seq = prompts
    for _ in range(n_tokens):
        logits = model(seq)[:, -1]
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=g).squeeze(1)
        seq = torch.cat((seq, nxt[:, None]), dim=1)
    return seq[:, prompts.shape[1]:]


def valid_mask(completions: torch.Tensor, eos_id: int) -> torch.Tensor:
    """float [n, L]: 1 up to and including the first ``<eos>``, 0 after it."""
    is_eos = (completions == eos_id).long()
    after = (is_eos.cumsum(1) - is_eos) > 0
    return (~after).float()


def completion_logits(model: Llama, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Logits [n, L, vocab] that predict each completion token (teacher forcing)."""
    seq = torch.cat((prompts, completions), dim=1)
    return model(seq[:, :-1])[:, prompts.shape[1] - 1:]


def sft_loss(model, prompts, targets, mask):
    logits = completion_logits(model, prompts, targets)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(mask)
    return (nll * mask).sum() / mask.sum()


def opd_loss(student, teacher, prompts, completions, mask):
    logp_s = completion_logits(student, prompts, completions).log_softmax(-1)
    with torch.no_grad():
        logp_t = completion_logits(teacher, prompts, completions).log_softmax(-1)
    rkl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)  # KL(student ‖ teacher), full vocab, per position
    return (rkl * mask).sum() / mask.sum()


def grpo_loss(model, prompts, completions, mask, advantages):
    logp = completion_logits(model, prompts, completions).log_softmax(-1)
    tok_logp = logp.gather(-1, completions[..., None]).squeeze(-1)
    per_seq = (tok_logp * mask).sum(1) / mask.sum(1)
    return -(advantages * per_seq).mean()


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: ``method`` in {"pretrain", "opd", "sft", "rl"}, step budget and optimizer."""

    method: str
    steps: int
    lr: float
    batch: int  # sequences per step (rl: batch // group prompts × group samples)
    weight_decay: float = 0.01
    group: int = 8
    warmup: int = 0
    checkpoints: tuple[int, ...] = ()  # steps after which to call on_checkpoint
    stop_at: float | None = None  # stop early once validation accuracy reaches this (pretraining)
    check_every: int = 25


def train(model: Llama, spec: RunSpec, task: AdditionTask, test_pairs: torch.Tensor, g: torch.Generator, *,
          teacher: Llama | None = None, masks: dict[str, torch.Tensor] | None = None,
          on_checkpoint: Callable[[int, float], None] | None = None,
          progress: Callable[[int, int], None] | None = None,
          val_pairs: torch.Tensor | None = None) -> list[dict]:
    """Train ``model`` in place for ``spec.steps`` steps; returns the per-step history.

    ``masks`` (name → bool, True = trainable) restricts the update to a subnetwork.
    ``on_checkpoint(step, accuracy)`` is called at ``spec.checkpoints`` with the bf16 accuracy.
    With ``spec.stop_at``, training stops once the accuracy on ``val_pairs`` (checked every
    ``spec.check_every`` steps; never the test pairs) reaches it.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, spec.warmup)))
    stepper = MaskedTrainer(model, opt, masks) if masks is not None else None
    tok = task.tokenizer
    exclude = test_pairs if val_pairs is None else torch.cat((test_pairs, val_pairs))
    history = []
    for step in range(1, spec.steps + 1):
        row = {"step": step}
        if spec.method == "rl":
            pairs = task.sample_pairs(max(1, spec.batch // spec.group), g, exclude)
            pairs = pairs.repeat_interleave(spec.group, dim=0)
        else:
            pairs = task.sample_pairs(spec.batch, g, exclude)
        prompts = task.prompts(pairs)
        model.eval()
        if spec.method == "pretrain":
            targets = task.answers(pairs)
        elif spec.method == "sft":
            targets = generate(teacher, prompts, task.answer_len)
        else:
            targets = generate(model, prompts, task.answer_len, temperature=1.0, g=g)
            reward = task.correct(pairs, targets).float()
            row["train_reward"] = round(reward.mean().item(), 4)
        model.train()
        mask = valid_mask(targets, tok.eos_id)
        if spec.method in ("pretrain", "sft"):
            loss = sft_loss(model, prompts, targets, mask)
        elif spec.method == "opd":
            loss = opd_loss(model, teacher, prompts, targets, mask)
        elif spec.method == "rl":
            r = reward.view(-1, spec.group)
            adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
            loss = grpo_loss(model, prompts, targets, mask, adv)
        else:
            raise ValueError(f"unknown method {spec.method!r}; use pretrain, opd, sft or rl")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if stepper is not None:
            stepper.step()
        else:
            opt.step()
        sched.step()
        row["loss"] = round(loss.item(), 6)
        last = step == spec.steps
        if spec.stop_at is not None and step % spec.check_every == 0:
            row["val_accuracy"] = accuracy(model, task, val_pairs)
            last = last or row["val_accuracy"] >= spec.stop_at
        if step in spec.checkpoints or last:
            row["accuracy"] = accuracy(model, task, test_pairs)
            if on_checkpoint is not None:
                on_checkpoint(step, row["accuracy"])
        history.append(row)
        if progress is not None:
            progress(step, step if last else spec.steps)
        if last:
            break
    return history


@torch.no_grad()
def accuracy(model: Llama, task: AdditionTask, pairs: torch.Tensor, bf16: bool = True) -> float:
    """Greedy exact-match accuracy on ``pairs``; with ``bf16`` the weights are rounded as saved."""
    if bf16:
        shadow = Llama(model.config)
        shadow.load_state_dict({k: v.float() for k, v in bf16_state(model).items()})
        model = shadow
    model.eval()
    hits = 0
    for chunk in pairs.split(250):
        completions = generate(model, task.prompts(chunk), task.answer_len)
        hits += int(task.correct(chunk, completions).sum())
    return round(hits / len(pairs), 4)


class Clock:
    """Progress lines ``phase  step/total  elapsed  ETA`` through ``emit`` at most every ``every`` s."""

    def __init__(self, emit: Callable[[str], None] | None, every: float = 5.0):
        self.emit, self.every, self.t0 = emit, every, time.perf_counter()
        self._last = -1e9

    def phase(self, name: str) -> Callable[[int, int], None]:
        start = time.perf_counter()

        def tick(step: int, total: int) -> None:
            now = time.perf_counter()
            if self.emit is None or (now - self._last < self.every and step != total):
                return
            self._last = now
            eta = (now - start) / step * (total - step)
            self.emit(f"[lab] {name:<14} {step:>4}/{total:<4} elapsed {now - self.t0:6.1f}s  "
                      f"phase ETA {eta:5.1f}s")
        return tick
