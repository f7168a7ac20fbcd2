"""The published shapes of the paper's 8B-class models, for measurements that need their size but not their weights.

No 8B checkpoint is reachable offline here, so the GPU benchmarks build these models with random weights: time and
memory depend on the shapes only (the losses and outputs then mean nothing). The values are those of the models'
``config.json`` (meta-llama/Llama-3.1-8B-Instruct and Qwen/Qwen2.5-7B-Instruct); ``TINY`` is a small stand-in of
the same architecture for checks on a CPU.
"""

from __future__ import annotations

import torch

__all__ = ["LLAMA_3_1_8B", "QWEN_2_5_7B", "TINY", "random_model"]

LLAMA_3_1_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
)
QWEN_2_5_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=131072,  # the card reaches 128K with YaRN (factor 4 over 32768); RoPE cost is the same
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def random_model(model_type: str, values: dict, device: str | torch.device, dtype: torch.dtype):
    """A ``model_type`` ("llama" or "qwen2") causal LM of config ``values`` with random weights (transformers' own
    initialisation, seed 0), made directly on ``device`` in ``dtype``, in eval mode with no gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if model_type not in classes:
        raise ValueError(f"model_type={model_type!r}: choose one of {sorted(classes)}")
    config_class, model_class = classes[model_type]
    config = config_class(**values)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)
