"""How a GGUF export refuses its input: one error for input that is wrong, a subclass for a sound model llama.cpp
cannot run, so that callers can tell the two apart."""

from __future__ import annotations

from nirvana.core.errors import InputError


class ExportError(InputError):
    """Bad input to `export`: raised before anything is written, shown as one line by the CLI and the stages."""


class UnsupportedModel(ExportError):
    """A sound model llama.cpp's deci graph cannot run (its architecture or its tokenizer's form): the export
    stage records why and the pipeline goes on, where any other ExportError stops it."""
