"""What the benchmarks share to time optimisation profiles (``--profile``): choosing them, timing a row with its first
call (compile warm-up) apart from the steady state, dynamo counters, ratios, and the table.

A ``--profile`` value is a name of configs/models.yaml (``quality``, ``fast``, ``fastest``, ``low-memory`` ...),
repeatable or comma-separated; ``<name>:no-step-cache`` is that profile without its step cache. Random weights make a
step cache's skips meaningless (whether a step is skipped depends on how much the first block's output changes,
which random weights do not model), so the random-weight benchmarks time ``fastest`` both ways and step-cache
speed-ups are reported from real-weight runs only.

Each row: ``first_s`` is the first call of that shape (batch, size, identity method) in the process: under a
compiling profile it includes tracing and compiling the repeated blocks (the cost a replica pays once in warm-up);
``median_s`` is the median of ``repeats`` calls after it and ``best_s`` the fastest of them; ``s_per_image`` =
``median_s / batch`` (``--stat best``: ``best_s / batch``, the better estimate on a machine shared with other
work); ``x_eager_plain`` = s/image over the eager (``quality``) plain render's s/image at the same batch;
``x_plain`` = over the same profile's plain render at the same batch (identity overhead under that profile).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

#: the variant suffix: the profile without its step cache
NO_STEP_CACHE = ":no-step-cache"
EAGER = "quality"


@dataclass(frozen=True)
class ProfileChoice:
    """A profile named on the command line (``name`` as in models.yaml, ``label`` as shown)."""

    name: str
    drop_step_cache: bool = False

    @property
    def label(self) -> str:
        return self.name + (NO_STEP_CACHE if self.drop_step_cache else "")

    def resolve(self, preset):
        """The ``Profile`` for ``preset`` (``ProfileError`` for an unknown name)."""
        from imagegen.pipelines.profiles import profile_for

        profile = profile_for(preset, self.name)
        if self.drop_step_cache and profile.step_cache is not None:
            profile = profile.model_copy(update={"step_cache": None, "description": profile.description})
        return profile


def parse_profiles(values: Iterable[str] | None, default: Iterable[str] = (EAGER,)) -> list[ProfileChoice]:
    """``--profile`` values (repeatable, comma lists) as choices, eager first (the ratios' base), no duplicates."""
    names = [v.strip() for value in (values or default) for v in value.split(",") if v.strip()]
    if EAGER not in names:
        names.insert(0, EAGER)
    names.sort(key=lambda n: n != EAGER)
    seen, choices = set(), []
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        base, _, variant = name.partition(":")
        if variant and variant != NO_STEP_CACHE[1:]:
            raise SystemExit(f"--profile {name}: the only variant is <profile>{NO_STEP_CACHE}")
        choices.append(ProfileChoice(base, drop_step_cache=bool(variant)))
    return choices


def dynamo_counters() -> dict[str, int]:
    from imagegen.pipelines.profiles import compile_counters

    return compile_counters()


def counters_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    first_s: float
    median_s: float
    best_s: float
    times: list[float]
    #: dynamo counters that moved in the first call, and in the steady calls (should be none)
    first_compile: dict[str, int]
    steady_compile: dict[str, int]


def time_calls(fn: Callable[[], object], repeats: int, device: torch.device) -> Timing:
    """The first call timed on its own, then the median of ``repeats`` calls."""
    before = dynamo_counters()
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - started
    middle = dynamo_counters()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    after = dynamo_counters()
    return Timing(
        first_s=first,
        median_s=statistics.median(times),
        best_s=min(times),
        times=times,
        first_compile={k: v for k, v in counters_delta(before, middle).items() if v},
        steady_compile={k: v for k, v in counters_delta(middle, after).items() if v},
    )


def timing_fields(timing: Timing, batch: int, stat: str) -> dict:
    """The row fields of a timing: first call, median, best, s/image by ``stat`` (median | best), calls, counters."""
    chosen = timing.best_s if stat == "best" else timing.median_s
    return {
        "first_s": round(timing.first_s, 4),
        "median_s": round(timing.median_s, 4),
        "best_s": round(timing.best_s, 4),
        "stat": stat,
        "s_per_image": round(chosen / batch, 4),
        "times": [round(t, 4) for t in timing.times],
        "first_compile": timing.first_compile,
        "steady_compile": timing.steady_compile,
    }


def reset_compiled() -> None:
    """Forget compiled code between profiles (a new renderer's blocks compile from scratch, as in a new replica)."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def add_ratios(rows: list[dict], keys: tuple[str, ...] = ("preset",)) -> None:
    """``x_eager_plain`` and ``x_plain`` of every timed row (see the module docstring)."""

    def plain(row: dict, profile: str) -> dict | None:
        return next(
            (
                r
                for r in rows
                if r.get("s_per_image") is not None
                and r["profile"] == profile
                and r["method"] == "none"
                and r["batch"] == row["batch"]
                and all(r.get(k) == row.get(k) for k in keys)
            ),
            None,
        )

    for row in rows:
        if row.get("s_per_image") is None:
            row["x_eager_plain"] = row["x_plain"] = None
            continue
        eager, same = plain(row, EAGER), plain(row, row["profile"])
        row["x_eager_plain"] = round(row["s_per_image"] / eager["s_per_image"], 3) if eager else None
        row["x_plain"] = round(row["s_per_image"] / same["s_per_image"], 3) if same else None


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(title: str, rows: list[dict], extra: tuple[str, ...] = ()) -> None:
    """One table: preset, profile, identity method, mode, batch, first call, s/call, s/image, ratios, status."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ("preset", "profile", "identity", *extra, "batch", "first s", "s/call", "s/image", "x eager plain")
    for column in (*columns, "x plain", "recompiles (first / steady)", "note"):
        table.add_column(column, justify="left" if column in ("preset", "profile", "identity", "note") else "right")
    for r in rows:
        first = r.get("first_compile") or {}
        steady = r.get("steady_compile") or {}
        table.add_row(
            r["preset"],
            r["profile"],
            r["method"],
            *(str(r.get(k, "")) for k in extra),
            str(r["batch"]),
            fmt(r.get("first_s"), ".3f"),
            fmt(r.get("median_s"), ".3f"),
            fmt(r.get("s_per_image"), ".4f"),
            fmt(r.get("x_eager_plain"), ".2f"),
            fmt(r.get("x_plain"), ".2f"),
            "-" if r.get("first_s") is None else f"{first.get('recompiles', 0)} / {steady.get('recompiles', 0)}",
            r.get("note", ""),
        )
    Console(width=200).print(table)


def markdown_table(rows: list[dict], extra: tuple[str, ...] = ()) -> str:
    """The same rows as a Markdown table (for docs/benchmarks.md)."""
    header = ["preset", "profile", "identity", *extra, "batch", "first call s", "s/image", "× eager plain", "× plain"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header)))]
    lines[-1] += "|"
    for r in rows:
        cells = [
            r["preset"],
            r["profile"],
            r["method"],
            *(str(r.get(k, "")) for k in extra),
            str(r["batch"]),
            fmt(r.get("first_s"), ".2f"),
            fmt(r.get("s_per_image"), ".4f") if r.get("s_per_image") is not None else r.get("note", "-"),
            fmt(r.get("x_eager_plain"), ".2f"),
            fmt(r.get("x_plain"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
