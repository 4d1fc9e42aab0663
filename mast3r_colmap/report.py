"""The run report: what a run did, with which settings and software, how long each stage took and what
came out, as one JSON file (``report.json``) that is written also when the run fails.

:class:`RunReport` collects; the pipeline and the command line fill it:

* ``stage(name)`` times a stage (wall time; a stage entered twice adds up) and, when it raises, records
  the failure (exception type, message and stage) before the exception goes on;
* ``update_settings`` / ``set_counts`` / ``set_histogram`` / ``set_model`` set the values;
* ``write(path)`` writes the JSON atomically (strict JSON: no NaN or infinity).

The file (``format`` 1)::

    tool, format, status ("ok", "failed", or "running" while unfinished), error (null or {type, message, stage}),
    command (the command line), started / finished (UTC, ISO 8601), total_s,
    settings (the resolved settings of the run), versions (package, python, numpy, torch, pycolmap, CUDA,
    device name), stages ({name: {seconds, status}} in the order first entered), counts (numbers of images,
    pairs, encoder runs, pairs/s, ...), histograms ({name: see histogram()}), model (mapping.summary of the
    model, or null), resources (peak_host_ram_mib, peak_gpu_memory_mib)

Resources: the peak resident memory of the process (``getrusage``; the whole process's life, so what the
caller did before the run counts too) and, only when CUDA was used (torch already imported and CUDA
initialised), torch's peak allocated GPU memory. Neither torch nor pycolmap is ever imported here just for
the report: versions of packages not loaded come from their installed metadata.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from . import __version__
from .utils import atomic_write_text

__all__ = ["HISTOGRAM_EDGES", "REPORT_FILE", "RunReport", "histogram", "jsonable", "peak_resources",
           "report_beside_database", "versions"]

#: Name of the report file in a model folder.
REPORT_FILE = "report.json"


def report_beside_database(database: str | os.PathLike) -> Path:
    """``DATABASE.report.json``: the report of a run that made no model (``--mapper none``); a run with a model
    writes :data:`REPORT_FILE` into the model folder."""
    database = Path(database)
    return database.with_name(database.name + ".report.json")


#: Lower edges of the histogram bins; the last bin has no upper end.
HISTOGRAM_EDGES = (0, 1, 10, 30, 100, 300, 1000, 3000, 10000, 30000)
_FORMAT = 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON values: mappings (keys as strings), sequences, paths and enums as strings,
    numpy scalars and arrays as numbers and lists, dataclasses and pycolmap options (``todict()``) as
    dicts, non-finite floats as None; anything else as its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return jsonable(value.tolist())
    if hasattr(value, "todict") and callable(value.todict):  # pycolmap option objects
        try:
            return jsonable(value.todict())
        except Exception:  # noqa: BLE001 - a todict that fails: fall back to the repr
            pass
    if hasattr(value, "name") and type(value).__module__.startswith("pycolmap"):  # pycolmap enums
        return str(value.name)
    return repr(value)


def _number(value: Any) -> int | float:
    """An int for integral values (counts stay ints in the JSON), else a float."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, (bool, int)) or float(value).is_integer() else float(value)


def histogram(values: Iterable[float], edges: Sequence[float] = HISTOGRAM_EDGES) -> Dict[str, Any]:
    """Counts of ``values`` in fixed bins, with their count, min, median, mean and max.

    ``counts[i]`` is the number of values ``v`` with ``edges[i] <= v < edges[i + 1]``; the last bin has no
    upper end. Raises ValueError for edges that do not increase or a value below ``edges[0]``.
    """
    edges = [float(e) for e in edges]
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"histogram edges must increase, got {edges}")
    values = sorted(_number(v) for v in values)
    if values and values[0] < edges[0]:
        raise ValueError(f"value {values[0]} is below the first histogram edge {edges[0]}")
    counts = [0] * len(edges)
    i = 0
    for v in values:
        while i + 1 < len(edges) and v >= edges[i + 1]:
            i += 1
        counts[i] += 1
    n = len(values)
    median = None
    if n:
        median = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    return {"edges": [int(e) if e.is_integer() else e for e in edges], "counts": counts, "count": n,
            "min": values[0] if n else None, "median": median, "mean": sum(values) / n if n else None,
            "max": values[-1] if n else None}


