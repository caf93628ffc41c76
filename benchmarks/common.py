"""Shared helpers for the benchmark scripts: environment, timing, workers, reports.

No framework is imported here: a script's framework sections import their own, inside
functions, so that a missing framework costs one skipped section, not the whole run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent

# Versions are read from package metadata, so recording them imports nothing.
PACKAGES = ("numpy", "jax", "jaxlib", "flax", "torch", "tensorflow", "tensorflow-cpu", "keras", "matplotlib")

# glibc returns large freed blocks to the kernel (mmap/trim) and per-thread arenas
# scatter them, so a benchmark that allocates a fresh 25 MB output per call can pay
# ~6,000 page faults per call, some calls and not others: measured here, that alone
# moved PyTorch's batch-256 Gabor conv between 40 and 210 GFLOP/s. Keeping freed
# memory in one arena makes steady state mean steady state; `--allocator default`
# measures what an untuned process gets.
TUNED_ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
    "MALLOC_TOP_PAD_": str(512 << 20),
}
ENV_OF_INTEREST = (
    "XLA_FLAGS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TF_ENABLE_ONEDNN_OPTS",
    "TF_NUM_INTRAOP_THREADS",
    "CUDA_VISIBLE_DEVICES",
    *TUNED_ALLOCATOR_ENV,
)


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD extensions that decide which kernels a library may pick."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))
    except OSError:
        pass
    return []


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    """The machine and process as a benchmark result needs them recorded."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "packages": package_versions(),
        "env": {k: os.environ.get(k) for k in ENV_OF_INTEREST},
        "git_commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------- timing


def summarize(samples: Sequence[float]) -> dict:
    """Median and spread of per-call times (seconds)."""
    xs = sorted(samples)
    if len(xs) >= 4:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1, q3 = xs[0], xs[-1]
    return {"median": statistics.median(xs), "iqr": q3 - q1, "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1], "n": len(xs)}


@dataclass
class Timer:
    """Times one callable that runs the computation AND waits for it (`fn` must sync).

    The first call is timed alone (compilation, autotuning, allocation), then calls
    are made until `warmup_s` has passed; a sample is the mean over enough calls to
    last `min_sample_s`, so that microsecond calls are not timer noise.
    """

    fn: Callable[[], object]
    warmup_s: float = 0.2
    min_sample_s: float = 0.02
    first_call_s: float | None = None
    inner: int = 1

    def first_call(self):
        t0 = time.perf_counter()
        out = self.fn()
        self.first_call_s = time.perf_counter() - t0
        return out

    def warm_up(self) -> None:
        calls, t0 = 0, time.perf_counter()
        while True:
            self.fn()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= self.warmup_s and calls >= 2:
                break
        per_call = elapsed / calls
        self.inner = max(1, int(self.min_sample_s / max(per_call, 1e-9)))

    def sample(self) -> dict:
        """One sample: seconds per call, and the page faults and CPU time per call
        (where the time went: first-touch of fresh memory, or cores left idle)."""
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(self.inner):
            self.fn()
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return {"s": wall / self.inner, "faults": (r1.ru_minflt - r0.ru_minflt) / self.inner, "cpu_s": cpu / self.inner}


def interleaved_raw(timers: dict[str, Timer], repeats: int) -> dict[str, list[dict]]:
    """Round-robin the candidates, so that a burst of load from elsewhere on a shared
    machine hits all of them rather than whichever was running at the time. Returns the
    raw samples ({"s", "faults", "cpu_s"} per call) of each candidate."""
    raw: dict[str, list[dict]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            raw[name].append(timer.sample())
    return raw


def interleaved_samples(timers: dict[str, Timer], repeats: int) -> dict[str, dict]:
    """`interleaved_raw`, summarised: {name: sample_stats(...) plus `inner`}."""
    return {name: {**sample_stats(samples), "inner": timers[name].inner}
            for name, samples in interleaved_raw(timers, repeats).items()}


def sample_stats(samples: Sequence[dict]) -> dict:
    """Median and spread of the seconds per call, and where the time went."""
    stats = summarize([s["s"] for s in samples])
    stats["faults_per_call"] = statistics.median(s["faults"] for s in samples)
    # CPU seconds per wall second: ~cores kept busy (low = waiting, or single-threaded)
    stats["cpu_utilisation"] = statistics.median(s["cpu_s"] / s["s"] for s in samples if s["s"] > 0)
    stats["cpu_s_per_call"] = statistics.median(s["cpu_s"] for s in samples)
    return stats


# --------------------------------------------------------------------------- workers


def run_worker(cmd: list[str], env: dict[str, str], on_line: Callable[[dict], None]) -> tuple[int, str]:
    """Run a worker that prints one JSON object per line; each is handed to `on_line`.
    Returns (exit code, the tail of stderr) so that a crash is reported, not hidden."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    stderr_lines: list[str] = []

    import threading

    def drain():
        for line in proc.stderr:
            stderr_lines.append(line)
            del stderr_lines[:-60]

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            try:
                on_line(json.loads(line))
            except json.JSONDecodeError:
                pass
    proc.wait()
    t.join(timeout=5)
    return proc.returncode, "".join(stderr_lines[-30:])


def emit(obj: dict) -> None:
    """A worker's message to its parent: one JSON object on one line of stdout."""
    sys.stdout.write(json.dumps(obj, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(x):
    try:
        return x.item()  # numpy scalars
    except AttributeError:
        return str(x)


# --------------------------------------------------------------------------- reports


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """`columns`: (header, key) pairs; values already formatted or formatted with str()."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v).replace("|", "\\|")


def progress_bar(total: int, description: str):
    """A rich progress bar, or a plain stand-in when rich is missing (said so once)."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        prog = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        )
        task = prog.add_task(description, total=total, status="")
        return _RichBar(prog, task)
    except ImportError:
        print("rich is not installed: progress is printed as plain lines", file=sys.stderr)
        return _PlainBar(total)


class _RichBar:
    def __init__(self, prog, task):
        self.prog, self.task = prog, task

    def __enter__(self):
        self.prog.start()
        return self

    def __exit__(self, *exc):
        self.prog.stop()

    def advance(self, n: int = 1, status: str = "") -> None:
        self.prog.update(self.task, advance=n, status=status)

    def log(self, msg: str) -> None:
        self.prog.console.print(msg, markup=False, highlight=False)


class _PlainBar:
    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def advance(self, n: int = 1, status: str = "") -> None:
        self.done += n
        print(f"[{self.done}/{self.total}] {status}", file=sys.stderr)

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr)
