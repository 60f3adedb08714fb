"""Run telemetry: the JSON-lines writer behind ``gnmr_fx.compile(..., log=PATH)``.

:class:`Telemetry` is the runtime's step callback: after every controller
update it buffers the step's state (device tensors, no host sync) in a
:class:`TelemetryWriter`. ``gnmr-fx report RUN.jsonl`` reads the file
(``gnmr_fx.tools.report``).

File format (one JSON object per line):

* a *header* line ``{"header": true, "units": [...], "recipe": ..., "budget":
  ..., "costs": [...], "threshold": ..., ...}`` at the start of a run and
  again whenever units join (a new graph was captured);
* one line per optimizer step: ``step``, per-unit ``norm`` / ``gnmr`` /
  ``delta_gnmr`` lists in header order (``null`` = the unit did not run that
  step, ``"inf"`` = non-finite), ``plan`` / ``triggered`` / ``denied`` as
  lists of unit names, ``budget_used`` and ``budget``, and any scalars
  logged with ``runtime.log_metrics`` (e.g. ``loss``).

The writer keeps device tensors until ``log_every`` steps are buffered, then
moves the whole batch to the host in a single transfer. A failed write (disk
full, directory removed) raises :class:`TelemetryWriteError` from the step
that flushes; the lines stay buffered and the next flush writes them first.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from gnmr_fx.runtime import GNMRRuntime

VECTORS = ("norm", "gnmr", "delta_gnmr")
"""Per-unit numbers of a step line, in header order."""
MASKS = ("plan", "triggered", "denied")
"""Per-unit flags of a step line, as lists of unit names."""


class TelemetryWriteError(OSError):
    """Telemetry lines could not be written to the log file.

    ``pending`` is the number of step lines still buffered (written by the
    next flush), ``lost`` the number dropped (only when the writer closes).
    """

    def __init__(self, path: str, cause: OSError, pending: int, lost: int) -> None:
        what = (f"{lost} step lines were lost" if lost else
                f"{pending} step lines stay buffered and the next flush retries them "
                "(gnmr_fx.runtime(model).flush())")
        super().__init__(f"gnmr_fx telemetry: cannot write {path}: {cause.strerror or cause}; {what}")
        self.errno, self.path = cause.errno, path
        self.pending = pending
        self.lost = lost


class TelemetryWriter:
    """Buffers per-step device tensors and writes JSON lines in batches.

    Holds no reference to the runtime, so ``weakref.finalize`` can flush it
    when the runtime is collected or the interpreter exits.
    """

    def __init__(self, path: Optional[str], log_every: int, tensorboard: Any = None) -> None:
        self.path = path
        self.log_every = int(log_every)
        self.tensorboard = tensorboard
        self.rows: list[tuple[int, dict, dict, dict]] = []  # (step, tensors, metrics, header)
        self.header: Optional[dict] = None
        self._written_header: Optional[dict] = None
        # Lines on the host not yet in the file (a write failed), oldest first:
        # (the header they belong to, whether the line is that header, JSON text).
        self._unwritten: list[tuple[dict, bool, str]] = []
        self._unwritten_steps = 0
        self.lines_written = 0
        self.transfers = 0  # device-to-host copies made (tests assert the batching)

    @property
    def n_units(self) -> int:
        return -1 if self.header is None else len(self.header["units"])

    def set_header(self, header: dict) -> None:
        self.header = header

    def append(self, step: int, tensors: dict, metrics: dict) -> None:
        # Clones: the controller replaces its tensors each step, but a later
        # in-place write (set_plan) must not change a buffered line.
        snap = {k: v.detach().clone() for k, v in tensors.items()}
        self.rows.append((step, snap, dict(metrics), self.header))
        if len(self.rows) >= self.log_every:
            self.flush()

    def flush(self) -> None:
        """Write every buffered line; raises :class:`TelemetryWriteError`
        (the lines stay buffered) if the file cannot be written."""
        if self.rows:
            self._to_host()
        self._write()

    def _to_host(self) -> None:
        batch, self.rows = self.rows, []
        # Everything in the batch goes into one flat float vector: one
        # device-to-host transfer per batch, whatever the number of keys.
        parts, layout = [], []
        dev, offset = None, 0
        for step, tens, metrics, header in batch:
            entry = {}
            for k, v in tens.items():
                entry[k] = (offset, v.numel())
                offset += v.numel()
                dev = dev or v.device
                parts.append(v.reshape(-1).float())
            for k, v in metrics.items():
                if isinstance(v, torch.Tensor):
                    entry["metric:" + k] = (offset, 1)
                    offset += 1
                    parts.append(v.reshape(1).float())
            layout.append(entry)
        flat = torch.cat([p.to(dev) for p in parts]).cpu().tolist() if parts else []
        self.transfers += 1
        lines, owners = [], []
        for (step, tens, metrics, header), entry in zip(batch, layout):
            if header is not self._written_header:
                lines.append(header)
                owners.append(header)
                self._written_header = header
            names = header["units"]
            row: dict[str, Any] = {"step": step}

            def get(k: str) -> list:
                off, n = entry[k]
                return flat[off: off + n]

            for k in VECTORS:
                row[k] = [json_float(x) for x in get(k)]
            for k in MASKS:
                row[k] = [names[i] for i, x in enumerate(get(k)) if x]
            row["lock"] = {names[i]: int(x) for i, x in enumerate(get("lock")) if x}
            row["budget_used"] = get("budget_used")[0]
            row["budget"] = header["budget"]
            for k, v in metrics.items():
                row[k] = json_float(get("metric:" + k)[0] if isinstance(v, torch.Tensor) else v)
            lines.append(row)
            owners.append(header)
        steps = sum(1 for r in lines if "header" not in r)
        if self.tensorboard is not None:
            _to_tensorboard(self.tensorboard, [r for r in lines if "header" not in r])
        if self.path is None:
            self.lines_written += steps
            return
        self._unwritten.extend((h, line is h, json.dumps(line) + "\n") for h, line in zip(owners, lines))
        self._unwritten_steps += steps

    def _write(self) -> None:
        if not self._unwritten:
            return
        # Opened per batch, not kept open: writes to a kept descriptor would
        # still "succeed" after the directory is removed, into a file nobody
        # can read. O_APPEND plus truncating back on failure keeps a partial
        # write (disk full) from leaving half a line for the next batch.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise TelemetryWriteError(self.path, e, self._unwritten_steps, 0) from e
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            start = None  # a pipe: nothing to truncate, no file start to find
        try:
            header, is_header, _ = self._unwritten[0]
            # A new or emptied file (the directory was re-created, the log
            # rotated) starts with the header its step lines refer to.
            first = [json.dumps(header) + "\n"] if start == 0 and not is_header else []
            data = "".join(first + [text for _, _, text in self._unwritten]).encode("utf-8")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            try:
                if start is not None:
                    os.ftruncate(fd, start)
            except OSError:
                pass  # a device such as /dev/full cannot be truncated; nothing was kept there
            raise TelemetryWriteError(self.path, e, self._unwritten_steps, 0) from e
        finally:
            os.close(fd)
        self.lines_written += self._unwritten_steps
        self._unwritten, self._unwritten_steps = [], 0

    def close(self) -> None:
        """Flush; lines that still cannot be written are dropped and counted
        in the error (this runs at interpreter exit, where nothing can retry)."""
        try:
            self.flush()
        except TelemetryWriteError as e:
            lost, self._unwritten, self._unwritten_steps = self._unwritten_steps, [], 0
            raise TelemetryWriteError(self.path, e.__cause__, 0, lost) from e.__cause__


def _to_tensorboard(writer: Any, rows: list[dict]) -> None:
    for row in rows:
        step = row["step"]
        writer.add_scalar("gnmr/budget_used", row["budget_used"], step)
        writer.add_scalar("gnmr/units_high", len(row["plan"]), step)
        writer.add_scalar("gnmr/triggered", len(row["triggered"]), step)
        writer.add_scalar("gnmr/denied", len(row["denied"]), step)
        for k, v in row.items():
            if k not in ("step", "budget", "budget_used", "lock", *VECTORS, *MASKS) and isinstance(v, (int, float)):
                writer.add_scalar(f"metrics/{k}", v, step)


def json_float(v: float) -> Any:
    """JSON has no NaN/inf: NaN (unit did not run) -> null, inf -> "inf"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


