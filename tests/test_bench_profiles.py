"""The benchmarks' profile plumbing, without timing anything: ``--profile`` parsing, gpu_check's plan per family, the
step cache dropped for random weights, ratios and the issue's goals (the timing itself: ``gpu_check.py --dry-run``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))  # after the installed packages: bench modules shadow nothing

import gpu_check  # noqa: E402
from profile_bench import add_ratios, parse_profiles  # noqa: E402

from imagegen.pipelines.presets import get_preset  # noqa: E402
from imagegen.pipelines.profiles import COMPILE_PHASES, ProfileError, check_profile, compile_phase_seconds  # noqa: E402


def test_profile_choices_put_eager_first_and_know_the_no_step_cache_variant():
    choices = parse_profiles(["fast,fastest:no-step-cache", "fast"])
    assert [c.label for c in choices] == ["quality", "fast", "fastest:no-step-cache"]
    fastest = choices[2].resolve(get_preset("tiny-flux"))
    assert fastest.step_cache is None and fastest.compile is not None and fastest.quantize == "fp8-dynamic"
    assert parse_profiles(None)[0].label == "quality"
    with pytest.raises(SystemExit, match="the only variant"):
        parse_profiles(["fast:eager"])


def test_gpu_check_plans_every_profile_at_batch_one_then_eager_at_larger_batches():
    opts = gpu_check.parse_args(["--device", "cpu", "--tiny", "--skip-tests"])
    flux = gpu_check.row_plan("flux", opts, get_preset("tiny-flux"))
    assert flux == [
        ("quality", ["plain", "pulid-flux-v0.9.1"], 1),
        ("fast", ["plain", "pulid-flux-v0.9.1"], 1),
        ("fastest", ["plain", "pulid-flux-v0.9.1"], 1),
        ("quality", ["plain", "pulid-flux-v0.9.1"], 4),
    ]
    sdxl = gpu_check.row_plan("sdxl", opts, get_preset("tiny-sdxl"))
    assert [p for p, _, _ in sdxl] == ["quality", "fast", "quality"]
    assert sdxl[0][1] == ["plain", "pulid-sdxl-v1.1", "ipadapter-faceid-plusv2-sdxl"]
    every = gpu_check.parse_args(["--device", "cpu", "--tiny", "--methods", "all", "--batches", "1"])
    assert gpu_check.row_plan("sdxl", every, get_preset("tiny-sdxl"))[0][1][1:] == get_preset("tiny-sdxl").methods
    # random weights: the step cache is dropped unless kept
    assert gpu_check.resolve_profile(get_preset("flux-dev"), "fastest", keep_step_cache=False).step_cache is None
    assert gpu_check.resolve_profile(get_preset("flux-dev"), "fastest", keep_step_cache=True).step_cache is not None


def test_gpu_check_graphs_and_cpp_variants_change_only_how_the_blocks_compile():
    # FLUX's fast compiles without CUDA graphs (SDXL's fast has them already)
    fast = gpu_check.resolve_profile(get_preset("flux-dev"), "fast", keep_step_cache=False)
    graphs = gpu_check.resolve_profile(get_preset("flux-dev"), "fast:graphs", keep_step_cache=False)
    assert graphs.compile.mode == "reduce-overhead" and fast.compile.mode is None
    assert graphs.model_copy(update={"name": "fast", "compile": fast.compile}) == fast  # nothing else changes
    eager = gpu_check.resolve_profile(get_preset("sdxl-base"), "quality:graphs", keep_step_cache=False)
    assert eager.compile is not None and eager.compile.mode == "reduce-overhead"
    cpp = gpu_check.resolve_profile(get_preset("sdxl-base"), "fast:cpp", keep_step_cache=False)
    assert cpp.compile.options == {"cpp_wrapper": True} and cpp.compile.mode is None and cpp.compile.fullgraph
    cudnn = gpu_check.resolve_profile(get_preset("flux-dev"), "fast:cudnn", keep_step_cache=False)
    assert cudnn.attention_backend == "_native_cudnn" and cudnn.compile == fast.compile
    with pytest.raises(ProfileError, match="needs a GPU"):  # refused on a CPU at load, as a profile's option is
        check_profile(cudnn, "flux", torch.device("cpu"))
    with pytest.raises(ProfileError, match="no-step-cache, graphs, cpp or cudnn"):
        gpu_check.resolve_profile(get_preset("sdxl-base"), "fast:cudagraphs", keep_step_cache=False)


def test_step_ops_counts_what_identity_adds_to_an_eager_step():
    """bench/step_ops.py on tiny SDXL: FaceID-PlusV2 renders from step 0, so its LoRA is merged and adds no operator
    per step; what is left is of the size of PuLID's (its 64 LoRA hooks added ~1,360 operators a step before)."""
    import step_ops

    opts = argparse.Namespace(device="cpu", full_size=False, proxy=False, size=None, steps=2)
    rows = {row["method"]: row for row in step_ops.rows_for("sdxl", "quality", opts)}
    assert rows["plain"]["over_plain"] == 0 and rows["plain"]["launches_per_step"] is None
    pulid, faceid = rows["pulid-sdxl-v1.1"]["over_plain"], rows["ipadapter-faceid-plusv2-sdxl"]["over_plain"]
    assert 0 < pulid and 0 < faceid < 1.5 * pulid, rows
    # where a step's time goes: its wall time, and the host operators it spent longest in (the device's on CUDA)
    for row in rows.values():
        assert row["wall_ms_per_step"] > 0 and row["device_ms_per_step"] is None and row["copies_per_step"] > 0
        assert row["cuda_graphs_recorded_in_call"] is None  # counted where torch records CUDA graphs
        top = list(row["top_host_ops_ms_per_step"].values())
        assert len(top) == step_ops.TOP_HOST_OPS and top == sorted(top, reverse=True) and top[0] > 0


