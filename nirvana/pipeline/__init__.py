"""The plumbing around the stages: checks of a stage's inputs before any work (`checks`), the lock and audit
checks, sweeps as DVC experiments, the README report and the `nirvana` command line.

May import: anything in nirvana.
"""
