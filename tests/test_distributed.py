"""GNMR under data parallelism on 2 gloo ranks (CPU), plus the single-process API checks.

The module fixture starts two ranks (``tests/_dist_worker.py``) and, while
they run, the single-process references. Each rank trains DDP (both wrapping
orders), FSDP2 (root-only ``fully_shard`` + ``gnmr_fx.compile``) and FSDP2 in
the torchtitan order (``compile_blocks`` + per-block ``fully_shard``) for
``STEPS`` steps, with rank 1's inputs blown up at ``FAULT_STEP``.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import math
import os
import pathlib
import re
import socket
import subprocess
import sys
import warnings

import pytest
import torch

import _dist_worker as W
import gnmr_fx
import gnmr_fx.distributed
from gnmr_fx.models import GPTConfig, TinyGPT

WORLD = 2
SCENARIOS = ("ddp", "ddp_of_compiled", "fsdp_root", "fsdp_blocks")
REFERENCE_OF = {"ddp": "whole", "ddp_of_compiled": "whole", "fsdp_root": "whole", "fsdp_blocks": "blocks"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [open(out / f"log{r}.txt", "w") for r in range(WORLD)]
    procs = [
        subprocess.Popen([sys.executable, W.__file__, str(r), str(WORLD), str(port), str(out)],
                         stdout=logs[r], stderr=subprocess.STDOUT, env=env)
        for r in range(WORLD)
    ]
    try:
        refs = {k: W.reference(k, WORLD) for k in ("whole", "blocks")}
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    for r, p in enumerate(procs):
        if p.returncode != 0:
            pytest.fail(f"rank {r} exited with {p.returncode}:\n{(out / f'log{r}.txt').read_text()[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return ranks, refs


def _close(a: list, b: list, rtol: float) -> bool:
    return all(math.isclose(x, y, rel_tol=rtol, abs_tol=1e-7) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("scenario", SCENARIOS)
class TestDataParallel:
    def test_every_rank_has_the_same_plan_and_norms(self, runs, scenario):
        ranks, _ = runs
        r0, r1 = ranks[0][scenario], ranks[1][scenario]
        assert r0["names"] == r1["names"]
        assert len(r0["steps"]) == W.STEPS
        for s, (a, b) in enumerate(zip(r0["steps"], r1["steps"], strict=True)):
            # Exact: every rank updates the controller from the same reduced vector.
            assert a == b, f"step {s}: ranks disagree"

    def test_fault_on_one_rank_moves_units_within_budget(self, runs, scenario):
        steps = runs[0][0][scenario]["steps"]
        assert not any(any(st["plan"]) for st in steps[: W.FAULT_STEP])
        hit = steps[W.FAULT_STEP]
        assert sum(hit["plan"]) == W.CONFIG.max_o  # budget full ...
        assert sum(hit["denied"]) >= 1  # ... and a second triggered unit denied
        assert not any(steps[W.FAULT_STEP + W.CONFIG.lock_steps]["plan"])  # lock expired

    def test_all_low_steps_run_the_all_low_copy(self, runs, scenario):
        # A step's forward reads the plan of the step before (the first: the
        # initial, all-low one). On all-low steps every graph ran its copy; on
        # the steps with a unit high at least one graph ran its dual-path graph.
        steps = runs[0][0][scenario]["steps"]
        calls = [st["low_graph_calls"] for st in steps]
        ran = [b - a for a, b in zip([0] + calls, calls)]
        all_low = [True] + [not any(st["plan"]) for st in steps[:-1]]
        every = ran[0]
        assert every >= 1 and all(n == every for n, low in zip(ran, all_low) if low), ran
        assert any(not low for low in all_low)  # the fault put units high
        assert all(n < every for n, low in zip(ran, all_low) if not low), (ran, all_low)

    def test_equals_single_process_on_the_same_global_batch(self, runs, scenario):
        ranks, refs = runs
        got, ref = ranks[0][scenario], refs[REFERENCE_OF[scenario]]
        # DDP roots the unit names at the wrapper (module.*).
        assert [n.removeprefix("module.") for n in got["names"]] == ref["names"]
        for s, (a, b) in enumerate(zip(got["steps"], ref["steps"], strict=True)):
            assert a["plan"] == b["plan"], f"step {s}"
            assert a["denied"] == b["denied"], f"step {s}"
            assert _close(a["norm"], b["norm"], rtol=1e-4), f"step {s}: {a['norm']} vs {b['norm']}"


def test_ddp_reduces_once_over_two_graphs(runs):
    ddp = runs[0][0]["ddp"]
    assert ddp["graphs"] == 2  # the graph break in Net.forward
    assert ddp["dp_scale"] == 1.0 / WORLD**2
    assert runs[0][0]["ddp_of_compiled"]["graphs"] == 2


def test_dcp_round_trip_resumes_the_identical_plan_sequence(runs):
    got = runs[0][0]["fsdp_blocks"]
    assert got["sharded"]  # the checkpoint really held DTensor shards
    assert "_gnmr.names" in got["gnmr_keys"] and "_gnmr.hist" in got["gnmr_keys"]
    res = got["resumed"]
    assert res["names"] == got["names"]
    assert res["step"] == W.SAVE_AFTER + 1
    assert res["plan"] == got["steps"][W.SAVE_AFTER]["plan"]
    after = got["steps"][W.SAVE_AFTER + 1:]
    assert [s["plan"] for s in res["steps"]] == [s["plan"] for s in after]
    assert any(any(s["plan"]) for s in res["steps"])  # the resumed run saw the fault
    for a, b in zip(res["steps"], after, strict=True):
        assert _close(a["norm"], b["norm"], rtol=1e-6)


@pytest.mark.parametrize("scenario", [sc[0] for sc in W.SEQUENTIAL])
def test_sequential_under_ddp_and_fsdp2_has_units(runs, scenario):
    # An nn.Sequential has no forward of its own for Dynamo to compile: under
    # DDP (whose forward graph-breaks) and root-only fully_shard (whose
    # pre-forward hook does) it had 0 units and the controller never stepped.
    ranks, _ = runs
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert r0["names"] == ["0", "2", "4"]
    assert r0["step"] == W.SEQ_STEPS and len(r0["steps"]) == W.SEQ_STEPS
    assert r0["steps"] == r1["steps"]  # the same reduced statistics on both ranks
    # DDPOptimizer splits the graph at 1 MiB bucket boundaries: the 1 MiB
    # middle Linear fills one bucket, the two small ones share the other.
    assert r0["graphs"] == (2 if scenario == "ddp_seq_split" else 1)


def test_ranks_refuse_to_decide_alone(runs):
    err = runs[0][0]["unreduced_error"]
    assert err is not None and "gnmr_fx.distributed.enable(model)" in err


# ------------------------------------------------------- single-process API
def test_compile_blocks_gives_each_block_its_own_graph_and_units():
    model = TinyGPT(GPTConfig(n_layer=3, n_embd=16, block_size=8))
    rt = gnmr_fx.distributed.compile_blocks(model, model.blocks, gnmr_fx.GNMRConfig(recipe="int8"), backend="eager")
    idx = torch.randint(0, 256, (2, 8))
    model(idx, idx).backward()
    assert len(rt.records) == 3
    per_block = ("attn.qkv", "attn.matmul", "attn.matmul_1", "attn.proj", "fc", "out")
    assert rt.unit_names == [f"blocks.{i}.{u}" for i in range(3) for u in per_block]
    assert gnmr_fx.runtime(model) is rt
    keys = model.state_dict().keys()
    assert "blocks.0.fc.weight" in keys and "_gnmr.names" in keys  # compiled in place: no _orig_mod
    assert rt.controller.step == 1


def test_compile_blocks_rejects_bad_blocks():
    model = TinyGPT(GPTConfig(n_layer=2, n_embd=16, block_size=8))
    cfg = gnmr_fx.GNMRConfig(recipe="int8")
    with pytest.raises(ValueError, match=r"blocks\[0\] is not a submodule"):
        gnmr_fx.distributed.compile_blocks(model, [torch.nn.Linear(2, 2)], cfg)
    with pytest.raises(ValueError, match="blocks is empty"):
        gnmr_fx.distributed.compile_blocks(model, [], cfg)


def test_compile_blocks_is_not_limited_by_the_recompile_limit():
    # Each block compiles in its own Dynamo cache: with recompile_limit=1 all
    # four blocks still get their graph (before: blocks past the limit ran
    # without GNMR, or compile_blocks refused).
    model = TinyGPT(GPTConfig(n_layer=4, n_embd=16, block_size=8))
    with torch._dynamo.config.patch(recompile_limit=1):
        rt = gnmr_fx.distributed.compile_blocks(model, model.blocks, gnmr_fx.GNMRConfig(recipe="int8"),
                                                backend="eager")
        idx = torch.randint(0, 256, (2, 8))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(idx, idx).backward()
    # The embedding and the head are outside the blocks by design: not reported as missed.
    assert not [w for w in caught if "never entered a GNMR graph" in str(w.message)]
    assert len(rt.records) == 4
    assert [n for n in rt.unit_names if n.endswith(".fc")] == [f"blocks.{i}.fc" for i in range(4)]
    assert rt.controller.step == 1


def test_enable_needs_an_initialized_process_group():
    model = gnmr_fx.compile(torch.nn.Linear(4, 4), gnmr_fx.GNMRConfig(recipe="int8"), backend="eager")
    with pytest.raises(RuntimeError, match="init_process_group"):
        gnmr_fx.distributed.enable(model)


def test_docstring_examples():
    result = doctest.testmod(gnmr_fx.distributed, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0


def test_docs_example_runs_under_torchrun(tmp_path):
    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "multi_gpu.md"
    block = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)[0]
    script = tmp_path / "train_fsdp.py"
    script.write_text(block)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "same plans on every rank: True" in out.stdout, out.stdout
    assert "GNMR step 8: " in out.stdout
    assert (tmp_path / "ckpt_gnmr" / ".metadata").exists()


def _run_benchmark_script(script: str, *args: str) -> None:
    """``torchrun --nproc_per_node=2 benchmarks/<script> <args>`` on gloo; asserts it exits 0."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / script
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(path), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, f"stdout: {out.stdout[-2000:]}\nstderr: {out.stderr[-6000:]}"


