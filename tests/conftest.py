"""Shared fixtures: tiny random models of every family, saved as real checkpoint directories."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moetrim.assets.tiny import FAMILIES, save_tiny, tiny_model  # noqa: E402

torch.set_num_threads(int(os.environ.get("MOETRIM_TEST_THREADS", "2")))  # 1 beside a background job: two threads on a busy 2-core machine spin


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of a saved tiny checkpoint (config, safetensors, tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def calib_ids():
    return torch.randint(0, 127, (4, 32), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory):
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran over green hills and rivers flow into the sea".split()
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(6))
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(text)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def fresh_model():
    return lambda family, **kw: tiny_model(family, **kw)
