"""The grid of ``opdviz lab sweep``: which runs exist and what each is called (no torch here, so the CLI
and the dashboard can import it cheaply).

    SweepGrid(lrs=(1e-6, 1e-4), seeds=(0,)).points()   # → [SweepPoint(...), ...]
"""

from __future__ import annotations

import dataclasses

from opdviz.errors import OptionsError

METHODS = {"opd": "OPD", "sft": "SFT", "rl": "RL"}
PRECISIONS = ("fp32", "bf16")
MASKS = ("changed", "random")


@dataclasses.dataclass(frozen=True)
class SweepGrid:
    """The grid of a sweep; every combination is one run (plus two masked OPD runs with ``subnetwork``)."""

    methods: tuple[str, ...] = dataclasses.field(default=("opd", "rl", "sft"), metadata={"help": "post-training methods"})
    lrs: tuple[float, ...] = dataclasses.field(default=(1e-6, 1e-5, 1e-4), metadata={"help": "AdamW learning rates"})
    precisions: tuple[str, ...] = dataclasses.field(default=PRECISIONS, metadata={"help": "fp32 master weights or bf16 throughout"})
    weight_decays: tuple[float, ...] = dataclasses.field(default=(0.0, 0.01), metadata={"help": "AdamW decoupled weight decay"})
    seeds: tuple[int, ...] = dataclasses.field(default=(0, 1, 2), metadata={"help": "seeds (prompts and samples)"})
    steps: int = dataclasses.field(default=60, metadata={"help": "post-training steps per run"})
    batch: int = dataclasses.field(default=32, metadata={"help": "sequences per step"})
    group: int = dataclasses.field(default=8, metadata={"help": "GRPO samples per prompt"})
    subnetwork: bool = dataclasses.field(default=True, metadata={"help": "retrain each OPD run on its mask and a random one"})

    def __post_init__(self):
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise OptionsError(f"unknown method(s) {sorted(unknown)}; use {', '.join(METHODS)}")
        bad = set(self.precisions) - set(PRECISIONS)
        if bad:
            raise OptionsError(f"unknown precision(s) {sorted(bad)}; use {', '.join(PRECISIONS)}")
        if not self.lrs or any(not (0 < lr < 1) for lr in self.lrs):
            raise OptionsError(f"learning rates must lie in (0, 1), got {self.lrs}")
        if any(wd < 0 for wd in self.weight_decays) or not self.weight_decays:
            raise OptionsError(f"weight decays must be ≥ 0, got {self.weight_decays}")
        if not self.seeds or not self.methods or not self.precisions:
            raise OptionsError("a sweep needs at least one method, precision and seed")
        if self.steps < 1 or self.batch < 1 or self.group < 1:
            raise OptionsError("steps, batch and group must be positive")

    def points(self) -> list["SweepPoint"]:
        """Every grid point, cheapest-first order: by seed, then rate, precision, decay, method."""
        return [SweepPoint(m, lr, p, wd, s, self.steps, self.batch, self.group)
                for s in self.seeds for lr in self.lrs for p in self.precisions for wd in self.weight_decays
                for m in self.methods]


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One run of the sweep; ``mask`` is None for a full run, else ``changed`` or ``random``."""

    method: str
    lr: float
    precision: str
    weight_decay: float
    seed: int
    steps: int
    batch: int
    group: int = 8
    mask: str | None = None

    @property
    def run_id(self) -> str:
        tail = f"-mask-{self.mask}" if self.mask else ""
        return (f"lab-{self.method}-lr{self.lr:g}-{self.precision}-wd{self.weight_decay:g}-s{self.seed}"
                f"-n{self.steps}{tail}")

    @property
    def label(self) -> str:
        """What the dashboard shows as the run's method: the method with its settings."""
        tail = {"changed": ", OPD mask", "random": ", random mask"}.get(self.mask or "", "")
        return f"{METHODS[self.method]} (lr {self.lr:g}, {self.precision}, wd {self.weight_decay:g}{tail})"

    def settings(self) -> dict:
        return {"sweep": True, "lr": self.lr, "precision": self.precision, "weight_decay": self.weight_decay,
                "seed": self.seed, "steps": self.steps, "batch": self.batch, "mask": self.mask}


