"""GGUF export: a pruned model (different heads, KV heads and MLP widths per layer) runs in a real llama.cpp
(llama-cpp-python) with the logits, greedy text and tokenization transformers gives; bad input writes nothing."""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import llama_cpp  # the deploy extra; `make install` installs it
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from tokenizers import pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
)

from conftest import CORPUS, bpe_tokenizer, load_stage, random_plan, tiny_llama, tiny_model_dir
from nirvana.core.errors import NativeCrash
from nirvana.core.stage import run_stage
from nirvana.deploy.gguf import export, gguf_name, rope_rows
from nirvana.deploy.gguf_errors import ExportError
from nirvana.deploy.llamacpp import announce, isolated
from nirvana.method.surgery import prune_model, save_model
from nirvana.models import get_adapter
from nirvana.models.widths import BIAS_KEY
from nirvana.pipeline.cli import main

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes 1234 heads, and 56 channels!",
    "  spaces   and\ttabs\nnew lines, it's what we'd test; don't we?",
    "Ünïcödé: naïve café — 東京 🚀",
]


def tiny_model(model_type: str, vocab: int, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A 3-layer random decoder with grouped-query attention (8 query heads in 4 KV groups of head_dim 16)."""
    shape: dict = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    if model_type == "llama":
        return tiny_llama("gqa", seed=seed, **{**shape, **overrides})
    torch.manual_seed(seed)
    config_class = {"qwen2": Qwen2Config, "mistral": MistralConfig}[model_type]
    config = config_class(**{**shape, "tie_word_embeddings": False, "sliding_window": None, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(-0.5, 0.5)
    return model


def pruned_folder(
    path: Path, model_type: str = "llama", seed: int = 0, bias: bool = False, **overrides: object
) -> tuple[Path, PreTrainedModel]:
    """Prune a tiny model with a random plan (layers end up with different widths), save it as the pipeline does."""
    tokenizer = bpe_tokenizer()
    model = tiny_model(model_type, len(tokenizer), seed=seed, **overrides)
    prune_model(model, random_plan(model, seed=seed, drop=0.4))
    if bias:  # what FLAP's bias compensation leaves: o_proj and down_proj biases
        adapter = get_adapter(model.config)
        with torch.no_grad():
            for layer in adapter.layers(model):
                adapter.add_output_bias(layer)
                for module in adapter.modules(layer):
                    bias_param = adapter.output_projection(layer, module).bias
                    assert bias_param is not None
                    bias_param.uniform_(-0.5, 0.5)
        setattr(model.config, BIAS_KEY, True)
    save_model(model, tokenizer, path)
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A working directory with an outputs/ folder, as the project root has."""
    (tmp_path / "outputs").mkdir()
    old = Path.cwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


def load(path: Path, n_ctx: int = 128) -> llama_cpp.Llama:
    """llama.cpp with every position's logits and a float32 KV cache (its default, f16, would round K and V)."""
    return llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=n_ctx, verbose=False, type_k=0, type_v=0, n_threads=2, seed=0
    )


def cpp_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def hf_logits(model: PreTrainedModel, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


IDS = torch.randint(3, 300, (48,), generator=torch.Generator().manual_seed(7)).tolist()

# float32 on both sides: what differs is only the order of the sums (GGML's blocked dot products, its softmax),
# so the differences are rounding: measured at most 7e-7 of the largest logit here. 1e-5 of the largest logit
# leaves room for that and still fails by orders of magnitude on a wrong head order, permutation or bias.
F32_RELATIVE = 1e-5
# Llama 3.1's rope scaling, with a short original context so that the scaled band covers some of head_dim 16.
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)


@pytest.mark.parametrize(
    "model_type,bias,overrides",
    [
        ("llama", False, {}),
        ("llama", True, {}),  # bias compensation: deci loads attn_output.bias and ffn_down.bias
        ("llama", False, {"tie_word_embeddings": True}),  # SmolLM2 ties them
        ("llama", False, {"rope_parameters": LLAMA3_ROPE}),
        ("qwen2", False, {}),  # q/k/v biases, permuted like their rows
        ("mistral", False, {}),
    ],
    ids=["llama", "llama-output-bias", "llama-tied", "llama3-rope", "qwen2", "mistral"],
)
def test_f32_logits_equal_transformers(project: Path, model_type: str, bias: bool, overrides: dict) -> None:
    folder, model = pruned_folder(project / "model", model_type, bias=bias, **overrides)
    widths = [(layer.self_attn.q_proj.out_features, layer.mlp.gate_proj.out_features) for layer in model.model.layers]
    assert len(set(widths)) > 1, "the random plan should leave layers of different widths"
    record = export(folder, "outputs/m.gguf", "f32")
    assert record["fallbacks"] == 0
    assert [layer["heads"] * 16 for layer in record["layers"]] == [w[0] for w in widths]
    expected, got = hf_logits(model, IDS), cpp_logits(load(project / "outputs/m.gguf"), IDS)
    scale = np.abs(expected).max()
    assert scale > 1.0
    assert np.abs(got - expected).max() <= F32_RELATIVE * scale, np.abs(got - expected).max() / scale


