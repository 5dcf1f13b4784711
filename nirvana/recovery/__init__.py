"""Recovery of a pruned model by fine-tuning (full, LoRA or distillation), through transformers' Trainer and
peft.

May import: nirvana.core, nirvana.models, nirvana.method.
"""
