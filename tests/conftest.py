"""Shared fixtures: the real default model, loaded once per test session (CPU, fp32)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread per module: on a shared 2-core machine two OpenMP threads per process run ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_and_tokenizer():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct."""
    from leank_ref.models import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def model(model_and_tokenizer):
    return model_and_tokenizer[0]


@pytest.fixture(scope="session")
def tokenizer(model_and_tokenizer):
    return model_and_tokenizer[1]