def greedy_hf(model: PreTrainedModel, ids: list[int], n: int) -> list[int]:
    """n argmax steps, never stopping at EOS (llama.cpp's generate does not stop either)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def greedy_cpp(llm: llama_cpp.Llama, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("type", ["f16", "q8_0", "bf16"])
def test_quantized_greedy_continuation_equals_transformers(project: Path, type: str) -> None:
    folder, model = pruned_folder(project / "model", bias=True)
    record = export(folder, f"outputs/m-{type}.gguf", type)
    reader = gguf.GGUFReader(project / f"outputs/m-{type}.gguf")
    stored = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert stored["blk.0.attn_norm.weight"] == "f32" and stored["blk.0.attn_output.bias"] == "f32"
    # q8_0 blocks hold 32 values: rows of 64 (hidden) are quantized, down_proj rows (pruned MLP widths that
    # 32 does not divide) fall back to f16, and the record counts them.
    odd = [
        f"blk.{i}.ffn_down.weight" for i, layer in enumerate(model.model.layers) if layer.mlp.down_proj.in_features % 32
    ]
    if type == "q8_0":
        assert odd and record["fallbacks"] == len(odd)
        assert all(stored[name] == "f16" for name in odd) and stored["blk.0.attn_q.weight"] == "q8_0"
    else:
        assert record["fallbacks"] == 0 and stored["blk.0.attn_q.weight"] == type
    prompt = IDS[:8]
    assert greedy_cpp(load(project / f"outputs/m-{type}.gguf"), prompt, 16) == greedy_hf(model, prompt, 16)


def test_q8_0_bytes_equal_llama_cpp_quantizer(project: Path) -> None:
    """Our q8_0 blocks are the ones llama.cpp's own quantizer makes from the f32 export, byte for byte."""
    import ctypes

    folder, _ = pruned_folder(project / "model")
    export(folder, "outputs/m.gguf", "f32")
    export(folder, "outputs/m-q8.gguf", "q8_0")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    reference = project / "outputs/reference.gguf"
    assert (
        llama_cpp.llama_model_quantize(
            str(project / "outputs/m.gguf").encode(), str(reference).encode(), ctypes.byref(params)
        )
        == 0
    )
    ours = {t.name: t for t in gguf.GGUFReader(project / "outputs/m-q8.gguf").tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(reference).tensors}
    q8 = [name for name, t in ours.items() if t.tensor_type == gguf.GGMLQuantizationType.Q8_0]
    assert len(q8) >= 10
    for name in q8:
        assert theirs[name].tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        assert np.array_equal(ours[name].data, theirs[name].data), name


def prompt_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Every position's logits of `ids` evaluated as one batch (a prompt), as `isolated` runs it in a child."""
    announce(path)
    return cpp_logits(load(path), ids)


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_q8_0_prompt_batch_runs_in_the_installed_llama_cpp(project: Path) -> None:
    """A q8_0 file whose matrices are all whole blocks, fed a 48-token prompt in one batch: the path whose matrix
    kernels a native build specialises for its CPU (AMX on Xeons that announce it, which died of SIGILL on virtual
    machines that cannot execute it, as soon as a prompt had two tokens). Run in a child process, so that a crash
    fails the test naming the signal instead of killing pytest."""
    tokenizer = bpe_tokenizer()
    model = tiny_model("llama", len(tokenizer), hidden_size=256, intermediate_size=512)
    with torch.no_grad():  # weights of a trained model's scale (1 / sqrt(width)), so that 8-bit rounding stays small
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0, 256**-0.5)
    save_model(model, tokenizer, project / "model")
    model = AutoModelForCausalLM.from_pretrained(project / "model").eval()
    record = export(project / "model", "outputs/m.gguf", "q8_0")
    assert record["fallbacks"] == 0
    got = isolated(prompt_logits, project / "outputs/m.gguf", IDS)
    expected = hf_logits(model, IDS)
    stored = hf_logits(with_gguf_weights(model, project / "outputs/m.gguf", record["layers"]), IDS)
    # llama.cpp also rounds the activations to 8 bits for q8_0 products. Measured: 1.7% of the largest logit from
    # the stored weights' logits (1.9% from the unquantized model's), argmax the same at 46 of 48 positions; a
    # misread file is off by about the logits' own scale.
    assert np.abs(got - stored).max() < 0.05 * np.abs(stored).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.85


