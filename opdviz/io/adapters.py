"""PEFT LoRA adapters as the post-trained side: W_post = merge(W_base, adapter), one tensor at a time.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or a Hub ID of one) is read
as the checkpoint PEFT's ``merge_and_unload()`` + ``save_pretrained()`` would write, without writing it:

    W_post = dtype(float32(W_base) + ΔW),   ΔW = scale · (B·A)  in float32 (transposed for fan_in_fan_out
                                                                   layers and embeddings)
    embeddings: W_post = W_base + dtype(ΔW)  (PEFT's Embedding.merge rounds ΔW to the weight's dtype first)
    scale  = lora_alpha / r, or lora_alpha / √r with use_rslora; r and lora_alpha per module from
             rank_pattern / alpha_pattern (matched as PEFT matches them)

which is PEFT's own arithmetic in ``merge_and_unload()`` (safe_merge=False, the default) for float32 adapter
weights (PEFT upcasts bf16/fp16 adapter weights to float32 when it loads them): every tensor equals the
merged checkpoint's bit for bit when PEFT merges on CPU (tests/io/test_adapters.py checks this against PEFT,
float32 and bfloat16 bases). Tolerance otherwise: PEFT's ``safe_merge=True`` rounds ΔW to the weight's
dtype before adding it, and a GPU matmul may round B·A differently; either moves single elements of W_post
by at most one unit in the last place of the weight's dtype (1 bf16 ulp = 2⁻⁸ relative). ``modules_to_save`` tensors are read whole from the adapter. Every other base tensor is
unchanged (ΔW = 0), as in the merged checkpoint.

Refused with a message, never approximated: DoRA (``use_dora``), ``lora_bias``, initialisations that
rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ), ``layer_replication``, ``target_parameters``,
activated LoRA, trainable tokens, convolution LoRA, and adapter types other than LoRA.

The low rank is used where it is cheaper: ``lowrank_sigma`` gives the exact singular values of
scale·B·A from the r×r problem (QR of B and Aᵀ), stored per tensor as ``adapter_spectrum``. The metric
families stored here are declared in ``opdviz.metrics.registry.ADAPTER_FAMILIES``.
"""

from __future__ import annotations

import hashlib
import json
import os
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from opdviz.errors import CheckpointError
from opdviz.io.headers import TensorInfo, read_header, stored_order
from opdviz.io.reader import Checkpoint, canonical_name
from opdviz.io.safefiles import Limits, checked_file, read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_MERGE_HINT = ("merge it with PEFT (model = PeftModel.from_pretrained(base, path).merge_and_unload(); "
               "model.save_pretrained(out)) and analyse the merged folder")
_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")

def is_adapter(path) -> bool:
    """True for a folder holding ``adapter_config.json``."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def lowrank_sigma(b: torch.Tensor, a: torch.Tensor, scale: float) -> np.ndarray:
    """Singular values of scale·B·A (B: m×r, A: r×n), descending, in float64 — O((m+n)r²), never m×n.

    With B = Q_B R_B and Aᵀ = Q_A R_A, B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so σ(B·A) = σ(R_B R_Aᵀ), an r×r problem."""
    _, rb = torch.linalg.qr(b.double())
    _, ra = torch.linalg.qr(a.double().T)
    return (abs(scale) * torch.linalg.svdvals(rb @ ra.T)).cpu().numpy()


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA-adapted weight: the base tensor it updates and its factors in the adapter file."""

    base_name: str
    a: TensorInfo             # [r, in] (embeddings: [r, num_embeddings])
    b: TensorInfo             # [out, r] (embeddings: [dim, r])
    r: int
    scale: float
    transpose: bool           # fan_in_fan_out (GPT-2 Conv1D) and embeddings: ΔW = (B·A)ᵀ
    embedding: bool = False   # PEFT rounds an embedding's ΔW to the weight's dtype before adding it


