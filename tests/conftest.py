import os

import pytest
import torch

# One intra-op thread per test process: the models here are tiny, and once an Inductor
# graph has been compiled and run in a process, its small eager ops are many times slower
# with 2 threads (measured on the 2-core CI machine: test_passes.py's TestCheckpoint, eager,
# 1.1 s alone, 12 s right after the module's Inductor fixture with 2 threads, 1.1 s with 1).
# Under pytest-xdist (`-n auto --dist loadfile`: each file in one worker, so a
# module-scoped fixture is built once) the workers fill the cores, so Inductor also
# compiles in the worker instead of starting a pool of compile processes in each.
torch.set_num_threads(1)
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles its own models; stale caches would hide recompiles
    # (or count another test's).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def gnmr_backend_aot_eager(monkeypatch):
    """``torch.compile(backend="gnmr")`` with aot_eager in place of the entry point's Inductor,
    for tests of what the entry point does before its inner compiler runs (finding the
    model and its runtime): Inductor's CPU compile costs tens of seconds on a fresh machine.
    Returns the compilers the entry point asked for, one per graph. Inductor under
    backend="gnmr" stays tested by the tests that do not take this fixture."""
    from gnmr_fx import backend

    compile_graph = backend.compile_graph
    asked = []

    def aot_eager(runtime, gm, example_inputs, compiler):
        asked.append(compiler)
        return compile_graph(runtime, gm, example_inputs, "aot_eager")

    monkeypatch.setattr(backend, "compile_graph", aot_eager)
    return asked


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs on the device machine: see benchmarks/PERF.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    # Tests of features older torch lacks (the GPU image runs torch 2.11; CI
    # runs 2.13): rowwise fp8 _scaled_mm on the CPU, and
    # torch.compile(isolate_recompiles=).
    from gnmr_fx.backends import real_kernels
    from gnmr_fx.compiled_call import ISOLATE

    params = getattr(item, "callspec", None)
    values = set(map(str, params.params.values())) if params else set()
    if "fp8_rowwise" in values and not real_kernels._CPU_ROWWISE and not torch.cuda.is_available():
        if item.originalname in ("test_real_kernels_agree", "test_low_path_is_plain_fp8_and_high_path_is_the_op",
                                 "test_real_fp8_sqnr_on_cpu"):
            pytest.skip(f"rowwise fp8 _scaled_mm on the CPU needs torch 2.13+ (this is {torch.__version__})")
    if not ISOLATE and (item.originalname == "test_two_models_of_one_class_each_get_their_runtime"
                        or (item.originalname == "test_twelve_compiles_of_one_class_all_have_units"
                            and "graph_break" in item.name)):
        pytest.skip(f"torch.compile(isolate_recompiles=) needs torch 2.13+ (this is {torch.__version__})")
