"""Test session settings: the tiny models are dominated by per-op overhead, where extra threads only spin; every
test starts with torch.compile's caches empty."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each compiling test recompiles the same model code objects for its own models; without a reset, a session of
    them exceeds dynamo's recompile limit (8 per code object) and later tests fall back or fail."""
    torch._dynamo.reset()
    yield
