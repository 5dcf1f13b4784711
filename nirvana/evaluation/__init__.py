"""Measuring models: perplexity on held-out text (`perplexity`), zero-shot tasks through lm-eval
(`zeroshot`), parameters, FLOPs and speed in transformers (`efficiency`), and the statistics of paired
timings (`timings`).

May import: nirvana.core, nirvana.models, nirvana.method.
"""
