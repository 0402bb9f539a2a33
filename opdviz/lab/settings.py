"""The lab's settings: what shapes the demo lab's runs (``LabSettings``) and the names of its methods and losses.

Shared by the pipeline (``opdviz.lab.pipeline``) and the sweep (``opdviz.lab.sweep``), which both build runs
from them.
"""

from __future__ import annotations

import dataclasses

from opdviz.errors import OptionsError
from opdviz.lab.model import LlamaConfig

METHODS = {"opd": "OPD", "sft": "SFT", "rl": "RL"}
LOSS_NAMES = {"opd": "reverse_kl", "sft": "cross_entropy", "rl": "policy_gradient", "pretrain": "cross_entropy"}


@dataclasses.dataclass(frozen=True)
class LabSettings:
    """Everything that shapes the lab; ``run_lab`` records it in ``<out>/lab.json``."""

    digits: int = dataclasses.field(default=2, metadata={"help": "operand digits of the addition task"})
    test_size: int = dataclasses.field(default=500, metadata={"help": "held-out test problems"})
    # sizes: 19 student checkpoints (base + 3 runs × 6) must stay near 20 MB in bf16
    student: LlamaConfig = LlamaConfig(vocab_size=15, hidden_size=96, intermediate_size=256,
                                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    teacher: LlamaConfig = LlamaConfig(vocab_size=15, hidden_size=128, intermediate_size=344,
                                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    teacher_steps: int = dataclasses.field(default=600, metadata={"help": "most teacher SFT steps on true answers"})
    teacher_stop: float = dataclasses.field(default=0.97, metadata={"help": "teacher stops at this val accuracy"})
    base_steps: int = dataclasses.field(default=400, metadata={"help": "most student base SFT steps"})
    base_stop: float = dataclasses.field(default=0.3, metadata={"help": "base stops at this val accuracy"})
    pretrain_lr: float = dataclasses.field(default=2e-3, metadata={"help": "AdamW lr of teacher and base"})
    pretrain_batch: int = dataclasses.field(default=128, metadata={"help": "sequences per pretraining step"})
    post_steps: int = dataclasses.field(default=120, metadata={"help": "steps of every post-training run"})
    post_lr: float = dataclasses.field(default=1e-4, metadata={"help": "AdamW lr of OPD, SFT, RL"})
    post_batch: int = dataclasses.field(default=64, metadata={"help": "sequences per post-training step"})
    weight_decay: float = dataclasses.field(default=0.01, metadata={"help": "AdamW decoupled weight decay"})
    group: int = dataclasses.field(default=8, metadata={"help": "GRPO samples per prompt"})
    intermediates: int = dataclasses.field(default=5, metadata={"help": "checkpoints kept per run before the final"})
    # the sparse regime (sparse/<method>): weights in bf16 throughout, no weight decay, a lower rate
    sparse_lr: float = dataclasses.field(default=3e-5, metadata={"help": "AdamW lr of the sparse-regime runs"})
    sparse_steps: int = dataclasses.field(default=60, metadata={"help": "steps of every sparse-regime run"})
    sparse_batch: int = dataclasses.field(default=32, metadata={"help": "sequences per sparse-regime step"})

    def scaled(self, steps: int) -> "LabSettings":
        """Post-training runs of ``steps`` steps; teacher and base steps scaled by the same factor."""
        if steps < 1:
            raise OptionsError(f"--steps must be at least 1, got {steps}")
        f = steps / self.post_steps
        return dataclasses.replace(self, post_steps=steps, teacher_steps=max(1, round(self.teacher_steps * f)),
                                   base_steps=max(1, round(self.base_steps * f)),
                                   sparse_steps=max(1, round(self.sparse_steps * f)))

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["student"], d["teacher"] = self.student.to_hf(), self.teacher.to_hf()
        return d