class LoraAdapter:
    """A validated PEFT LoRA adapter folder (config and header checked; no tensor read)."""

    def __init__(self, folder: Path, config: dict, weights: Checkpoint):
        self.folder = folder
        self.config = config
        self.weights = weights       # the adapter's safetensors file, read with opdviz's reader
        self.modules: dict[str, dict[str, TensorInfo]] = {}   # module → {"A", "B"}
        self.full: dict[str, TensorInfo] = {}                 # modules_to_save tensors, by module-relative name
        for key, info in weights.infos.items():
            if not key.startswith(PREFIX):
                raise CheckpointError(f"{weights.path}: tensor {key!r} does not start with {PREFIX!r}; not a PEFT "
                                      "LoRA adapter file saved by save_pretrained")
            rest = key[len(PREFIX):]
            m = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$", rest) or \
                re.match(r"^(.*)\.(lora_embedding_A|lora_embedding_B)$", rest)
            if m:
                side = "A" if m.group(2).endswith("A") else "B"
                slot = self.modules.setdefault(m.group(1), {})
                slot[side] = info
                slot["embedding"] = m.group(2).startswith("lora_embedding")
            elif re.search(r"\.(lora_[A-Za-z_]+|trainable_tokens_delta)(\.|$)", rest):
                what = re.search(r"(lora_[A-Za-z_]+|trainable_tokens_delta)", rest).group(1)
                raise CheckpointError(f"{weights.path}: tensor {key!r} ({what}) belongs to a LoRA variant opdviz "
                                      f"cannot reproduce exactly; {_MERGE_HINT}")
            else:
                # modules_to_save copies; with save_embedding_layers PEFT also stores a targeted embedding's
                # own weight as "<module>.base_layer.weight" (it replaces the base's on load)
                self.full[re.sub(r"\.base_layer\.(weight|bias)$", r".\1", rest)] = info
        for module, slot in self.modules.items():
            if "A" not in slot or "B" not in slot:
                raise CheckpointError(f"{weights.path}: module {module!r} has only lora_{'A' if 'A' in slot else 'B'}; "
                                      "the adapter file is incomplete; re-save it")
            if len(slot["A"].shape) != 2 or len(slot["B"].shape) != 2:
                raise CheckpointError(f"{weights.path}: module {module!r} has {len(slot['A'].shape)}-D LoRA factors "
                                      f"(a convolution LoRA); opdviz reproduces Linear/Embedding LoRA only; {_MERGE_HINT}")
        if not self.modules and not self.full:
            raise CheckpointError(f"{weights.path}: holds no LoRA factors and no modules_to_save tensors")

    @classmethod
    def open(cls, folder) -> "LoraAdapter":
        """Read and check ``adapter_config.json`` and the header of ``adapter_model.safetensors``.

        Raises CheckpointError for unreadable files and for variants opdviz cannot reproduce exactly."""
        folder = Path(folder)
        limits = Limits.from_env()
        config = _read_config(folder, limits)
        _refuse_variants(folder, config)
        wpath = folder / WEIGHTS_NAME
        if not os.path.lexists(wpath):
            bins = [p.name for p in folder.glob("adapter_model.bin")]
            raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}" + (f" (found {bins[0]}, a pickled file opdviz does "
                                  "not read; re-save the adapter with safe_serialization=True)" if bins else
                                  "; the adapter folder is incomplete"))
        wpath = checked_file(folder, WEIGHTS_NAME)     # a regular file of the folder (or of its HF cache repo)
        _check_inside(wpath, folder)
        weights = Checkpoint(folder, (wpath,), stored_order(read_header(wpath, limits, limits.tensors)), None,
                             "safetensors")
        return cls(folder, config, weights)

    # PEFT's own rule (peft.utils.other.get_pattern_key): the first pattern key k with
    # re.match(rf"(.*\.)?({k})$", module) wins; otherwise the global r / lora_alpha.
    def _pattern(self, table: str, module: str, default):
        pats = self.config.get(table) or {}
        if not isinstance(pats, dict):
            raise CheckpointError(f"{self.folder / CONFIG_NAME}: {table} is not an object")
        for key, value in pats.items():
            try:
                if re.match(rf"(.*\.)?({key})$", module):
                    return value
            except re.error as exc:
                raise CheckpointError(f"{self.folder / CONFIG_NAME}: {table} key {key!r} is not a valid pattern "
                                      f"({exc})") from None
        return default

    def target(self, module: str, base_name: str) -> LoraTarget:
        slot = self.modules[module]
        r = self._pattern("rank_pattern", module, self.config.get("r", 8))
        alpha = self._pattern("alpha_pattern", module, self.config.get("lora_alpha", 8))
        a, b = slot["A"], slot["B"]
        if not (isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)) and math.isfinite(alpha)):
            raise CheckpointError(f"{self.folder / CONFIG_NAME}: module {module!r} gets r={r!r}, "
                                  f"lora_alpha={alpha!r}; expected a positive integer and a number")
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(f"{self.weights.path}: module {module!r} has factors A {a.shape}, B {b.shape} "
                                  f"but the config gives r = {r}; the adapter file and adapter_config.json disagree")
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        transpose = bool(slot["embedding"] or self.config.get("fan_in_fan_out"))
        return LoraTarget(base_name, a, b, r, float(scale), transpose, bool(slot["embedding"]))

    def summary(self) -> dict:
        c = self.config
        return {"peft_type": c.get("peft_type"), "r": c.get("r"), "lora_alpha": c.get("lora_alpha"),
                "use_rslora": bool(c.get("use_rslora")), "fan_in_fan_out": bool(c.get("fan_in_fan_out")),
                "rank_pattern": c.get("rank_pattern") or {}, "alpha_pattern": c.get("alpha_pattern") or {},
                "n_lora_modules": len(self.modules), "modules_to_save": list(c.get("modules_to_save") or []),
                "full_tensors": sorted(self.full),
                "base_model_name_or_path": c.get("base_model_name_or_path"), "path": str(self.folder)}


