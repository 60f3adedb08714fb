"""Run telemetry (compile(..., log=PATH)) and `gnmr-fx report`."""

import contextlib
import errno
import gc
import io
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import gnmr_fx
from gnmr_fx.cli import main as cli
from gnmr_fx.benchmarks.fault_run import train_with_fault
from gnmr_fx.telemetry import TelemetryWriteError
from gnmr_fx.tools.report import load_run

STEPS, FAULT, FAULT_UNIT = 40, (24, 29), "blocks.1.fc"


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    """40 TinyGPT steps (eager), blocks.1.fc's weight gradient x30 at steps [24, 29)."""
    torch._dynamo.reset()
    path = tmp_path_factory.mktemp("tele") / "run.jsonl"
    seen = []

    def on_step(rt):
        c = rt.controller
        seen.append({"step": c.step, "plan": c.plan.clone(), "triggered": c.triggered.clone(),
                     "denied": c.denied.clone(), "used": float(c.budget_used())})

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs cost more than they save on a shared CPU
    try:
        model = train_with_fault(str(path), steps=STEPS, fault_steps=FAULT, fault_unit=FAULT_UNIT, on_step=on_step)
    finally:
        torch.set_num_threads(threads)
    return path, model, seen


@pytest.fixture(scope="module")
def report(fault_run, tmp_path_factory):
    """`gnmr-fx report RUN --out DIR` once: (exit code, stdout, DIR)."""
    out = tmp_path_factory.mktemp("report")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli(["report", str(fault_run[0]), "--out", str(out)])
    return code, buf.getvalue(), out


class TestTelemetryFile:
    def test_parses(self, fault_run):
        path, model, _ = fault_run
        lines = [json.loads(l) for l in path.read_text().splitlines()]
        header, rows = lines[0], lines[1:]
        assert header["header"] and header["units"] == gnmr_fx.controller(model).names
        assert header["recipe"] == "int8" and header["budget"] == 2.0 and header["threshold"] == 3.0
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert all(len(r["norm"]) == len(r["gnmr"]) == 13 for r in rows)
        assert all(math.isfinite(r["loss"]) for r in rows)
        run = load_run(str(path))
        assert run.norm.shape == (STEPS, 13) and np.isfinite(run.norm).all()

    def test_plan_columns_agree_with_controller(self, fault_run):
        path, model, seen = fault_run
        names = gnmr_fx.controller(model).names
        rows = [json.loads(l) for l in path.read_text().splitlines()[1:]]
        assert len(seen) == len(rows)
        for r, s in zip(rows, seen):
            assert r["step"] == s["step"]
            for k in ("plan", "triggered", "denied"):
                assert r[k] == [n for n, on in zip(names, s[k].tolist()) if on], (k, r["step"])
            assert r["budget_used"] == s["used"]
        # The last line is the controller's final state.
        assert rows[-1]["plan"] == [n for n, on in zip(names, gnmr_fx.controller(model).plan.tolist()) if on]

    def test_budget_never_exceeded(self, fault_run):
        run = load_run(str(fault_run[0]))
        assert (run.budget == 2.0).all()
        assert (run.budget_used <= run.budget).all() and (run.plan.sum(axis=1) <= 2).all()
        assert run.plan.sum() > 0  # the fault did use the budget

    def test_fault_triggers_only_its_unit(self, fault_run):
        run = load_run(str(fault_run[0]))
        i = run.units.index(FAULT_UNIT)
        trig_steps = run.steps[run.triggered[:, i]]
        # Controller step s consumes the gradients of loop step s - 1.
        assert trig_steps.tolist() == list(range(FAULT[0] + 1, FAULT[1] + 1))
        assert run.n_triggers.sum() == run.n_triggers[i]

    def test_transfers_are_batched(self, fault_run):
        writer = gnmr_fx.runtime(fault_run[1]).telemetry.writer
        # log_every=16: two full batches and the final flush, 40 lines.
        assert (writer.transfers, writer.lines_written) == (3, STEPS)


def test_flushed_when_model_is_collected(tmp_path):
    path = tmp_path / "gc.jsonl"
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cm = gnmr_fx.compile(model, gnmr_fx.GNMRConfig(recipe="int8"), backend="eager", optimizer=opt, log=str(path))
    for _ in range(3):
        cm(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert not path.exists()  # log_every=50: still buffered
    del cm, model, opt
    gc.collect()
    torch._dynamo.reset()  # Dynamo's caches hold the compiled frame (and so the runtime)
    gc.collect()
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()[1:]] == [1, 2, 3]


def test_tensorboard_scalars():
    class FakeWriter:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cm = gnmr_fx.compile(model, gnmr_fx.GNMRConfig(recipe="int8", log_every=2), backend="eager", optimizer=opt)
    rt = gnmr_fx.runtime(cm)
    tb = FakeWriter()
    rt.attach_tensorboard(tb)
    for _ in range(2):
        loss = cm(torch.randn(4, 8)).square().mean()
        loss.backward()
        rt.log_metrics(loss=loss)
        opt.step()
        opt.zero_grad()
    tags = {(t, s) for t, _, s in tb.scalars}
    assert {("gnmr/budget_used", 1), ("gnmr/units_high", 2), ("metrics/loss", 1), ("metrics/loss", 2)} <= tags
    with pytest.raises(ValueError, match="scalar"):
        rt.log_metrics(loss=torch.ones(3))