def test_dist_check_harness_tiny(tmp_path):
    _run_benchmark_script("dist_check.py", "--out", str(tmp_path), "--check-compiler", "eager",
                          "--recipe", "int8", "--compiler", "eager", "--layers", "1", "--dim", "32", "--heads", "4",
                          "--seq", "16", "--batch", "2", "--warmup", "1", "--steps", "1")
    res = json.loads((tmp_path / "dist_check.json").read_text())
    c = res["consistency"]
    assert c["identical_on_all_ranks"] and c["equals_single_process"] and c["plan_changed_by_fault"]
    assert c["plans"][W.FAULT_STEP] != [] and c["plans"][: W.FAULT_STEP] == [[]] * W.FAULT_STEP
    assert [r["arm"] for r in res["throughput"]] == ["bf16", "fp8_gnmr"]
    assert all(r["tokens_per_s"] > 0 for r in res["throughput"])
    assert res["throughput"][1]["units"] == 6  # one block: qkv, 2 attention matmuls, proj, fc, out


def test_dist_perf_harness_tiny(tmp_path):
    # The multi-GPU issue's script on 2 gloo ranks: torchtitan order, the GNMR
    # arms on real kernels (torch's CPU _scaled_mm), torchao reported when absent.
    _run_benchmark_script("dist_perf.py", "--out", str(tmp_path), "--size", "tiny",
                          "--arms", "bf16,torchao,gnmr,pin@10%", "--compiler", "eager", "--check-compiler", "eager",
                          "--kernels", "real", "--steps", "1", "--rounds", "1", "--warmup", "0")
    res = json.loads((tmp_path / "dist_perf.json").read_text())
    c = res["consistency"]
    assert c["identical_on_all_ranks"] and c["equals_single_process"] and c["plan_changed_by_fault"]
    t = res["throughput"]
    rows = {r["arm"]: r for r in t["rows"]}
    torchao_missing = importlib.util.find_spec("torchao") is None
    assert set(rows) == {"bf16", "gnmr", "pin@10%"} | (set() if torchao_missing else {"torchao"})
    assert ("torchao" in t["not_run"]) == torchao_missing
    assert all(r["tokens_per_s_per_gpu"] > 0 and r["recompiles"] == 0 for r in rows.values())
    assert rows["gnmr"]["units"] == 14 and rows["gnmr"]["kernels"] == ["fp8_e4m3:tensorwise"]
    assert rows["gnmr"]["high_flops"] == 0.0 and 0.0 < rows["pin@10%"]["high_flops"] <= 0.10
    assert "| pin@10%" in (tmp_path / "dist_perf.md").read_text()


def test_enable_scales_the_reduced_statistics_by_the_divide_factor():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        cfg = gnmr_fx.GNMRConfig(recipe="int8")
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        norms = {}
        for factor in (None, 4.0):
            torch.manual_seed(0)
            model = gnmr_fx.compile(torch.nn.Linear(4, 4), cfg, backend="eager")
            rt = gnmr_fx.distributed.enable(model, grad_divide_factor=factor)
            assert rt.dp_scale == (1.0 if factor is None else 1.0 / 16)
            model(x).square().sum().backward()  # one step: the all_reduce over a world of 1
            norms[factor] = rt.controller.norm.item()
        assert norms[4.0] == norms[None] / 4  # 1 / factor^2 on the squared norm, exact for powers of 2
        with pytest.raises(ValueError, match="grad_divide_factor must be > 0"):
            gnmr_fx.distributed.enable(model, grad_divide_factor=0)
    finally:
        dist.destroy_process_group()