class AdapterCheckpoint:
    """The merged checkpoint of ``base`` and a LoRA ``adapter``, read lazily with ``Checkpoint``'s interface.

    ``infos`` has every base tensor under its base name: LoRA targets and unchanged tensors point at the
    base's file (``load`` merges on the fly), modules_to_save tensors at the adapter's file."""

    format = "safetensors"

    def __init__(self, adapter: LoraAdapter, base: Checkpoint):
        self.adapter = adapter
        self.base = base
        self.path = adapter.folder
        self.config = base.config
        self.targets: dict[str, LoraTarget] = {}
        self.full: dict[str, str] = {}                  # base name → adapter stored name
        infos = dict(base.infos)
        for rest, info in adapter.full.items():
            name = _base_name(base, rest, adapter)
            self.full[name] = info.name
            infos[name] = replace(info, name=name)
        for module in adapter.modules:
            name = _base_name(base, f"{module}.weight", adapter)
            t = adapter.target(module, name)
            out_in = (t.b.shape[0], t.a.shape[1])
            shape = out_in[::-1] if t.transpose else out_in
            if tuple(infos[name].shape) != shape:
                raise CheckpointError(f"{adapter.folder}: LoRA on {module!r} gives ΔW of shape {shape} but base tensor "
                                      f"{name!r} is {infos[name].shape}; is {base.path} this adapter's base?")
            self.targets[name] = t
        self.infos = infos
        self.files = tuple(base.files) + adapter.weights.files
        self.total_bytes = sum(i.nbytes for i in infos.values())
        self.run_extra = {"adapter": {**adapter.summary(),
                                      "ranks": {n: t.r for n, t in self.targets.items()}}}

    def fingerprint(self) -> str:
        """The base's fingerprint combined with the adapter's (config text and weights file)."""
        h = hashlib.sha256(b"opdviz-adapter-v1\n")
        h.update(self.base.fingerprint().encode())
        h.update(json.dumps(self.adapter.config, sort_keys=True).encode())
        h.update(self.adapter.weights.fingerprint().encode())
        return h.hexdigest()

    def delta(self, name: str, device="cpu") -> torch.Tensor:
        """ΔW = scale·(B·A) of a LoRA target in float32, in the base tensor's layout."""
        t = self.targets[name]
        a = self.adapter.weights.load(t.a.name, device).float()
        b = self.adapter.weights.load(t.b.name, device).float()
        d = b @ a
        if t.transpose:
            d = d.T
        return d * t.scale          # the order of PEFT's get_delta_weight: transpose(B @ A) * scaling

    def load(self, name: str, device="cpu") -> torch.Tensor:
        if name in self.full:
            w = self.adapter.weights.load(self.full[name], device)
        else:
            w = self.base.load(name, device)
        if name not in self.targets:
            return w
        d = self.delta(name, w.device)
        if self.targets[name].embedding:    # PEFT's Embedding.merge: W += ΔW.to(W.dtype)
            return w + d.to(w.dtype)
        d += w                       # PEFT's Linear.merge: W += ΔW (float32): one rounding to W's dtype
        return d.to(w.dtype)

    def extra_rows(self, item, rows: tuple, device="cpu") -> None:
        """Append the adapter metrics of one pair (rank, scale, exact spectrum of the update) to its rows."""
        t = self.targets.get(item.post.name)
        if t is None:
            return
        _, metrics, arrays, _ = rows
        a = self.adapter.weights.load(t.a.name, device)
        b = self.adapter.weights.load(t.b.name, device)
        sigma = lowrank_sigma(b, a, t.scale)
        metrics.append({"tensor": item.name, "metric": "adapter_rank", "value": float(t.r)})
        metrics.append({"tensor": item.name, "metric": "adapter_scale", "value": float(t.scale)})
        arrays.append({"tensor": item.name, "name": "adapter_spectrum", "shape": [len(sigma)],
                       "values": sigma.astype("float64").tolist()})

    def close(self) -> None:
        self.adapter.weights.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"AdapterCheckpoint({str(self.path)!r} on {str(self.base.path)!r}, {len(self.targets)} LoRA "
                f"tensors, {len(self.full)} saved modules)")


