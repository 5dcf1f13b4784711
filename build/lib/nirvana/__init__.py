"""NIRVANA structured pruning as a reproducible pipeline.

Importing the package registers pruned-model loading with transformers, so that
`AutoModelForCausalLM.from_pretrained(pruned_dir)` returns the pruned model.
"""

from nirvana.surgery import register

register()

__version__ = "0.1.0"