def die_of_sigill(path: Path) -> None:
    """What a llama.cpp build with instructions the CPU lacks does: the process dies of SIGILL mid-run."""
    announce(path)
    os.kill(os.getpid(), signal.SIGILL)


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_a_crashed_llama_cpp_stops_the_stage_in_one_line_naming_file_and_signal(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = r"llama.cpp died of SIGILL \(Illegal instruction\) while running outputs/m.gguf; .+`make install`"
    with pytest.raises(NativeCrash, match=rf"^{expected}"):
        isolated(die_of_sigill, Path("outputs/m.gguf"))
    shutil.copy(Path(__file__).parents[1] / "params.yaml", project / "params.yaml")
    monkeypatch.setattr(sys, "argv", ["measure_gguf.py", "outputs/m.gguf"])
    with pytest.raises(SystemExit, match=rf"^\[measure_gguf\] {expected}[^\n]*$"):
        run_stage("measure_gguf", lambda params, path: isolated(die_of_sigill, Path(path)))


def test_k_quant_loads_and_generates(project: Path) -> None:
    """q4_k_m through llama.cpp's own quantizer. k-quant blocks hold 256 values: with hidden 256 the q, k, v,
    gate and up rows are k-quantized; the o_proj and down_proj rows (pruned widths) are not whole blocks and
    llama.cpp falls back to a legacy type, which the record lists."""
    folder, model = pruned_folder(project / "model", hidden_size=256)
    record = export(folder, "outputs/m-q4.gguf", "q4_k_m")
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(project / "outputs/m-q4.gguf").tensors}
    assert stored["blk.0.attn_q.weight"] in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K)
    assert stored["blk.0.ffn_gate.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert record["fallbacks"] == len(record["fallback_tensors"]) > 0
    assert all(name.split(".")[2] in ("attn_output", "ffn_down") for name in record["fallback_tensors"])
    assert not list((project / "outputs").glob(".tmp*"))
    llm = load(project / "outputs/m-q4.gguf")
    assert len(greedy_cpp(llm, IDS[:8], 16)) == 16
    # 4-bit weights of a random model move its logits a lot; what llama.cpp must compute is the model the file
    # holds: transformers with the file's weights (dequantized, rope permutation undone) gives nearly its logits.
    expected, got = hf_logits(model, IDS), cpp_logits(llm, IDS)
    stored_model = hf_logits(with_gguf_weights(model, project / "outputs/m-q4.gguf", record["layers"]), IDS)
    off_original, off_stored = np.abs(got - expected).max(), np.abs(got - stored_model).max()
    # Measured: 3.5 from the original's logits, 0.40 from the stored model's (llama.cpp also rounds activations
    # to 8 bits for k-quant products); a file llama.cpp misread would be as far from both.
    assert off_stored < 0.2 * off_original


LLAMA_LOG: list[str] = []


@llama_cpp.llama_log_callback
def keep_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    LLAMA_LOG.append(text.decode("utf-8", "replace"))


@pytest.mark.parametrize("tied", [True, False])
def test_k_quant_fallbacks_are_counted_as_llama_cpp_counts_them(project: Path, tied: bool) -> None:
    """Rows of 288 values are no whole 256-value k-quant block: llama.cpp stores the output matrix (the embedding
    where it is tied) in q8_0 by its own choice and counts as fallbacks only the matrices that could not take the
    type it chose. The record counts the same (it said 204 where llama.cpp said 203 for SmolLM2)."""
    from llama_cpp._logger import llama_log_callback

    folder, _ = pruned_folder(project / "model", hidden_size=288, tie_word_embeddings=tied)
    LLAMA_LOG.clear()
    llama_cpp.llama_log_set(keep_log, ctypes.c_void_p(0))
    try:
        record = export(folder, "outputs/m-q4.gguf", "q4_k_m")
    finally:
        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
    counted = re.search(r"(\d+) of \d+ tensor\(s\) required fallback quantization", "".join(LLAMA_LOG))
    assert counted is not None, "".join(LLAMA_LOG)[-2000:]
    assert record["fallbacks"] == int(counted.group(1)) > 0
    output = "token_embd.weight" if tied else "output.weight"
    assert not [name for name in record["fallback_tensors"] if name.startswith(output)]


def with_gguf_weights(model: PreTrainedModel, path: Path, layers: list[dict]) -> PreTrainedModel:
    """A copy of `model` holding the weights a GGUF file stores, dequantized and back in Hugging Face's layout."""
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    state = {}
    for name, value in model.state_dict().items():
        target = gguf_name(name) or "output.weight"
        tensor = stored[target]
        data = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(value.shape)
        match = re.fullmatch(r"blk\.(\d+)\.attn_([qk])\.weight", target)
        if match:
            layer = layers[int(match.group(1))]
            rows = rope_rows(layer["heads"] if match.group(2) == "q" else layer["kv_heads"], 16)
            data = data[torch.argsort(rows)]
        state[name] = data.float()
    copy = AutoModelForCausalLM.from_pretrained(model.config._name_or_path).eval()
    copy.load_state_dict(state)
    return copy


def test_record_beside_the_file(project: Path) -> None:
    import hashlib

    from nirvana.core.io import folder_digest

    folder, _ = pruned_folder(project / "model")
    export(folder, "outputs/m.gguf", "f16")
    record = json.loads((project / "outputs/m.gguf.json").read_text())
    data = (project / "outputs/m.gguf").read_bytes()
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["type"] == "f16" and record["fallbacks"] == 0
    assert record["source"] == {"path": str(folder), "digest": folder_digest(folder)}
    assert sorted(p.name for p in (project / "outputs").iterdir()) == ["m.gguf", "m.gguf.json"]


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_tokenization_equals_transformers(project: Path, pre: str) -> None:
    tokenizer = bpe_tokenizer(pre)
    model = tiny_model("llama", len(tokenizer))
    save_model(model, tokenizer, project / "model")
    export(project / "model", "outputs/t.gguf", "f16")
    reader = gguf.GGUFReader(project / "outputs/t.gguf")
    assert reader.fields["tokenizer.ggml.pre"].contents() == pre
    llm = load(project / "outputs/t.gguf")
    for text in TEXTS:
        expected = tokenizer(text)["input_ids"]
        assert expected[0] == tokenizer.bos_token_id
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == expected, text


def smollm2_tokenizer_folder(path: Path) -> Path:
    """The real SmolLM2 tokenizer (from the embedded GGUF) on a tiny random Llama with its 49152-token vocabulary."""
    from nirvana.models.loading import EMBEDDED

    try:
        with EMBEDDED["smollm2-135m"].gguf() as file:
            tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (FileNotFoundError, RuntimeError) as error:
        pytest.skip(f"embedded SmolLM2 not installed: {error}")
    save_model(tiny_model("llama", len(tokenizer), hidden_size=32, intermediate_size=32), tokenizer, path)
    return path


SMOL_TEXTS = [*TEXTS, "<|im_start|>user\nHi there<|im_end|>", "def f(x):\n    return x ** 2  # 3.14159"]


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_smollm2_tokenizer_tokenizes_as_transformers(project: Path) -> None:
    folder = smollm2_tokenizer_folder(project / "model")
    export(folder, "outputs/s.gguf", "f16")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = load(project / "outputs/s.gguf")
    for text in SMOL_TEXTS:
        expected = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected, text
    fields = gguf.GGUFReader(project / "outputs/s.gguf").fields
    assert "im_start" in fields["tokenizer.chat_template"].contents()


BASE = Path("/work/main/outputs/base_model")


@pytest.mark.slow
@pytest.mark.skipif(not (BASE / "config.json").is_file(), reason="no outputs/base_model (run `dvc repro` first)")
def test_real_base_model_tokenizes_and_scores_as_transformers(project: Path) -> None:
    export(BASE, "outputs/base.gguf", "f32")
    tokenizer, model = AutoTokenizer.from_pretrained(BASE), AutoModelForCausalLM.from_pretrained(BASE).eval()
    llm = load(project / "outputs/base.gguf", n_ctx=256)
    for text in SMOL_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
    ids = tokenizer(" ".join(TEXTS))["input_ids"]
    expected, got = hf_logits(model.float(), ids), cpp_logits(llm, ids)
    assert np.abs(got - expected).max() <= F32_RELATIVE * np.abs(expected).max()  # measured 1.7e-6


# ---- bad input: one clear error, nothing written ----


def nothing_written(project: Path) -> bool:
    return not any((project / "outputs").iterdir())


def test_unknown_type_lists_the_valid_ones(project: Path) -> None:
    folder, _ = pruned_folder(project / "model")
    with pytest.raises(ExportError, match=r"unknown GGUF type 'q3_x'; valid: f32, f16, bf16, q8_0, q2_k"):
        export(folder, "outputs/m.gguf", "q3_x")
    assert nothing_written(project)


@pytest.mark.parametrize("out", ["elsewhere/m.gguf", "outputs/../m.gguf", "/tmp/m.gguf"])
def test_output_outside_outputs_is_refused(project: Path, out: str) -> None:
    folder, _ = pruned_folder(project / "model")
    with pytest.raises(ExportError, match=r"outside the project's outputs/ folder .*resolved against the current"):
        export(folder, out, "f16")
    assert nothing_written(project) and not (project / "elsewhere").exists() and not (project / "m.gguf").exists()


def test_folder_without_config_or_weights_is_refused(project: Path) -> None:
    (project / "empty").mkdir()
    with pytest.raises(ExportError, match=r"not a model folder written by this pipeline: no config\.json"):
        export(project / "empty", "outputs/m.gguf", "f16")
    folder, _ = pruned_folder(project / "model")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ExportError, match=r"no \*\.safetensors weights"):
        export(folder, "outputs/m.gguf", "f16")
    assert nothing_written(project)


