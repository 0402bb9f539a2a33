"""The lab's task: fixed-width addition with a verifiable answer, and its character tokenizer.

A problem is ``"057+312="`` → ``"0369"``: two zero-padded ``digits``-digit operands, the sum
zero-padded to ``digits + 1`` digits. Fixed widths mean every prompt and every answer has the same
length, so batches need no padding. Sequences are ``<bos> prompt answer <eos>``.

The tokenizer is one character per token; ``CharTokenizer.to_json()`` is what the checkpoints ship
as ``lab_tokenizer.json`` (not named ``tokenizer.json``, which HF would try to parse as a
``tokenizers`` file).
"""

from __future__ import annotations

import dataclasses

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARS = "0123456789+="


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """ids 0..2 are ``<pad>``, ``<bos>``, ``<eos>``; then one id per character of ``CHARS``."""

    vocab: tuple[str, ...] = SPECIALS + tuple(CHARS)

    @property
    def pad_id(self) -> int:
        return self.vocab.index("<pad>")

    @property
    def bos_id(self) -> int:
        return self.vocab.index("<bos>")

    @property
    def eos_id(self) -> int:
        return self.vocab.index("<eos>")

    def encode(self, text: str) -> list[int]:
        try:
            return [self.vocab.index(c) for c in text]
        except ValueError:
            raise ValueError(f"{text!r} has a character outside the lab vocabulary {CHARS!r}") from None

    def decode(self, ids) -> str:
        """Characters up to the first ``<eos>``; other special tokens are dropped."""
        out = []
        for i in ids:
            tok = self.vocab[int(i)]
            if tok == "<eos>":
                break
            if tok not in SPECIALS:
                out.append(tok)
        return "".join(out)

    def to_json(self) -> dict:
        return {
            "type": "opdviz-lab-char", "vocab": {t: i for i, t in enumerate(self.vocab)},
            "special_tokens": {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"},
            "doc": "one token per character; a sequence is <bos> 'AAA+BBB=' 'SSSS' <eos>, operands and "
                   "sum zero-padded to fixed widths",
        }


@dataclasses.dataclass(frozen=True)
class AdditionTask:
    """Problems of ``digits``-digit addition; the held-out test set is drawn from its own seed."""

    digits: int = 3
    test_size: int = 500
    tokenizer: CharTokenizer = CharTokenizer()

    @property
    def prompt_len(self) -> int:  # <bos> + a + '+' + b + '='
        return 2 * self.digits + 3

    @property
    def answer_len(self) -> int:  # sum digits + <eos>
        return self.digits + 2

    def text(self, a: int, b: int) -> tuple[str, str]:
        d = self.digits
        return f"{a:0{d}d}+{b:0{d}d}=", f"{a + b:0{d + 1}d}"

    def test_pairs(self, seed: int) -> torch.Tensor:
        """The held-out problems [test_size, 2], fixed by ``seed``; training never draws them."""
        return self._held_out(seed)[: self.test_size]

    def val_pairs(self, seed: int) -> torch.Tensor:
        """Validation problems [test_size // 2, 2] (for early stopping), disjoint from the test set;
        training never draws them either."""
        return self._held_out(seed)[self.test_size: self.test_size + self.test_size // 2]

    def held_out(self, seed: int) -> torch.Tensor:
        """Test and validation problems together (what training excludes)."""
        return self._held_out(seed)[: self.test_size + self.test_size // 2]

    def _held_out(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(10_000 + seed)
        n = 10 ** self.digits
        codes = torch.randperm(n * n, generator=g)[: self.test_size + self.test_size // 2]
        return torch.stack((codes // n, codes % n), dim=1)

    def sample_pairs(self, n: int, g: torch.Generator, exclude: torch.Tensor) -> torch.Tensor:
        """``n`` random training problems [n, 2], none of them in ``exclude`` (the test pairs)."""
        m = 10 ** self.digits
        banned = torch.zeros(m * m, dtype=torch.bool)
        banned[exclude[:, 0] * m + exclude[:, 1]] = True
        out = torch.empty(0, dtype=torch.long)
        while len(out) < n:
            codes = torch.randint(0, m * m, (2 * n,), generator=g)
            out = torch.cat((out, codes[~banned[codes]]))
        out = out[:n]
        return torch.stack((out // m, out % m), dim=1)

    def prompts(self, pairs: torch.Tensor) -> torch.Tensor:
        """Token ids [n, prompt_len] of ``<bos> a+b=``."""
        tok = self.tokenizer
        return torch.tensor([[tok.bos_id] + tok.encode(self.text(int(a), int(b))[0]) for a, b in pairs])

    def answers(self, pairs: torch.Tensor) -> torch.Tensor:
        """Token ids [n, answer_len] of the true answer followed by ``<eos>``."""
        tok = self.tokenizer
        return torch.tensor([tok.encode(self.text(int(a), int(b))[1]) + [tok.eos_id] for a, b in pairs])

    def correct(self, pairs: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """Exact match per row (bool [n]): the completion up to its first ``<eos>`` equals the sum."""
        tok = self.tokenizer
        want = [self.text(int(a), int(b))[1] for a, b in pairs]
        got = [tok.decode(row) for row in completions]
        ended = (completions == tok.eos_id).any(dim=1)
        return torch.tensor([w == g for w, g in zip(want, got)]) & ended