def open_post(path, base: Checkpoint, *, allow_pickle: bool = False):
    """The post-trained side: an ``AdapterCheckpoint`` on ``base`` for a PEFT adapter folder (or Hub ID of
    one), else ``Checkpoint.open(path)``."""
    p = Path(path).expanduser()
    if not p.exists():
        from opdviz.io.hub import looks_like_repo_id, resolve_checkpoint

        if looks_like_repo_id(str(p)):
            p = resolve_checkpoint(str(p))
    if is_adapter(p):
        return AdapterCheckpoint(LoraAdapter.open(p), base)
    return Checkpoint.open(p, allow_pickle=allow_pickle)


def check_post(path, *, allow_pickle: bool = False) -> None:
    """Validate a post-trained checkpoint or adapter without its base (batch files check everything first)."""
    p = Path(path).expanduser()
    if is_adapter(p):
        LoraAdapter.open(p).weights.close()
    else:
        Checkpoint.open(p, allow_pickle=allow_pickle).close()


# ------------------------------------------------------------------------------------------------ helpers
def _read_config(folder: Path, limits: Limits) -> dict:
    """``adapter_config.json``, read like every checkpoint side file (``opdviz.io.safefiles``: no symlink out of
    the folder, size and nesting caps)."""
    path = folder / CONFIG_NAME
    try:
        config = read_json(folder, CONFIG_NAME, limits)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: cannot read the adapter config ({exc}); re-save the adapter") from None
    if config is None:
        raise CheckpointError(f"{path}: missing; a PEFT adapter folder holds adapter_config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object; re-save the adapter")
    return config


def _refuse_variants(folder: Path, c: dict) -> None:
    where = folder / CONFIG_NAME
    kind = c.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{where}: peft_type {kind!r}; opdviz reads LoRA adapters (peft_type 'LORA') only; "
                              f"{_MERGE_HINT}")
    init = c.get("init_lora_weights")
    checks = (
        ("use_dora", "DoRA (use_dora) rescales every column by a learned magnitude over the merged weight's norm"),
        ("lora_bias", "lora_bias adds a trained bias"),
        ("layer_replication", "layer_replication duplicates base layers"),
        ("target_parameters", "target_parameters adapts raw parameters (e.g. fused MoE experts)"),
        ("use_qalora", "QALoRA merges through quantized weights"),
        ("alora_invocation_tokens", "activated LoRA cannot be merged"),
        ("trainable_token_indices", "trainable tokens update single embedding rows"),
        ("arrow_config", "Arrow routing mixes several adapters"),
    )
    for key, why in checks:
        if c.get(key):
            raise CheckpointError(f"{where}: {key} is set: {why}, which opdviz does not reproduce exactly; "
                                  f"{_MERGE_HINT}")
    if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
        raise CheckpointError(f"{where}: init_lora_weights={init!r} rewrites the base weights at initialisation, so "
                              "ΔW is not B·A against the original base; convert the adapter with PEFT "
                              "(path_initial_model_for_weight_conversion) or " + _MERGE_HINT)


def _check_inside(path: Path, folder: Path) -> None:
    """Refuse a file whose symlinks lead outside its folder (a Hub cache snapshot: outside its repo folder)."""
    from opdviz.io.hub import allowed_root

    root = allowed_root(folder).resolve()
    real = path.resolve()
    if root != real.parent and root not in real.parents:
        raise CheckpointError(f"{path}: resolves to {real}, outside {root}; refusing to follow it (copy the file "
                              "into the adapter folder if it is intended)")


def _base_name(base: Checkpoint, name: str, adapter: LoraAdapter) -> str:
    """The base tensor an adapter's module-relative name refers to: exact, then through the reader's
    aliases, then a unique suffix match (checkpoints saved without the model-class prefix)."""
    if name in base.infos:
        return name
    canon = canonical_name(name)
    hits = [n for n in base.infos if canonical_name(n) == canon]
    if len(hits) == 1:
        return hits[0]
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        tail = ".".join(parts[i:])
        hits = [n for n in base.infos if n == tail or n.endswith("." + tail)]
        if len(hits) == 1:
            return hits[0]
    raise CheckpointError(f"{adapter.folder}: the adapter updates {name!r}, which {base.path} does not hold; is this "
                          f"the adapter's base (adapter_config.json names "
                          f"{adapter.config.get('base_model_name_or_path')!r})?")