def test_gpu_check_proxy_is_full_width_with_few_blocks():
    opts = gpu_check.parse_args(["--proxy"])
    assert (opts.device, opts.size, opts.steps, opts.skip_tests, opts.batches) == ("cpu", 128, 2, True, [1])
    flux = gpu_check.model_configs("flux", tiny=False, proxy=True)["model"]
    full = gpu_check.model_configs("flux", tiny=False)["model"]
    assert (
        flux["num_attention_heads"] * flux["attention_head_dim"]
        == 3072
        == (full["num_attention_heads"] * full["attention_head_dim"])
    )
    assert (flux["num_layers"], flux["num_single_layers"]) == (1, 2) and full["num_layers"] == 19
    sdxl = gpu_check.model_configs("sdxl", tiny=False, proxy=True)["model"]
    assert sdxl["block_out_channels"] == [320, 640, 1280] and sdxl["transformer_layers_per_block"] == [1, 1, 1]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu"])  # full size on a CPU: refused


def test_ratios_and_goals():
    rows = [
        {"family": "flux", "profile": "quality", "method": "plain", "batch": 1, "total_s": 7.0, "step_s": 0.24},
        {"family": "flux", "profile": "quality", "method": "pulid-flux-v0.9.1", "batch": 1, "total_s": 7.14,
         "step_s": 0.245},
        {"family": "flux", "profile": "fastest", "method": "plain", "batch": 1, "total_s": 3.0, "step_s": 0.1},
        {"family": "flux", "profile": "fastest", "method": "pulid-flux-v0.9.1", "batch": 1, "total_s": 2.9,
         "step_s": 0.098, "steps": 28},
        {"family": "flux", "profile": "fast", "method": "pulid-flux-v0.9.1", "batch": 1, "note": "refused: ..."},
    ]  # fmt: skip
    gpu_check.add_ratios(rows)
    assert rows[1]["x_plain"] == 1.02 and rows[3]["x_eager_plain"] == round(2.9 / 7.0, 3)
    assert "x_plain" not in rows[4]
    report = {
        "timings": rows,
        "tiny": False,
        "proxy": False,
        "families": {"flux": {"size": "1024x1024"}},
        "environment": {"gpu": "NVIDIA H100"},
    }
    goals = gpu_check.goals(report)
    assert any("quality + pulid-flux-v0.9.1: +2.0%" in g and "meets" in g for g in goals)
    assert any(g.startswith("fastest FLUX.1-dev + PuLID, 1024x1024, 28 steps: 2.90 s (meets") for g in goals)
    bench_rows = [
        {"preset": "p", "profile": "quality", "method": "none", "batch": 1, "s_per_image": 0.2},
        {"preset": "p", "profile": "fast", "method": "none", "batch": 1, "s_per_image": 0.1},
        {"preset": "p", "profile": "fast", "method": "pulid", "batch": 1, "s_per_image": 0.12},
    ]
    add_ratios(bench_rows)
    assert bench_rows[2]["x_eager_plain"] == 0.6 and bench_rows[2]["x_plain"] == 1.2


