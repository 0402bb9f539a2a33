"""Integrations with training libraries: ``OpdvizCallback`` for ``transformers.Trainer`` (and TRL's trainers).

    from opdviz.integrations import OpdvizCallback
    trainer = Trainer(..., callbacks=[OpdvizCallback(db="runs.duckdb", name="opd-run", method="OPD",
                                                     every_n_steps=100)])

Needs ``transformers`` (``pip install "opdviz[train]"``); importing this package without it raises an
``MissingExtraError`` (an ImportError) that names the extra.
"""

from __future__ import annotations

from opdviz.errors import MissingExtraError

TRAIN_EXTRA_HINT = 'pip install "opdviz[train]" (transformers, peft, huggingface_hub)'

try:
    import transformers  # noqa: F401
except ImportError as exc:   # the core install stays light: say which extra brings it
    raise MissingExtraError(f"opdviz.integrations needs transformers, which is not installed here ({exc}); install it "
                       f"with {TRAIN_EXTRA_HINT}.") from None

from opdviz.integrations.callback import OpdvizCallback  # noqa: E402

__all__ = ["OpdvizCallback"]
