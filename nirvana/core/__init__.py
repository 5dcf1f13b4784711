"""The bottom layer, what every stage runs: typed params (`params`), errors, file I/O (`io`), the corpora and
token windows (`data`), the pinned CPU kernels and threads (`environment`) and the stage harness (`stage`).
It takes plain values and files, and knows nothing of models or the method.

May import: nothing else in nirvana.
"""