@pytest.mark.parametrize("kind", ["t5", "gemma3_text", "gpt2"])
def test_unsupported_architecture_is_refused(project: Path, kind: str) -> None:
    from transformers import Gemma3TextConfig, GPT2Config, T5Config

    folder = project / "model"
    folder.mkdir()
    config = {"t5": T5Config, "gemma3_text": Gemma3TextConfig, "gpt2": GPT2Config}[kind]()
    config.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ExportError, match=rf"architecture '{kind}' cannot be exported to GGUF: .+; supported: llama"):
        export(folder, "outputs/m.gguf", "f16")
    assert nothing_written(project)


def test_sliding_window_mistral_is_refused(project: Path) -> None:
    tokenizer = bpe_tokenizer()
    model = tiny_model("mistral", len(tokenizer), sliding_window=16)
    save_model(model, tokenizer, project / "model")
    with pytest.raises(ExportError, match="sliding_window"):
        export(project / "model", "outputs/m.gguf", "f16")
    assert nothing_written(project)


def test_failure_midway_leaves_nothing(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nirvana.deploy.gguf

    folder, _ = pruned_folder(project / "model")

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(nirvana.deploy.gguf, "encode", broken)  # fails after the header is written
    with pytest.raises(OSError, match="disk full"):
        export(folder, "outputs/m.gguf", "f16")
    assert nothing_written(project)


def run_gguf_stage(
    project: Path, monkeypatch: pytest.MonkeyPatch, name: str, *paths: str | Path, **export: object
) -> None:
    """stages/<name>.py run in this process on `paths`, under the committed params.yaml with `export` and small
    `evaluate` windows (16 tokens, the tiny models' texts are short), perplexity on the first 4 of them."""
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["export"] |= {"ppl_tokens": 64} | export
    params["evaluate"] |= {"windows": [16], "max_tokens": 256}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, paths)])
    run_stage(name, load_stage(name).main)