class Telemetry:
    """The runtime's step callback that logs each controller update.

    Owns the :class:`TelemetryWriter`, the scalars logged for the coming step
    (``GNMRRuntime.log_metrics``) and the header of the current unit set. The
    runtime creates it when ``GNMRConfig.log`` is set or a TensorBoard writer
    is attached, and calls :meth:`record` after every update, before the
    user's callbacks (which may force another plan).
    """

    def __init__(self, path: Optional[str], log_every: int, tensorboard: Any = None) -> None:
        self.writer = TelemetryWriter(path, log_every, tensorboard)
        self.pending: dict[str, Any] = {}

    def log_metrics(self, **scalars: Any) -> None:
        for k, v in scalars.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"log_metrics: {k} must be a scalar, got shape {tuple(v.shape)}")
                self.pending[k] = v.detach().reshape(()).float()
            else:
                self.pending[k] = float(v)

    def record(self, runtime: "GNMRRuntime", norms: torch.Tensor) -> None:
        """Buffer this step's line: ``norms`` (every unit's gradient norm) and
        the controller's state after the update (no host sync)."""
        ctl = runtime.controller
        if self.writer.n_units != ctl.num_units:
            # Units joined (a new graph): a new header line. Rare, so the one
            # sync reading the costs here is not a per-step cost.
            self.writer.set_header(run_header(runtime))
        metrics, self.pending = self.pending, {}
        self.writer.append(ctl.step, {
            "norm": norms,
            "gnmr": ctl.gnmr,
            "delta_gnmr": ctl.delta_gnmr,
            "plan": ctl.plan,
            "triggered": ctl.triggered,
            "denied": ctl.denied,
            "lock": ctl.lock,
            "budget_used": ctl.budget_used(),
        }, metrics)

    def flush(self) -> None:
        self.writer.flush()


def run_header(runtime: "GNMRRuntime") -> dict:
    """The header line of a run: its units, costs and controller settings."""
    cfg, ctl = runtime.config, runtime.controller
    return {
        "header": True, "units": list(ctl.names), "recipe": cfg.recipe, "policy": cfg.policy,
        "high_path": cfg.high_path, "max_o": cfg.max_o, "budget": ctl.budget,
        "costs": ctl.costs.cpu().tolist(), "threshold": cfg.threshold,
        "delta_threshold": cfg.delta_threshold, "warmup_steps": cfg.warmup_steps,
        "lock_steps": cfg.lock_steps, "log_every": cfg.log_every,
    }