def test_gpu_check_gives_one_family_the_whole_budget():
    """A GPU session that times only SDXL gets all of --budget-s for it (the default split left rows out)."""
    base = ["--device", "cpu", "--tiny", "--budget-s", "330"]
    alone = gpu_check.parse_args([*base, "--families", "sdxl", "--skip-tests"])
    assert alone.sdxl_budget_s == 330
    with_tests = gpu_check.parse_args([*base, "--families", "sdxl", "--tests-budget-s", "60"])
    assert with_tests.sdxl_budget_s == 270
    both = gpu_check.parse_args([*base, "--skip-tests"])
    assert (both.flux_budget_s, both.sdxl_budget_s) == (250, 150)
    chosen = gpu_check.parse_args([*base, "--families", "sdxl", "--sdxl-budget-s", "100", "--skip-tests"])
    assert chosen.sdxl_budget_s == 100


def test_gpu_check_busy_gives_each_row_the_devices_working_time(tmp_path):
    """``--busy`` (what the next GPU session runs, to tell device work from host work under CUDA graphs): every timed
    row gets the device's working time from one profiled call, its share of the row's time, and the identity rows
    their working time over the plain row's; rows without ``--busy`` carry none."""
    base = ["--device", "cpu", "--tiny", "--families", "sdxl", "--sdxl-profiles", "quality", "--batches", "1"]
    base += ["--methods", "pulid-sdxl-v1.1", "--steps", "2", "--skip-tests", "--workdir", str(tmp_path)]
    report = {"timings": [], "families": {}, "skipped": []}
    beside = ["--stamp-beside", "--stamp-size", "64"]
    gpu_check.time_family("sdxl", gpu_check.parse_args([*base, "--busy", *beside]), gpu_check.Clock(600), report)
    plain, pulid = report["timings"]
    assert (plain["method"], pulid["method"]) == ("plain", "pulid-sdxl-v1.1"), report["timings"]
    for row in (plain, pulid):
        # aten ops' own time on the CPU: some of the call, never more than all of it (the profiled call is slower)
        assert 0 < row["busy_s"] and row["busy_events"] > 0 and 0 < row["busy_share"] < 3, row
    assert plain["x_plain_busy"] == 1.0 and pulid["x_plain_busy"] == round(pulid["busy_s"] / plain["busy_s"], 3)
    # --stamp-beside: the plain row timed again beside imagegen's own stamps (installed here), the others not
    assert report["stamp_beside"] == {"work": "imagegen", "size": 64}
    assert plain["beside_stamps_s"] > 0 and plain["stamps_beside"] >= 0
    assert plain["x_beside_stamps"] == pytest.approx(plain["beside_stamps_s"] / plain["total_s"], rel=0.02)
    assert pulid["x_beside_stamps"] is None
    quiet = {"timings": [], "families": {}, "skipped": []}
    gpu_check.time_family("sdxl", gpu_check.parse_args(base), gpu_check.Clock(600), quiet)
    assert all(row["busy_s"] is None and row["x_plain_busy"] is None for row in quiet["timings"])
    assert all(row["x_beside_stamps"] is None for row in quiet["timings"]) and "stamp_beside" not in quiet


def test_method_switch_times_the_first_attach_and_the_switches_back_of_every_sdxl_method():
    """bench/method_switch.py on tiny SDXL: each method attached once from its weights, then switched away and back
    (the same layers put back); what it prints comes from these rows."""
    import method_switch

    opts = argparse.Namespace(device="cpu", dtype="float32", tiny=True, repeats=2)
    rows = {row["method"]: row for row in method_switch.bench(opts)}
    assert set(rows) == {*method_switch.IP_METHODS, "pulid-sdxl-v1.1"}
    for row in rows.values():
        assert row["attach_s"] > 0 and row["detach_ms"] > 0 and row["reattach_ms"] > 0 and row["params"] > 0
    assert all(rows[m]["file_mb"] is not None for m in method_switch.IP_METHODS)


def test_gpu_check_splits_a_first_call_s_compile_into_phases():
    before = compile_phase_seconds()
    torch.compile(lambda x: torch.relu(x.cos() * 5.0 - x))(torch.randn(6, 13))
    phases = {k: v - before[k] for k, v in compile_phase_seconds().items()}
    assert set(phases) == set(COMPILE_PHASES.values())
    assert phases["dynamo_total"] > 0 and 0 < phases["tracing"] < phases["dynamo_total"]
    assert 0 < phases["backend"] <= phases["dynamo_total"]
