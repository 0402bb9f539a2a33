"""Train a tiny Llama with ``transformers.Trainer`` and watch its update as a live opdviz trajectory.

    python examples/train_with_callback.py --db data/live.duckdb --steps 40 --every 10
    opdviz --help   # then: streamlit run app.py -- --db data/live.duckdb  → Trajectory page

The model (2 layers, hidden 64) learns to continue random token patterns on the CPU in seconds; the
callback snapshots the weights every ``--every`` steps and a background process stores each step's
update as the trajectory ``--name`` (runs ``NAME@STEP``), with the trainer's loss and learning rate.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from opdviz.integrations import OpdvizCallback


class Patterns(torch.utils.data.Dataset):
    """Sequences that repeat a short random motif: learnable in a few dozen steps."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        motifs = torch.randint(0, vocab, (n, 4), generator=g)
        self.ids = motifs.repeat(1, length // 4)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="data/live.duckdb", help="opdviz store (default: data/live.duckdb)")
    p.add_argument("--name", default="tiny-sft-live", help="trajectory name (default: tiny-sft-live)")
    p.add_argument("--method", default="SFT", help="method label (default: SFT)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    p.add_argument("--every", type=int, default=10, help="snapshot every N steps (default: 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
                                  learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=2,
                                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                  disable_tqdm=True, dataloader_num_workers=0, seed=0)
        callback = OpdvizCallback(db=args.db, name=args.name, method=args.method, every_n_steps=args.every)
        trainer = Trainer(model=model, args=targs, train_dataset=Patterns(256, 32, cfg.vocab_size),
                          callbacks=[callback])
        trainer.train()
    print(f"trajectory {args.name}: analysed into {args.db}")


if __name__ == "__main__":
    main()
