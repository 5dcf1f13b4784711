"""Tiny random Llama models (multi-head and grouped-query) and helpers shared by the tests."""

from __future__ import annotations

import importlib.util
import os
import types
from collections.abc import Callable
from pathlib import Path

from nirvana.core.environment import PORTABLE, is_x86

# The tests compute with the CPU code paths every stage pins (cpu.kernels: portable), so that the tiny models
# they build and the numbers they compare are the same bits on any x86-64 machine.
if is_x86():
    os.environ.update(PORTABLE)

import pandas as pd
import pytest
import torch
from filelock import FileLock
from pipeline_fixture import Experiment, reproduce_tiny, run_experiment
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

import nirvana
from nirvana.core.stage import cpus
from nirvana.deploy.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT
from nirvana.models import GRANULARITY_KEY

nirvana.register()  # the tests load pruned folders with transformers' own from_pretrained, as a user would

# `make test` runs two pytest-xdist workers: each computes in-process on its share of the CPUs, not on all of
# them, which would slow both. The stages they start pin their own threads (cpu.threads), so two of them can
# share a core: their OpenMP threads then wait in the kernel sooner instead of spinning on a core the other
# needs (an allocate_sparsity on SmolLM2 next to stage start-ups: 33 s spinning as by default, 24 s so, 19 s
# alone; the same bits, since how a thread waits changes no sum).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# The files that take longest, first (`pytest --durations=0`: the SmolLM2 pipeline, then the tiny ones); with
# `--dist loadfile --no-loadscope-reorder` the workers take whole files in this order, so no long file is
# left to run alone at the end.
LONGEST_FIRST = (
    "test_pipeline.py",
    "test_bad_inputs.py",
    "test_experiments.py",  # makes the shared experiment; test_remote, which needs it too, comes late
    "test_pipeline_t5.py",
    "test_determinism.py",
    "test_remote.py",
    "test_interruption.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: the rest keep their order


SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2),
    "gqa_bias": dict(num_attention_heads=6, num_key_value_heads=3, attention_bias=True, mlp_bias=True),
}


def tiny_llama(kind: str = "gqa", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A 2-layer random Llama with distinct weights everywhere (biases included)."""
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=64,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        head_dim=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **SHAPES[kind],
    )
    config = LlamaConfig(**{**shape, **overrides})
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(-0.5, 0.5)
    return model


DECODERS: dict[str, dict] = {
    "llama": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=4),
    "mistral": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=4, sliding_window=5),
    "qwen2": dict(num_attention_heads=6, num_key_value_heads=3, head_dim=4),
    "gemma3_text": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,  # head_dim x heads (32) differs from hidden_size (24), as in Gemma 3
        query_pre_attn_scalar=8,
        sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
}
"""Tiny shapes of every decoder-only architecture the adapters cover (`tiny_decoder`)."""


def tiny_decoder(model_type: str, granularity: str = "group", seed: int = 0, **overrides) -> PreTrainedModel:
    """A random 3-layer decoder of `model_type` at attention `granularity`, with distinct weights everywhere
    (biases and norms included)."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=3, tie_word_embeddings=False)
    config = AutoConfig.for_model(model_type, **{**shape, **DECODERS[model_type], **overrides})
    setattr(config, GRANULARITY_KEY, granularity)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(-0.5, 0.5)
    return model


def random_plan(model: LlamaForCausalLM, seed: int = 0, drop: float = 0.4) -> pd.DataFrame:
    """A plan that drops a random share of units, always keeping one unit per layer and module."""
    from nirvana.models import get_adapter

    adapter = get_adapter(model.config)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for index, layer in enumerate(adapter.layers(model)):
        for module in adapter.modules(layer):
            n = adapter.unit_count(layer, module)
            keep = torch.rand(n, generator=gen) > drop
            keep[torch.randint(n, (1,), generator=gen)] = True
            rows += [(index, module, u, 0.0, bool(k)) for u, k in enumerate(keep.tolist())]
    return pd.DataFrame(rows, columns=["layer", "module", "unit", "score", "keep"])


@pytest.fixture(params=sorted(SHAPES))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


WORDS = [f"w{i}" for i in range(62)]


def save_tokenizer(path) -> None:
    """A word-level tokenizer over the tiny models' 64-token vocabulary (<unk> 0, </s> 63)."""
    vocab = {"<unk>": 0} | {w: i + 1 for i, w in enumerate(WORDS)} | {"</s>": 63}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def tiny_model_dir(path, kind: str = "gqa"):
    """A saved tiny Llama with a word-level tokenizer over its 64-token vocabulary."""
    tiny_llama(kind).save_pretrained(path)
    save_tokenizer(path)
    return path


CORPUS = [
    "the model reads the text and writes the next word",
    "pruned models keep fewer heads and fewer channels in every layer",
    "numbers like 12 345 and 2026 appear in text; so do commas, dots and quotes",
    "llama.cpp runs the exported file on a laptop, it's fast",
] * 20


def bpe_tokenizer(pre: str = "gpt-2", size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, <s> prepended on encode, whose pre-tokenizer is the
    one of GPT-2, SmolLM2 (digits split), Llama 3 or Qwen2 (regex splits), named as llama.cpp names them."""
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in ("llama-bpe", "qwen2"):
        pattern = LLAMA3_SPLIT if pre == "llama-bpe" else QWEN2_SPLIT
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    elif pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>"
    )


def tiny_bpe_model_dir(path: Path) -> Path:
    """A saved tiny Llama with a byte-level BPE tokenizer (`bpe_tokenizer`), which llama.cpp runs too: the
    session's tiny pipeline exports, scores and times it in llama.cpp as the real pipeline does SmolLM2."""
    tokenizer = bpe_tokenizer()
    # 256 positions: lm-eval refuses a PIQA answer longer than the context, and bytes make long answers
    tiny_llama("gqa", vocab_size=len(tokenizer), max_position_embeddings=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_t5(feed_forward: str, seed: int = 0) -> PreTrainedModel:
    """A random T5 (3 encoder, 2 decoder blocks) with distinct weights everywhere."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        d_ff=24,
        num_layers=3,
        num_decoder_layers=2,  # generate() sizes its cache by num_layers: fewer decoder blocks only
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj=feed_forward,
        decoder_start_token_id=0,
        pad_token_id=0,
        dropout_rate=0.0,
    )
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def random_text(words: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=gen).tolist())


def load_stage(name: str) -> types.ModuleType:
    """A stage script as a module, to run its `main` in this process."""
    script = Path(__file__).resolve().parents[1] / f"stages/{name}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{name}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name` made by `build` once per session. pytest-xdist's workers share it, in the folder that
    holds theirs: the first to ask builds it, holding a lock, and the others wait for it."""
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(shared / f"{name}.lock"):
        if not done.exists():
            assert not folder.exists(), f"{folder} is what is left of a build that failed in another worker"
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline reproduced and committed once per session (tests/pipeline_fixture.py): read it as it
    is, or change a `copy_run` of it."""
    return built_once(
        tmp_path_factory, "tiny_run", lambda run: reproduce_tiny(run, tiny_bpe_model_dir(run.with_name("tiny_model")))
    )


@pytest.fixture(scope="session")
def tiny_experiment(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Experiment:
    """A copy of the tiny run changed by `dvc exp run -S sparsity=0.4`, once per session: read it as it is, or
    change a `copy_run` of it, whose run-cache restores that experiment instead of running it again."""
    repo = built_once(tmp_path_factory, "tiny_experiment", lambda repo: run_experiment(tiny_run, repo))
    return Experiment.read(repo)
