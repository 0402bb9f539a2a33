"""The built-in demo lab: a tiny Llama taught addition, post-trained by OPD, SFT and RL.

Modules: ``model`` (HF-Llama-compatible model, save/load), ``task`` (addition task, char
tokenizer), ``train`` (training loops), ``subnetwork`` (masked training), ``pipeline``
(``run_lab``), ``command`` (the ``opdviz lab`` subcommand). Importing this package does not import
torch; ``opdviz.lab.run_lab`` is loaded on first use.
"""


def __getattr__(name):
    if name in ("run_lab", "LabSettings"):
        from opdviz.lab import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'opdviz.lab' has no attribute {name!r}")
