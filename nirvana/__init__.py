"""NIRVANA structured pruning as a reproducible pipeline.

`nirvana.register()` teaches transformers to build pruned models, so that
`AutoModelForCausalLM.from_pretrained(pruned_dir)` returns the pruned model; the pipeline's loaders
(`nirvana.models.loading`) call it themselves. Importing the package does not: a stage that loads no model
would pay for torch and transformers' modeling code before doing anything.
"""

__version__ = "0.1.0"


def register() -> None:
    """Make transformers build models from pruned folders at their recorded widths (idempotent). Needed before
    `from_pretrained` or `from_config` of a pruned config outside `nirvana.models.loading`'s loaders."""
    from nirvana.models.widths import register as patch_post_init  # imports transformers' modeling code (seconds)

    patch_post_init()
