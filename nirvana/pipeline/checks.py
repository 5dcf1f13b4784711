"""Checks of a stage's inputs beyond params.yaml: model folders, tokenizers, context lengths and token
files. Stages run them first, so a bad input stops the stage in one line naming the culprit, before
any work and before any output is written (`nirvana.core.stage.run_stage` prints InputError cleanly)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from nirvana.core.data import bos_id, token_stream
from nirvana.core.errors import InputError
from nirvana.core.params import CalibrationParams, FinetuneParams, Params
from nirvana.models.loading import check_name, skeleton, stored_shapes


def check_model_folder(path: str | Path) -> PretrainedConfig:
    """The folder's config.json and weights agree tensor by tensor, so that loading it can neither
    fail with a size mismatch half-way through a stage nor silently start from random weights."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder / 'config.json'}: not found; {folder} is not a model folder")
    shapes = stored_shapes(folder)
    try:
        model = skeleton(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{folder / 'config.json'}: describes no model that can be built ({err})") from err
    aliases: dict[int, list[str]] = {}  # tied parameters (embeddings and LM head) are stored once
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
        stored = shapes.get(name)
        if stored is not None and stored[0] != tuple(param.shape):
            raise InputError(
                f"{folder}: tensor {name} in {stored[1]} has shape {list(stored[0])}, but config.json "
                f"(nirvana_units, if pruned) implies {list(param.shape)}; the widths and weights disagree"
            )
    for names in aliases.values():
        if not any(name in shapes for name in names):
            raise InputError(f"{folder}: config.json implies a tensor {names[0]} that no weight file holds")
    return model.config


def check_tokenizer(path: str | Path, config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """The folder's tokenizer only produces ids the model's embedding has rows for."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # a missing or unreadable tokenizer raises many kinds of error
        raise InputError(f"{path}: no readable tokenizer ({type(err).__name__}: {err})") from err
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise InputError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary (config.vocab_size) "
            f"has {vocab}; ids >= {vocab} would index past the embedding (tokenizer and model do not match)"
        )
    return tokenizer


def check_context(config: PretrainedConfig, path: str | Path, lengths: Iterable[tuple[str, int]]) -> None:
    """No sequence is longer than the model's context (max_position_embeddings, where it has one)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return
    for key, length in lengths:
        if length > limit:
            raise InputError(
                f"params: {key} = {length} exceeds the model's context of {limit} tokens "
                f"(max_position_embeddings in {Path(path) / 'config.json'})"
            )


def check_model(path: str | Path, lengths: Iterable[tuple[str, int]] = (), tokenizer: bool = True) -> PretrainedConfig:
    """Everything a stage reading the model folder `path` relies on: weights, tokenizer, the
    params' sequence `lengths` (key, value) within its context."""
    config = check_model_folder(path)
    if tokenizer:
        check_tokenizer(path, config)
    check_context(config, path, lengths)
    return config


def check_teacher(teacher: str | Path, student: str | Path) -> None:
    """A local teacher folder (finetune.teacher, or the dense model) is a sound model whose logits range over the
    student's tokens: distillation compares the two next-token distributions token by token."""
    if not Path(teacher).is_dir():
        return  # a model id: from_pretrained fetches it, or says why not
    ours, theirs = check_model_folder(student), check_model(teacher)
    same = ours.vocab_size == theirs.vocab_size
    if same:
        same = (
            AutoTokenizer.from_pretrained(str(teacher)).get_vocab()
            == AutoTokenizer.from_pretrained(str(student)).get_vocab()
        )
    if not same:
        raise InputError(
            f"finetune.teacher: {teacher} has another vocabulary than the model it teaches ({student}: "
            f"{ours.vocab_size} tokens, teacher {theirs.vocab_size}); distillation needs the same tokenizer"
        )


def read_table(path: str | Path) -> pd.DataFrame:
    """A parquet table, or an InputError naming the file."""
    try:
        return pd.read_parquet(path)
    except FileNotFoundError as err:
        raise InputError(f"{path}: not found") from err
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"{path}: not a readable parquet file ({err})") from err


def check_input_ids(path: str | Path, column: pd.Series, config: PretrainedConfig) -> None:
    """Token windows a model will read: some, of one length within the context, every id a row of
    the embedding (ids made by another tokenizer index past it)."""
    if len(column) == 0:
        raise InputError(f"{path}: no rows (an empty file)")
    lengths = sorted(set(column.map(lambda row: 0 if row is None else len(row))))
    if len(lengths) != 1 or lengths[0] == 0:
        raise InputError(f"{path}: every input_ids row must have the same non-zero length, got {lengths[:5]}")
    ids = np.stack(column.to_numpy())
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{path}: input_ids must be integers, got {ids.dtype}")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None:
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise InputError(
                f"{path}: input_ids row {row} holds token id {ids[row, col]}, outside the model's vocabulary "
                f"of {vocab} (ids 0..{vocab - 1}); were the windows made with another tokenizer?"
            )
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and lengths[0] > limit:
        raise InputError(f"{path}: windows of {lengths[0]} tokens exceed the model's context of {limit} tokens")


def check_windows(path: str | Path, config: PretrainedConfig) -> None:
    """A token-window table (a selected calibration set) that the model can read as it is."""
    table = read_table(path)
    if "input_ids" not in table:
        raise InputError(f"{path}: needs a column input_ids, has {list(table.columns)}")
    check_input_ids(path, table["input_ids"], config)


def check_user_calibration(
    c: CalibrationParams,
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    config: PretrainedConfig,
    model_dir: str | Path,
) -> None:
    """The user's calibration file (calibration.path) has valid windows, calibration.num_samples of
    them for every candidate to draw (one candidate takes the file verbatim: any number will do)."""
    table = read_table(path)
    if len(table) == 0:
        raise InputError(f"{path}: no rows (an empty calibration file)")
    if "input_ids" in table:
        check_input_ids(path, table["input_ids"], config)
        count, unit = len(table), ""
    elif "text" in table:
        check_context(config, model_dir, [("calibration.seq_len", c.seq_len)])
        tokens = len(token_stream([str(t) for t in table["text"]], tokenizer))
        count = tokens // (c.seq_len - (bos_id(tokenizer) is not None))
        unit = f" of calibration.seq_len = {c.seq_len} tokens (from {tokens} tokens of text)"
    else:
        raise InputError(f"{path}: needs a column input_ids or text, has {list(table.columns)}")
    if count == 0 or (c.candidates > 1 and count < c.num_samples):
        raise InputError(
            f"{path}: {count} {'window' if count == 1 else 'windows'}{unit}, fewer than "
            f"calibration.num_samples = {c.num_samples} that each of the calibration.candidates = "
            f"{c.candidates} candidate sets draws"
        )


def check_calibration(c: CalibrationParams, model_dir: str | Path, user_file: str | None) -> None:
    """select_calibration's inputs: the model folder, the window lengths, the user's file if any."""
    config = check_model_folder(model_dir)
    tokenizer = check_tokenizer(model_dir, config)
    lengths = [("calibration.kl_seq_len", c.kl_seq_len)]
    check_context(config, model_dir, lengths if user_file else [*lengths, ("calibration.seq_len", c.seq_len)])
    if user_file is not None:
        check_user_calibration(c, user_file, tokenizer, config, model_dir)


def check_finetune(f: FinetuneParams, model_dir: str | Path) -> None:
    """finetune's model folder, and finetune.seq_len within its context (unused when steps is 0)."""
    check_model(model_dir, [("finetune.seq_len", f.seq_len)] if f.steps else [])


def check_model_name(name: str) -> None:
    """model.name_or_path, which check_params checks on every change of params.yaml: a Hub model already in the
    local cache passes without asking the Hub (so offline too); any other name is asked once (`check_name`)."""
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:  # a local path or an embedded name, not a Hub id
        cached = None
    if not isinstance(cached, str):
        check_name(name)


def sequence_lengths(p: Params) -> list[tuple[str, int]]:
    """Every sequence length a stage runs the model on, keyed as that stage names it (calibration.seq_len is
    unused with a user's calibration file: `check_user_calibration` checks it for a text one)."""
    c, f, e, x = p.calibration, p.finetune, p.efficiency, p.export
    lengths = [("calibration.kl_seq_len", c.kl_seq_len)] + ([] if c.user_file else [("calibration.seq_len", c.seq_len)])
    lengths += [("finetune.seq_len", f.seq_len)] if f.steps else []
    lengths += [(f"evaluate.windows[{i}]", w) for i, w in enumerate(p.evaluate.windows)]
    lengths.append(("efficiency.prompt_len + efficiency.new_tokens", e.prompt_len + e.new_tokens))
    lengths.append(("export.prompt_len + export.new_tokens", x.prompt_len + x.new_tokens))
    return lengths
