import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles its own models; stale caches would hide recompiles
    # (or count another test's).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs on the device machine: see benchmarks/PERF.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