def export_stage(
    project: Path, monkeypatch: pytest.MonkeyPatch, folder: Path, out: str = "outputs/gguf/pruned"
) -> dict:
    """stages/export_gguf.py on one model folder; its manifest."""
    run_gguf_stage(project, monkeypatch, "export_gguf", folder, out, types=["f32", "f16"])
    return json.loads((project / out / "export.json").read_text())


@pytest.mark.parametrize("kind", ["t5", "word-level tokenizer"])
def test_export_stage_records_a_model_llama_cpp_cannot_run(
    project: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from transformers import T5Config

    if kind == "t5":
        folder = project / "model"
        folder.mkdir()
        T5Config().save_pretrained(folder)
        (folder / "model.safetensors").write_bytes(b"")
        (folder / "tokenizer.json").write_text("{}")
    else:
        folder = tiny_model_dir(project / "model")
    manifest = export_stage(project, monkeypatch, folder)
    why = "architecture 't5' cannot be exported" if kind == "t5" else "only byte-level BPE tokenizers"
    assert list(manifest) == ["unsupported"] and manifest["unsupported"].startswith(why)
    assert [p.name for p in (project / "outputs/gguf/pruned").iterdir()] == ["export.json"]


@pytest.mark.parametrize("broken", ["read_layers", "write_gguf"])
def test_export_stage_fails_on_any_other_export_error(
    project: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    """A regression in the checks or the writer stops the stage in one line, no manifest says "unsupported"."""
    import nirvana.deploy.gguf

    folder, _ = pruned_folder(project / "model")

    def regression(*args: object) -> None:
        raise ExportError(f"{broken} broke")

    monkeypatch.setattr(nirvana.deploy.gguf, broken, regression)
    with pytest.raises(SystemExit, match=rf"^\[export_gguf\] {broken} broke$"):
        export_stage(project, monkeypatch, folder)
    assert not [path for path in (project / "outputs").rglob("*") if not path.is_dir()]


def wiki_corpus(project: Path) -> Path:
    """A corpora folder whose wiki set is the tiny tokenizer's own sentences."""
    corpora = project / "outputs/corpora"
    corpora.mkdir()
    pd.DataFrame({"text": CORPUS}).to_parquet(corpora / "wiki.parquet")
    return corpora


@pytest.fixture
def measured(project: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Three tiny models (dense, a pruned one, a second pruned one as `finetuned`) through export_gguf and
    gguf_perplexity at f32 and f16; each model's folder."""
    corpora = wiki_corpus(project)
    dense = project / "dense"
    tokenizer = bpe_tokenizer()
    save_model(tiny_model("llama", len(tokenizer)), tokenizer, dense)
    folders = {"dense": dense}
    for name, seed in (("pruned", 0), ("finetuned", 1)):
        folders[name] = pruned_folder(project / name, seed=seed)[0]
    for name, folder in folders.items():
        manifest = export_stage(project, monkeypatch, folder, f"outputs/gguf/{name}")
        assert sorted(manifest["exported"]) == ["f16", "f32"]
        assert manifest["exported"]["f16"]["gguf"] == f"{name}-f16.gguf"
        out = project / f"metrics/gguf_ppl_{name}.json"
        run_gguf_stage(
            project, monkeypatch, "gguf_perplexity", f"outputs/gguf/{name}", folder, corpora, out, ppl_tokens=64
        )
    return folders


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_gguf_perplexity_scores_llama_cpp_and_transformers_on_evaluates_first_windows(
    measured: dict[str, Path],
) -> None:
    """Both perplexities over the first export.ppl_tokens // evaluate.windows[0] of evaluate's wiki windows: the
    transformers one is evaluate's function on those windows, and llama.cpp's f32 file gives the same number."""
    from nirvana.evaluation.perplexity import held_out, perplexity

    for name, folder in measured.items():
        record = json.loads(Path(f"metrics/gguf_ppl_{name}.json").read_text())
        assert record["ppl_tokens"] == 64 and sorted(record) == ["f16", "f32", "ppl_tokens", "transformers"]
        windows = held_out("outputs/corpora", "wiki", AutoTokenizer.from_pretrained(folder), 256, 16)[:4]
        expected = perplexity(AutoModelForCausalLM.from_pretrained(folder).eval(), windows, 8)
        assert record["transformers"]["ppl_wiki_16"] == round(expected, 4), name
        assert record["f32"]["ppl_wiki_16"] == pytest.approx(expected, rel=1e-4), name
        assert record["f16"]["ppl_wiki_16"] == pytest.approx(expected, rel=1e-2), name
        manifest = json.loads(Path(f"outputs/gguf/{name}/export.json").read_text())
        assert record["f16"]["sha256"] == manifest["exported"]["f16"]["sha256"]


MEASURE = ["outputs/gguf/dense", "outputs/gguf/pruned", "outputs/gguf/finetuned"]
MEASURE += [f"metrics/gguf_ppl_{name}.json" for name in ("dense", "pruned", "finetuned")]
MEASURE += ["outputs/corpora", "dense", "pruned", "metrics/gguf.json", "timings/gguf.json"]
TIMING = {"types": ["f32", "f16"], "prompt_len": 8, "new_tokens": 2, "warmup": 0, "repeats": 2, "max_repeats": 3}


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_measure_gguf_times_in_paired_rounds_and_gathers_the_perplexities(
    measured: dict[str, Path], project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each speedup is the median of its rounds' ratios (dense seconds / model seconds in the same round), with
    its spread, after export.repeats to export.max_repeats rounds; the results file holds no wall-clock figure
    and carries gguf_perplexity's numbers as they were measured, refusing those of other files."""
    run_gguf_stage(project, monkeypatch, "measure_gguf", *MEASURE, **TIMING)
    results = json.loads((project / "metrics/gguf.json").read_text())
    timed = json.loads((project / "timings/gguf.json").read_text())
    assert results["ppl_tokens"] == 64 and timed["machine"]["cpu"]
    for name in measured:
        record = json.loads((project / f"metrics/gguf_ppl_{name}.json").read_text())
        assert results["transformers"][name] == record["transformers"]
        assert results["f16"][name]["ppl_wiki_16"] == record["f16"]["ppl_wiki_16"]
    for type in ("f32", "f16"):
        t = timed[type]
        assert 2 <= t["rounds"] <= 3 and "rounds" not in results[type]
        for name in ("pruned", "finetuned"):
            for kind in ("prompt", "gen"):
                dense, own = t["dense"][f"{kind}_seconds"], t[name][f"{kind}_seconds"]
                ratios = [d / m for d, m in zip(dense, own, strict=True)]
                assert len(ratios) == t["rounds"]
                assert t[f"{name}_{kind}_speedup"] == round(statistics.median(ratios), 4)
                spread = 1.2533 * statistics.stdev(ratios) / math.sqrt(len(ratios))
                assert t[f"{name}_{kind}_speedup_spread"] == pytest.approx(spread, rel=1e-3, abs=1e-4)
                assert f"{name}_{kind}_speedup" not in results[type]
            assert results[type][f"{name}_bytes_ratio"] > 1
    manifest = json.loads(Path("outputs/gguf/pruned/export.json").read_text())
    assert results["pruned_digest"] == manifest["exported"]["f32"]["source"]["digest"]
    # a perplexity file about other GGUF files than the folder holds (a stale one) stops the stage in one line
    stale = project / "metrics/gguf_ppl_pruned.json"
    stale.write_text(json.dumps(json.loads(stale.read_text()) | {"f32": {"ppl_wiki_16": 1.0, "sha256": "0" * 64}}))
    (project / "metrics/gguf.json").unlink()
    with pytest.raises(SystemExit, match=r"^\[measure_gguf\] metrics/gguf_ppl_pruned.json: measured another f32 file"):
        run_gguf_stage(project, monkeypatch, "measure_gguf", *MEASURE, **TIMING)
    assert not (project / "metrics/gguf.json").exists()


# ---- the adaptive number of timed rounds, on made-up seconds ----

ROUNDS = {"dense": [(1.0, 2.0), (1.2, 2.2), (0.9, 2.1)], "pruned": [(0.8, 1.6), (1.0, 1.7), (0.75, 1.8)]}


def test_a_speedup_is_the_median_of_paired_round_ratios_with_its_standard_error() -> None:
    from nirvana.evaluation.timings import median_spread, paired_speedups, round_ratios

    ratios = round_ratios(ROUNDS, "dense")
    assert ratios == {"pruned_prompt_speedup": [1.25, 1.2, 1.2], "pruned_gen_speedup": [1.25, 2.2 / 1.7, 2.1 / 1.8]}
    found = paired_speedups(ROUNDS, "dense")
    assert found["rounds"] == 3 and found["pruned_prompt_speedup"] == 1.2
    assert found["pruned_prompt_speedup_spread"] == round(1.2533 * statistics.stdev([1.25, 1.2, 1.2]) / 3**0.5, 4)
    assert found["pruned_gen_speedup"] == 1.25 != round(2.1 / 1.7, 4)  # the median round, not a ratio of medians
    one = paired_speedups({"dense": [(1.0, 1.0)], "m": [(0.5, 1.0)]}, "dense")
    assert median_spread([1.1]) is None and one["rounds"] == 1 and one["m_prompt_speedup_spread"] is None


def test_rounds_are_added_while_a_spread_is_above_the_target_up_to_the_most() -> None:
    from nirvana.evaluation.timings import more_rounds, wide_spreads

    assert wide_spreads(ROUNDS, "dense", 0.03) == ["pruned_gen_speedup"]  # prompt: 0.0209, generation: 0.0468
    assert more_rounds(ROUNDS, "dense", 0.03, most=4) and not more_rounds(ROUNDS, "dense", 0.03, most=3)
    assert not more_rounds(ROUNDS, "dense", 0.05, most=12)
    one = {name: times[:1] for name, times in ROUNDS.items()}
    assert wide_spreads(one, "dense", 10.0) == ["pruned_prompt_speedup", "pruned_gen_speedup"]  # unknown from one


class FakeModel:
    """Stands for a llama.cpp model: `run_once` returns its next made-up (prompt, generation) seconds."""

    def __init__(self, times: Iterator[tuple[float, float]]) -> None:
        self.times = times

    def close(self) -> None:
        pass


def fake_speed(monkeypatch: pytest.MonkeyPatch, pruned: list[float], **rule: object) -> dict:
    """nirvana.deploy.llamacpp.speed on made-up seconds: dense takes 1 s a round, pruned as listed (then 0.8 s), with
    export.repeats 3 and nirvana.evaluation.timings.more_rounds; what it measured."""
    import functools
    import itertools

    from nirvana.deploy import llamacpp
    from nirvana.evaluation.timings import more_rounds

    seconds = {"dense": itertools.repeat((1.0, 1.0)), "pruned": ((s, s) for s in itertools.chain(pruned, [0.8] * 99))}
    monkeypatch.setattr(llamacpp, "open_model", lambda path, *args, **kwargs: FakeModel(seconds[path.stem]))
    monkeypatch.setattr(llamacpp, "run_once", lambda llm, prompt, new_tokens: next(llm.times))
    more = functools.partial(more_rounds, reference="dense", **rule)
    return llamacpp.speed({"dense": Path("dense"), "pruned": Path("pruned")}, [1] * 4, 2, 1, 0, 3, more=more)


def test_speed_times_as_few_rounds_as_bring_every_spread_under_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steady ratios stop at export.repeats; one slow first round needs more rounds, exactly as many as bring its
    standard error to the target; ratios that never settle stop at export.max_repeats."""
    from nirvana.evaluation.timings import median_spread

    steady = fake_speed(monkeypatch, [], target=0.03, most=12)
    assert len(steady["pruned"]["prompt_s"]) == 3 and steady["pruned"]["prompt_tokens_per_s"] == 5.0
    settling = fake_speed(monkeypatch, [0.7], target=0.03, most=12)
    ratios = [1 / 0.7] + [1.25] * 11
    needed = next(n for n in range(3, 13) if median_spread(ratios[:n]) <= 0.03)  # type: ignore[operator]
    assert len(settling["dense"]["gen_s"]) == needed == 8
    noisy = fake_speed(monkeypatch, [0.5, 1.0] * 10, target=0.03, most=7)
    assert len(noisy["pruned"]["gen_s"]) == 7


def test_a_model_llama_cpp_cannot_run_is_recorded_through_every_gguf_stage(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny word-level model: each export manifest, each perplexity file and metrics/gguf.json say why, and
    the timing file holds only the machine."""
    corpora = wiki_corpus(project)
    folder = tiny_model_dir(project / "dense")
    for name in ("dense", "pruned", "finetuned"):
        export_stage(project, monkeypatch, folder, f"outputs/gguf/{name}")
        out = f"metrics/gguf_ppl_{name}.json"
        run_gguf_stage(project, monkeypatch, "gguf_perplexity", f"outputs/gguf/{name}", folder, corpora, out)
        assert list(json.loads(Path(out).read_text())) == ["unsupported"]
    run_gguf_stage(project, monkeypatch, "measure_gguf", *MEASURE)
    assert json.loads(Path("metrics/gguf.json").read_text())["unsupported"].startswith("only byte-level BPE")
    assert list(json.loads(Path("timings/gguf.json").read_text())) == ["machine"]


def test_cli_exports_and_reports_errors_in_one_line(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = pruned_folder(project / "model")
    main(["export", str(folder), "outputs/m.gguf", "--type", "q8_0"])
    capsys.readouterr()
    assert json.loads((project / "outputs/m.gguf.json").read_text())["type"] == "q8_0"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(folder), "outputs/x.gguf", "--type", "int3"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown GGUF type 'int3'" in err
    assert not (project / "outputs/x.gguf").exists()


def test_tokenizer_llama_cpp_cannot_reproduce_is_refused(project: Path) -> None:
    folder = tiny_model_dir(project / "model")  # a word-level tokenizer
    with pytest.raises(ExportError, match="only byte-level BPE tokenizers"):
        export(folder, "outputs/m.gguf", "f16")
    tokenizer = bpe_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    save_model(tiny_model("llama", len(tokenizer)), tokenizer, project / "bpe")
    with pytest.raises(ExportError, match=r"pre-tokenizer \{\"type\": \"Whitespace\"\} has no llama.cpp equivalent"):
        export(project / "bpe", "outputs/m.gguf", "f16")
    assert nothing_written(project)


def test_params_list_the_types_export_writes() -> None:
    """params.yaml's export.types is checked against this list before the pipeline starts."""
    from nirvana.core.params import GGUF_TYPES
    from nirvana.deploy.gguf_types import TYPES

    assert GGUF_TYPES == TYPES
