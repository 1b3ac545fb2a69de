"""scripts/bench_presets.py and scripts/gpu_check.py at tiny sizes on the CPU: the records hold
what the README's tables quote (plan, times, flow-steps, peak against the estimate), a time budget
turns into a projection, the worst-case dynamics reach the plan's bound, and the GPU check writes
its JSON and Markdown with a part that ran out of time recorded as such."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys

import pytest

from conftest import ROOT

# small carrier and batch on the debug preset's lattice (20x20x10, 8 flows + up to 10 a step of 100)
TINY = ["--set", "carrier_hidden_dim=16", "--set", "carrier_num_layers=1", "--set", "batch_size=2",
        "--set", "input_dim=32", "--set", "output_dim=32", "--threads", "1"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


presets = _load("bench_presets")
gpu = _load("gpu_check")


def test_bench_presets_runs_whole_steps_and_reports_plan_times_flows_and_memory(tmp_path, capsys):
    out = tmp_path / "presets.json"
    presets.main(["--in-process", "--presets", "debug", "--steps", "3", *TINY, "--json", str(out),
                  "--md", str(tmp_path / "presets.md")])
    res = json.loads(out.read_text())
    (r,) = res["results"]
    assert r["status"] == "done" and r["stop_reason"] == "done"
    assert (r["preset"], r["lattice"], r["batch"], r["steps_done"], r["steps_requested"]) == ("debug", "20x20x10", 2, 3, 3)
    plan = r["plan"]
    assert (plan["activation_checkpointing"], plan["micro_batch_size"], plan["num_micro_batches"]) == (False, 2, 1)
    assert r["worst_case_flow_steps_per_step"] == 2 * 416  # 8 flows growing to 86 over 9 steps, per sample
    assert len(r["steps"]) == 3 and len(r["micro_batches"]) == 3
    # the median after the first step, flow-steps from the traces
    assert r["seconds_per_step"] == pytest.approx(statistics.median(s["seconds"] for s in r["steps"][1:]))
    assert 0 < r["flow_steps_per_step"] <= r["worst_case_flow_steps_per_step"]
    assert r["flow_steps_per_s"] == pytest.approx(sum(s["flow_steps"] for s in r["steps"][1:])
                                                  / sum(s["seconds"] for s in r["steps"][1:]))
    assert not r["projected"]
    # memory: the peak against the worst-case plan and against the plan at the flows that ran
    assert r["peak_kind"] == "peak RSS" and r["peak_bytes"] >= r["before_model_bytes"] > 0
    assert r["peak_over_estimate"] == pytest.approx(r["peak_bytes"] / plan["total_bytes"])
    assert 0 < r["estimate_at_measured_flows_bytes"] <= plan["total_bytes"]
    assert r["increase_over_estimate_at_measured"] == pytest.approx(
        (r["peak_bytes"] - r["before_model_bytes"]) / r["estimate_at_measured_flows_bytes"])
    printed = capsys.readouterr().out
    assert "| debug | 20x20x10, 2, 8 / 100 | whole batch | 3 of 3 |" in printed
    assert (tmp_path / "presets.md").read_text().strip() == printed.strip()


def test_a_budget_shorter_than_a_step_projects_it_from_whole_micro_batches(tmp_path):
    out = tmp_path / "presets.json"
    # 4 micro-batches of 1 row per step; a budget that ends after the first micro-batch
    presets.main(["--in-process", "--presets", "debug", "--steps", "2", *TINY, "--set", "batch_size=4",
                  "--micro-batch-size", "1", "--max-seconds-per-preset", "1e-6", "--json", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["plan"]["num_micro_batches"] == 4
    assert r["steps_done"] == 0 and r["micro_batches_done"] == 1 and r["projected"]
    assert r["stop_reason"] == "out of time: step 1 stopped after 1 of 4 micro-batches"
    assert r["seconds_per_step"] == pytest.approx(4 * r["seconds_per_micro_batch"])
    assert r["flow_steps_per_step"] == pytest.approx(4 * r["busiest_micro_batch"]["flow_steps"])
    assert "(projected)" in presets.table([r])


def test_a_budget_after_the_first_step_judges_the_steps_after_it(tmp_path):
    out = tmp_path / "presets.json"
    # the first step (a compile, say) is not counted; the second always runs: the first measure
    presets.main(["--in-process", "--presets", "debug", "--steps", "5", *TINY, "--max-seconds-per-preset", "1e-6",
                  "--budget-after-first-step", "--json", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["steps_done"] == 2 and r["stop_reason"].startswith("budget: ")
    assert r["stop_reason"].endswith("(before step 3)")


def test_worst_case_dynamics_reach_the_plans_bound_and_its_estimate(tmp_path):
    out = tmp_path / "presets.json"
    presets.main(["--in-process", "--presets", "debug", "--steps", "1", *TINY, "--dynamics", "worst-case",
                  "--json", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["flow_steps_per_step"] == r["worst_case_flow_steps_per_step"] == 2 * 416
    assert r["busiest_micro_batch"]["active"] == [2 * n for n in (8, 16, 26, 36, 46, 56, 66, 76, 86)]
    # the plan's formula at the flows that ran is the plan itself
    assert r["estimate_at_measured_flows_bytes"] == r["plan"]["total_bytes"]


def test_steps_items_and_preset_paths():
    assert presets.steps_for("debug", None) == 20 and presets.steps_for("optimized", None) == 1
    assert presets.steps_for("experiment", ["debug=3", "experiment=2"]) == 2
    assert presets.steps_for("mine", ["5"]) == 5 and presets.steps_for("debug", ["5"]) == 5
    with pytest.raises(ValueError, match="--steps"):
        presets.steps_for("debug", ["debug=0"])
    assert presets.preset_path("debug") == ROOT / "configs/debug.yaml"


def test_gpu_check_part_that_runs_out_of_time_is_recorded_not_raised():
    res = gpu.run_part([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert res["status"] == "timed out after 0 s" or res["status"].startswith("timed out after")
    assert res["seconds"] < 10
    assert gpu.run_part([sys.executable, "-c", "raise SystemExit(3)"], timeout=30)["status"] == "failed (exit 3)"


def test_gpu_check_counts_the_gpu_tests(tmp_path, monkeypatch):
    assert "tests/test_precision_and_devices.py" in gpu.cuda_test_files()
    fake = tmp_path / "test_fake_gpu.py"
    # (no torch import: a second interpreter importing torch costs seconds)
    fake.write_text("import pytest\n"
                    "needs = pytest.mark.skipif(True, reason='needs a CUDA device')\n"
                    "def test_cuda_math():\n    assert 1 + 1 == 2\n"
                    "@needs\ndef test_cuda_device():\n    assert False\n"
                    "def test_other():\n    assert False\n")
    monkeypatch.setattr(gpu, "cuda_test_files", lambda: [str(fake)])
    res = gpu.run_tests(tmp_path, gpu.Clock(60))
    assert res["total"] == 2  # -k cuda: test_other is not selected
    assert (res["passed"], res["skipped"], res["failed"]) == (1, 1, 0)
    assert res["status"] == "ok"
    assert {c["test"].split("::")[-1] for c in res["cases"]} == {"test_cuda_math", "test_cuda_device"}


def test_gpu_check_quick_on_cpu_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "check"
    report = gpu.main(["--out", str(out), "--device", "cpu", "--quick", "--parts", "table", "train",
                       "--presets", "debug", "--compile", "off", "--train-steps", "2", "--threads", "1",
                       "--budget-s", "120", "--table-args", "--gpu-presets", "debug"])
    saved = json.loads((out / "gpu_check.json").read_text())
    assert set(saved) == {"meta", "parts"} and set(saved["parts"]) == {"table", "train"}
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["quick"] and saved["meta"]["seconds"] > 0
    table = saved["parts"]["table"]
    assert table["status"] == "ok"
    (row,) = table["rows"]
    for key in ("engine_ms", "carrier_ms", "ratio", "flow_steps_per_s", "ops_per_step", "syncs_per_step",
                "carrier_peak_share", "engine_memory"):
        assert key in row
    assert row["plan"]["measured_kind"] == "held" and row["plan"]["measured_over_plan"] > 0
    train = saved["parts"]["train"]
    (rec,) = train["records"]
    assert rec["status"] == "done" and rec["steps_done"] == 2 and rec["compile"] is False
    assert rec["seconds_per_step"] > 0 and rec["plan"]["total_bytes"] > 0
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (cpu:")
    assert "| preset | compile | ran | optimizer steps |" in md and "| debug | off | yes | 2 of 2 |" in md
    assert "| preset | lattice | flows | steps | engine ms |" in md and "measured / plan |" in md
    assert report["parts"]["train"]["steps_asked"] == 2