def _package_version(name: str) -> Optional[str]:
    module = sys.modules.get(name)
    version = getattr(module, "__version__", None) if module is not None else None
    if version is not None:
        return str(version)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_used() -> bool:
    """True when torch is loaded and CUDA was initialised in this process (never imports torch)."""
    torch = sys.modules.get("torch")
    try:
        return torch is not None and bool(torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a broken or partial torch: no CUDA numbers
        return False


def versions() -> Dict[str, Optional[str]]:
    """Versions of the package, Python, numpy, torch, pycolmap and CUDA, and the device name (the CUDA
    device when CUDA was used, else the CPU architecture)."""
    out: Dict[str, Optional[str]] = {
        "mast3r_colmap": __version__,
        "python": platform.python_version(),
        "numpy": _package_version("numpy"),
        "torch": _package_version("torch"),
        "pycolmap": _package_version("pycolmap"),
        "cuda": None,
        "platform": platform.platform(),
        "device": f"cpu ({platform.machine() or 'unknown'})",
    }
    torch = sys.modules.get("torch")
    if torch is not None:  # the build's own version names the variant ("2.14.1+cu130"); metadata may not
        out["torch"] = str(getattr(torch, "__version__", out["torch"]))
        out["cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    if _cuda_used():
        try:
            out["device"] = str(torch.cuda.get_device_name())
        except Exception:  # noqa: BLE001
            pass
    return out


def peak_resources() -> Dict[str, Optional[float]]:
    """``peak_host_ram_mib``: the peak resident memory of this process so far; ``peak_gpu_memory_mib``:
    torch's peak allocated CUDA memory of the current device, None unless CUDA was used."""
    out: Dict[str, Optional[float]] = {"peak_host_ram_mib": None, "peak_gpu_memory_mib": None}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["peak_host_ram_mib"] = round(rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)
    except (ImportError, OSError):  # not on a Unix
        pass
    if _cuda_used():
        try:
            out["peak_gpu_memory_mib"] = round(sys.modules["torch"].cuda.max_memory_allocated() / 2 ** 20, 1)
        except Exception:  # noqa: BLE001
            pass
    return out


class RunReport:
    """Collects the report of one run (see the module docstring) and writes it as JSON.

    Cheap to make and to fill; versions and resources are read when the report is written.
    """

    def __init__(self, command: Optional[Sequence[str]] = None, settings: Optional[Mapping[str, Any]] = None):
        self.command: List[str] = [str(c) for c in (sys.argv if command is None else command)]
        self.settings: Dict[str, Any] = dict(settings or {})
        self.stages: Dict[str, Dict[str, Any]] = {}
        self.counts: Dict[str, Any] = {}
        self.histograms: Dict[str, Dict[str, Any]] = {}
        self.model: Optional[Dict[str, Any]] = None
        self.error: Optional[Dict[str, Any]] = None
        self.started = _now()
        self.finished: Optional[str] = None
        self._t0 = time.perf_counter()
        self._total: Optional[float] = None
        self._failed_exc: Optional[BaseException] = None

    # ---- collecting ----------------------------------------------------------------------------

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (adding to earlier blocks of that name). An exception from
        the block is recorded (:meth:`fail`) with this stage, unless an inner stage recorded it first,
        and raised again."""
        entry = self.stages.setdefault(name, {"seconds": 0.0, "status": "running"})
        entry["status"] = "running"
        start = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            entry["status"] = "failed"
            self.fail(exc, stage=name)
            raise
        else:
            if entry["status"] == "running":  # not marked failed inside the block (record_error)
                entry["status"] = "ok"
        finally:
            entry["seconds"] += time.perf_counter() - start

    def entered(self, name: str) -> bool:
        """Whether stage ``name`` was entered."""
        return name in self.stages

    def seconds(self, name: str) -> float:
        """Wall time of stage ``name`` so far (0 if never entered)."""
        return float(self.stages.get(name, {}).get("seconds", 0.0))

    def fail(self, exc: BaseException, stage: Optional[str] = None) -> None:
        """Record ``exc`` as the run's error (its type and message; ``"interrupted"`` for Ctrl-C). The
        first exception recorded is kept: the same exception seen again by an outer stage changes nothing."""
        if self._failed_exc is exc:
            return
        self._failed_exc = exc
        message = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        self.record_error(type(exc).__name__, message, stage)

    def record_error(self, kind: str, message: str, stage: Optional[str] = None) -> None:
        """Record an error that is not an exception (e.g. a mapper that made no model); the stage, if
        given and entered, is marked failed. The run's status becomes ``failed``."""
        if self.error is None:
            self.error = {"type": kind, "message": message, "stage": stage}
        if stage is not None and stage in self.stages:
            self.stages[stage]["status"] = "failed"

    def update_settings(self, settings: Optional[Mapping[str, Any]] = None, **more: Any) -> None:
        """Add or replace settings (any values; written through :func:`jsonable`)."""
        self.settings.update(settings or {}, **more)

    def set_counts(self, **counts: Any) -> None:
        """Add or replace counters (numbers of images, pairs, encoder runs, rates, ...)."""
        self.counts.update(counts)

    def set_histogram(self, name: str, values: Iterable[float], edges: Sequence[float] = HISTOGRAM_EDGES) -> None:
        """Set histogram ``name`` of ``values`` (see :func:`histogram`)."""
        self.histograms[name] = histogram(values, edges)

    def set_model(self, summary: Optional[Mapping[str, Any]]) -> None:
        """The model's numbers (``mapping.summary``), or None for no model."""
        self.model = dict(summary) if summary is not None else None

    def finish(self) -> None:
        """Stop the clock (the first call counts); the status is then ``ok`` or ``failed``."""
        if self._total is None:
            self._total = time.perf_counter() - self._t0
            self.finished = _now()

    # ---- output ---------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "running" if self._total is None else "ok"

    def to_dict(self) -> Dict[str, Any]:
        """The report as plain JSON values (versions and resources read now)."""
        total = self._total if self._total is not None else time.perf_counter() - self._t0
        return jsonable({
            "tool": "mast3r-colmap",
            "format": _FORMAT,
            "status": self.status,
            "error": self.error,
            "command": self.command,
            "started": self.started,
            "finished": self.finished,
            "total_s": total,
            "settings": self.settings,
            "versions": versions(),
            "stages": {name: {"seconds": e["seconds"], "status": e["status"]} for name, e in self.stages.items()},
            "counts": self.counts,
            "histograms": self.histograms,
            "model": self.model,
            "resources": peak_resources(),
        })

    def write(self, path: str | os.PathLike) -> Path:
        """Write the report to ``path`` atomically (the folder must exist); returns the path."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False, ensure_ascii=False)
        return atomic_write_text(path, text + "\n")