class TestReport:
    def test_summary_names_the_faulted_unit(self, report):
        code, out, _ = report
        assert code == 0
        assert f"most triggered unit: {FAULT_UNIT} (5 triggers, first at step {FAULT[0] + 1})" in out
        assert "peak budget use 1 / 2" in out and "EXCEEDED" not in out

    def test_pngs_are_not_blank(self, report):
        import matplotlib.image

        out_dir = report[2]
        names = sorted(p.name for p in out_dir.glob("*.png"))
        assert names == ["budget.png", "gnmr_traces.png", "loss.png", "plan_heatmap.png"]
        for name in names:
            img = matplotlib.image.imread(out_dir / name)[..., :3]
            colours = np.unique((img.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
            assert img.std() > 0.01 and len(colours) >= 8, name

    def test_heatmap_marks_the_faulted_row(self, report):
        # The high-path cells (dark blue) lie in one unit's row only.
        import matplotlib.image

        img = matplotlib.image.imread(report[2] / "plan_heatmap.png")[..., :3]
        dark_blue = (img[..., 2] > 0.45) & (img[..., 0] < 0.2) & (img[..., 1] < 0.5)
        rows = np.nonzero(dark_blue.any(axis=1))[0]
        assert rows.size > 0
        assert rows.max() - rows.min() + 1 == rows.size and rows.size < img.shape[0] / 13

    def test_missing_file(self, capsys, tmp_path):
        assert cli(["report", str(tmp_path / "nope.jsonl")]) == 2
        assert "No such file" in capsys.readouterr().err


def test_units_joining_mid_run_get_a_new_header(tmp_path):
    from gnmr_fx.telemetry import TelemetryWriter

    path = tmp_path / "grow.jsonl"
    w = TelemetryWriter(str(path), log_every=10)

    def step(n_units, s):
        hot = torch.zeros(n_units, dtype=torch.bool)
        hot[-1] = True
        w.append(s, {"norm": torch.full((n_units,), float(s)), "gnmr": torch.ones(n_units),
                     "delta_gnmr": torch.zeros(n_units), "plan": hot, "triggered": hot,
                     "denied": torch.zeros(n_units, dtype=torch.bool), "lock": hot.long(),
                     "budget_used": hot.sum().float()}, {})

    w.set_header({"header": True, "units": ["a", "b"], "budget": 1.0, "max_o": 1})
    step(2, 1)
    w.set_header({"header": True, "units": ["a", "b", "c"], "budget": 1.0, "max_o": 1})
    step(3, 2)
    w.close()
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert [("header" in l) for l in lines] == [True, False, True, False]
    run = load_run(str(path))
    assert run.units == ["a", "b", "c"]
    assert np.isnan(run.norm[0, 2]) and run.norm[1].tolist() == [2.0, 2.0, 2.0]
    assert run.plan.tolist() == [[False, True, False], [False, False, True]]


def _tiny(log_every=50):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, gnmr_fx.GNMRConfig(recipe="int8", log_every=log_every)


def _train_step(cm, opt):
    cm(torch.randn(4, 8)).square().mean().backward()
    try:
        opt.step()
    finally:
        opt.zero_grad()


class TestLogPathAtCompile:
    """A log path that cannot be written fails at compile time, not log_every steps in."""

    @staticmethod
    def _bad_path(tmp_path, case):
        if case == "missing_dir":
            return tmp_path / "missing" / "run.jsonl", f"{tmp_path / 'missing'} does not exist"
        if case == "parent_is_file":
            (tmp_path / "afile").write_text("")
            return tmp_path / "afile" / "run.jsonl", f"{tmp_path / 'afile'} is not a directory"
        return tmp_path, f"{tmp_path} is a directory (a file name in it, e.g. {str(tmp_path / 'run.jsonl')!r}?)"

    @pytest.mark.parametrize("entry", ["compile", "compile_blocks"])
    @pytest.mark.parametrize("case", ["missing_dir", "parent_is_file", "is_dir"])
    def test_bad_path_raises_naming_it(self, tmp_path, case, entry):
        path, problem = self._bad_path(tmp_path, case)
        model, opt, cfg = _tiny()
        want = f"GNMRConfig.log must be a file in an existing, writable directory: {problem} (got {str(path)!r})"
        with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
            if entry == "compile":
                gnmr_fx.compile(model, cfg, backend="eager", optimizer=opt, log=path)
            else:
                gnmr_fx.distributed.compile_blocks(model, [model[0]], cfg.replace(log=path), backend="eager")

    def test_torch_compile_backend_checks_it(self, tmp_path):
        path = tmp_path / "missing" / "run.jsonl"
        model = torch.compile(torch.nn.Linear(8, 2), backend="gnmr", options={"recipe": "int8", "log": str(path)})
        with pytest.raises(Exception, match=re.escape(f"{tmp_path / 'missing'} does not exist (got {str(path)!r})")):
            model(torch.randn(4, 8))

    @pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (chmod) directory")
    def test_unwritable_directory(self, tmp_path):
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        model, opt, cfg = _tiny()
        with pytest.raises(ValueError, match=re.escape(f"{ro} is not writable")):
            gnmr_fx.compile(model, cfg, backend="eager", optimizer=opt, log=ro / "run.jsonl")

    def test_good_path_creates_nothing_at_compile(self, tmp_path):
        model, opt, cfg = _tiny()
        gnmr_fx.compile(model, cfg, backend="eager", optimizer=opt, log=tmp_path / "run.jsonl")
        assert list(tmp_path.iterdir()) == []


class TestWriteFailure:
    """A write that fails after compile raises from the flushing step and keeps the lines."""

    def test_directory_removed_mid_run(self, tmp_path):
        logs = tmp_path / "logs"
        logs.mkdir()
        path = logs / "run.jsonl"
        model, opt, cfg = _tiny(log_every=2)
        cm = gnmr_fx.compile(model, cfg, backend="eager", optimizer=opt, log=path)
        rt = gnmr_fx.runtime(cm)
        for _ in range(2):
            _train_step(cm, opt)
        assert [json.loads(l).get("step") for l in path.read_text().splitlines()] == [None, 1, 2]
        shutil.rmtree(logs)
        _train_step(cm, opt)  # step 3: buffered, nothing written yet
        with pytest.raises(TelemetryWriteError) as e:
            _train_step(cm, opt)  # step 4 flushes
        assert str(e.value) == (f"gnmr_fx telemetry: cannot write {path}: No such file or directory; 2 step lines "
                                "stay buffered and the next flush retries them (gnmr_fx.runtime(model).flush())")
        assert (e.value.errno, e.value.pending, e.value.lost) == (errno.ENOENT, 2, 0)
        assert gnmr_fx.controller(cm).step == 4  # the controller step itself completed
        _train_step(cm, opt)  # step 5: buffered behind the failed batch
        logs.mkdir()
        rt.flush()
        lines = [json.loads(l) for l in path.read_text().splitlines()]
        # The re-created file starts with the header its lines refer to; no line lost or doubled.
        assert lines[0]["header"] and lines[0]["units"] == ["0", "2"]
        assert [l["step"] for l in lines[1:]] == [3, 4, 5]
        assert rt.telemetry.writer.lines_written == 5
        load_run(str(path))  # a valid run file

    @pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
    def test_disk_full(self, monkeypatch):
        model, opt, cfg = _tiny(log_every=2)
        cm = gnmr_fx.compile(model, cfg, backend="eager", optimizer=opt, log="/dev/full")
        _train_step(cm, opt)
        with pytest.raises(TelemetryWriteError, match=r"^gnmr_fx telemetry: cannot write /dev/full: "
                                                      r"No space left on device; 2 step lines stay buffered"):
            _train_step(cm, opt)
        _train_step(cm, opt)
        with pytest.raises(TelemetryWriteError, match="; 4 step lines stay buffered") as e:
            _train_step(cm, opt)
        assert e.value.errno == errno.ENOSPC
        # The runtime goes away with the disk still full: its last flush
        # reports how many lines were lost (at exit, the same message).
        reported = []
        monkeypatch.setattr(sys, "unraisablehook", reported.append)
        del cm, model, opt, e  # e's traceback holds the training step's frame
        gc.collect()
        torch._dynamo.reset()  # Dynamo's caches hold the compiled frame (and so the runtime)
        gc.collect()
        assert [str(r.exc_value) for r in reported] == [
            "gnmr_fx telemetry: cannot write /dev/full: No space left on device; 4 step lines were lost"]

    def test_close_counts_the_lines_it_loses(self, tmp_path):
        from gnmr_fx.telemetry import TelemetryWriter

        gone = tmp_path / "gone"
        w = TelemetryWriter(str(gone / "run.jsonl"), log_every=10)
        w.set_header({"header": True, "units": ["a"], "budget": 1.0, "max_o": 1})
        for s in (1, 2, 3):
            w.append(s, {"norm": torch.ones(1), "gnmr": torch.ones(1), "delta_gnmr": torch.zeros(1),
                         "plan": torch.zeros(1, dtype=torch.bool), "triggered": torch.zeros(1, dtype=torch.bool),
                         "denied": torch.zeros(1, dtype=torch.bool), "lock": torch.zeros(1, dtype=torch.long),
                         "budget_used": torch.zeros(())}, {})
        with pytest.raises(TelemetryWriteError, match=r"No such file or directory; 3 step lines were lost$") as e:
            w.close()  # what weakref.finalize runs at exit: nothing can retry after it
        assert (e.value.pending, e.value.lost) == (0, 3)
        w.close()  # nothing left: no second report
