"""What a replica's start costs under a compiling profile, with and without the compile caches.

Each arm is a fresh process running the user's own command, ``imagegen models warm-up PRESET --profile P`` (as a
serving replica warms up: the preset's default size, batch 1, every identity method unless ``--no-identity``), and
reports the warm-up's seconds and what the caches did (``imagegen.pipelines.compile_cache``):

- ``cold``: an empty local compile directory and an empty object store (the first replica of a deployment);
- ``fresh machine``: an empty local directory, the artifacts the cold arm stored (a scale-up onto a new node or pod);
- ``same machine``: the cold arm's local directory and an empty object store (a replica restarted where it ran).

Runs alternate the arms round by round (``--rounds``) and report medians.

    .venv/bin/python bench/compile_cache.py                                  # tiny-sdxl and tiny-flux under fast
    .venv/bin/python bench/compile_cache.py --preset tiny-flux --profile fastest --rounds 2

Prints a table and one JSON line per preset x profile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("cold", "fresh machine", "same machine")


def warm_up(preset: str, profile: str, home: Path, store: Path, local_dir: Path, identity: bool) -> dict:
    """One fresh process of ``imagegen models warm-up``: its wall time and its report."""
    env = {
        **os.environ,
        "IMAGEGEN_HOME": str(home),
        "IMAGEGEN_STORAGE_URL": str(store),
        "IMAGEGEN_COMPILE_CACHE_DIR": str(local_dir),
        "IMAGEGEN_ALLOW_UNVERIFIED_AGE": "1",
    }
    command = [sys.executable, "-m", "imagegen.cli", "models", "warm-up", preset, "--profile", profile, "--json"]
    started = time.perf_counter()
    proc = subprocess.run(command + ([] if identity else ["--no-identity"]), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{preset} / {profile}: warm-up failed: {proc.stderr.strip().splitlines()[-1:]}")
    report = json.loads(proc.stdout)
    return {"process_s": wall, "warm_up_s": report["seconds"], "cache": report["compile_cache"]}


def round_of(preset: str, profile: str, root: Path, identity: bool) -> dict[str, dict]:
    """The three arms once, each on directories of its own."""
    out = {}
    cold_dir, store = root / "machine-cold", root / "store"
    out["cold"] = warm_up(preset, profile, root / "home-cold", store, cold_dir, identity)
    out["fresh machine"] = warm_up(preset, profile, root / "home-fresh", store, root / "machine-fresh", identity)
    out["same machine"] = warm_up(preset, profile, root / "home-same", root / "empty-store", cold_dir, identity)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", action="append", help="preset(s) (default: tiny-sdxl and tiny-flux)")
    parser.add_argument("--profile", action="append", help="compiling profile(s) (default: fast)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three arms (medians are reported)")
    parser.add_argument("--no-identity", action="store_true", help="warm plain renders only")
    args = parser.parse_args()
    presets = args.preset or ["tiny-sdxl", "tiny-flux"]
    profiles = args.profile or ["fast"]
    results = []
    for preset in presets:
        for profile in profiles:
            rounds = []
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory(prefix="compile-cache-bench-") as root:
                    rounds.append(round_of(preset, profile, Path(root), not args.no_identity))
            row = {"preset": preset, "profile": profile, "rounds": args.rounds, "identity": not args.no_identity}
            for arm in ARMS:
                runs = [r[arm] for r in rounds]
                key = arm.replace(" ", "_")
                row[f"{key}_warm_up_s"] = round(statistics.median(r["warm_up_s"] for r in runs), 2)
                row[f"{key}_process_s"] = round(statistics.median(r["process_s"] for r in runs), 2)
                last = runs[-1]["cache"]
                row[f"{key}_cache"] = {
                    "load": last["load"],
                    "save": last["save"],
                    "kernels_restored": last["kernels_restored"],
                    "stored_bytes": last["save_bytes"] or last["load_bytes"],
                    **last["counters"],
                }
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| preset | profile | arm | warm-up s | process s | x cold | graphs cached / compiled | kernels restored |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        for arm in ARMS:
            key = arm.replace(" ", "_")
            cache = row[f"{key}_cache"]
            print(
                f"| {row['preset']} | {row['profile']} | {arm} | {row[f'{key}_warm_up_s']} | {row[f'{key}_process_s']} "
                f"| {row[f'{key}_warm_up_s'] / row['cold_warm_up_s']:.2f} | {cache['fx_graph_hits']} / "
                f"{cache['fx_graph_misses']} | {cache['kernels_restored']} |"
            )


if __name__ == "__main__":
    main()
