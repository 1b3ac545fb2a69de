"""scripts/bench_forward.py: the prior-workload and GPU tables run at tiny sizes on CPU and write
sane JSON; the carrier FLOP count and the memory measures mean what the tables say."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, tiny_config


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_forward", ROOT / "scripts/bench_forward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
CPU = torch.device("cpu")
TINY = ["--hidden", "16", "--layers", "1", "--steps", "3", "--repeats", "1", "--warmup", "0", "--peak-size", "128",
        "--gpu-presets", "debug", "experiment", "--gpu-batch", "2",
        "--prior-shape", "6", "6", "8", "--prior-batch", "2", "--prior-flows", "20", "--prior-hidden", "16",
        "--prior-layers", "2", "--prior-steps", "4", "--prior-repeats", "1", "--prior-warmup", "0"]


def test_prior_and_gpu_tables_run_tiny_and_write_sane_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--workload", "gpu", "prior", *TINY, "--json", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["lattice"] == res["flows"] == res["overhead"] == res["dense"] == []  # sweeps not asked for

    prior = res["prior"]
    assert [r["variant"] for r in prior] == ["engine", "engine + activation_checkpointing", "carrier alone"]
    for r in prior:
        assert (r["flows"], r["steps"], r["flow_steps"]) == (40, 4, 160)
        assert r["hidden_states_mb"] == pytest.approx(4 * 2 * 40 * 16 * 4 / 2**20)  # steps x layers x flows x hidden
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 1
        assert r["saved_mb"] > 0 and r["held_mb"] is not None and r["held_mb"] > 0
        assert r["peak_mb"] is None  # CUDA only
        assert math.isclose(r["vs_carrier"], r["times_ms"][0] / prior[2]["times_ms"][0])  # one round
        assert math.isclose(r["vs_engine_of_medians"], r["median_ms"] / prior[0]["median_ms"])
    assert prior[2]["vs_carrier"] == 1.0 and prior[0]["vs_engine"] == 1.0
    assert "| engine + activation_checkpointing |" in printed and "4 steps per flow (160 flow-steps)" in printed

    meta = res["meta"]
    assert meta["peak_dtype"] == "fp32" and set(meta["matmul_peak_tflops"]) == {"fp32"}
    peak = meta["matmul_peak_tflops"]["fp32"]
    assert peak > 0
    gpu = res["gpu"]
    assert [r["preset"] for r in gpu] == ["debug", "experiment"]
    for r in gpu:
        config = bench.PRESETS[r["preset"]]().replace(carrier_hidden_dim=16, carrier_num_layers=1)
        assert r["flows"] == 2 * config.initial_flows_per_sample and r["steps"] == 3
        assert r["carrier_flops"] == bench.recurrent_flops_per_flow_step(config) * r["flows"] * 3
        assert math.isclose(r["carrier_tflops"], r["carrier_flops"] / (r["carrier_ms"] / 1e3) / 1e12)
        assert math.isclose(r["carrier_peak_share"]["fp32"], r["carrier_tflops"] / peak)
        assert math.isclose(r["flow_steps_per_s"], r["flows"] * 3 / (r["engine_ms"] / 1e3))
        assert math.isclose(r["ratio"], r["engine_ms"] / r["carrier_ms"])
        assert r["ops_per_step"] > 10 and 0 <= r["syncs_per_step"] < r["ops_per_step"]
        assert sum(r["sync_ops"].values()) == pytest.approx(r["syncs_per_step"] * 3)
        assert r["engine_memory"]["held_mb"] > 0 and r["carrier_memory"]["saved_mb"] > 0
    assert "% of fp32 peak" in printed and "| debug | 20x20x10 |" in printed


def test_default_workload_on_cpu_is_the_sweeps_only(monkeypatch):
    seen = {}

    def fake_run(args):
        seen["args"] = args
        return {"meta": {}}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "print_tables", lambda res: None)
    bench.main(["--device", "cpu"])
    assert seen["args"].workload == ["sweeps"] and seen["args"].hidden == 256


def test_recurrent_flop_count_matches_torch_flop_counter():
    """The analytic x3 count against FlopCounterMode over the carrier alone's forward+backward on CPU
    (where the GRU decomposes into mm/addmm). The count is a little high: the first layer's input
    needs no gradient there, and the heads are not in it."""
    for hidden, layers in [(32, 2), (128, 3)]:
        config = tiny_config(carrier_hidden_dim=hidden, carrier_num_layers=layers)
        proc = bench.build(config, 3, CPU)
        fn = bench.carrier_fn(proc, 20, 3, CPU)
        with FlopCounterMode(display=False) as counter:
            fn().backward()
        analytic = bench.recurrent_flops_per_flow_step(config) * 20 * 3
        assert 0.85 < counter.get_total_flops() / analytic < 1.0, (hidden, layers)
    gru, lstm = (bench.recurrent_flops_per_flow_step(tiny_config(carrier_type=t)) for t in ("gru", "lstm"))
    assert lstm / gru == pytest.approx(4 / 3)


def test_held_memory_sees_what_checkpointing_keeps_and_saved_bytes_do_not():
    """Without checkpointing the two CPU measures agree; with it the saved-tensor hooks miss the
    checkpointed steps' inputs (the FlowState, kept by reference), and the profiler's held bytes
    hold at least the flows' hidden states of every step."""
    flows, steps, layers, hidden = 2 * 36, 5, 3, 512
    config = tiny_config(lattice_width=6, lattice_height=6, lattice_depth=8, initial_flows_per_sample=36,
                         max_active_flows=36, carrier_hidden_dim=hidden, carrier_num_layers=layers)
    hidden_states_mb = steps * layers * flows * hidden * 4 / 2**20  # 2.1 MiB
    plain = bench.build(config, steps, CPU)
    fn = bench.engine_fn(plain, 2, CPU)
    fn().backward()  # warm-up: first-call allocations (kernels' caches) are not the graph's
    mem = bench.memory(fn, CPU, list(plain.parameters()))
    assert plain.last_trace.num_steps == steps
    assert mem["held_mb"] == pytest.approx(mem["saved_mb"], abs=0.5 + 0.05 * mem["saved_mb"])
    assert mem["saved_mb"] > hidden_states_mb

    checkpointed = bench.build(config.replace(activation_checkpointing=True), steps, CPU)
    fn = bench.engine_fn(checkpointed, 2, CPU)
    fn().backward()
    ck = bench.memory(fn, CPU, list(checkpointed.parameters()))
    assert checkpointed.last_trace.num_steps == steps
    assert ck["saved_mb"] < 0.5 * hidden_states_mb  # the hooks' blind spot
    assert hidden_states_mb < ck["held_mb"] < 0.8 * mem["held_mb"]


def test_forward_held_bytes_counts_the_tensors_a_call_leaves_allocated():
    kept = []

    def fn():
        a = torch.ones(1000)  # freed on return: not held
        kept.append(torch.empty(2048))  # 8 KiB kept
        return (a * 2).sum()  # the 4-byte result is held

    out, held = bench.forward_held_bytes(fn)
    assert out.item() == 2000.0 and held == 2048 * 4 + 4


def test_bench_threads_runs_side_by_side_at_both_thread_counts(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_threads", ROOT / "scripts/bench_threads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "threads.json"
    module.main(["--config", "configs/routing.yaml", "--set", "synthetic_pairs=300",
                 "--steps", "4", "--warmup", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert len(res["default_step_s"]) == len(res["shared_step_s"]) == 2
    assert all(t > 0 for t in res["default_step_s"] + res["shared_step_s"])
    assert res["shared_threads"] == max(1, res["cores"] // 2)
    assert "| 0 (PyTorch's default) |" in capsys.readouterr().out


def test_bench_step_times_the_lattice_and_its_peers_side_by_side_and_writes_json(tmp_path, capsys):
    """scripts/bench_step.py on routing, one timed step: a row with every model's time, the ratio,
    the lattice's matmul share, its kernels and one host sync per lattice step."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_step

    assert bench_step.main(["--configs", "routing", "--steps", "1", "--warmup", "0", "--json",
                            str(tmp_path / "step.json")]) == 0
    (row,) = json.loads((tmp_path / "step.json").read_text())
    assert row["config"] == "routing" and row["lattice_parameters"] == row["parameters"]
    for peer in ("transformer", "mlp"):  # sized to the lattice as the run pipeline sizes its baselines
        assert abs(row[f"{peer}_parameters"] - row["parameters"]) / row["parameters"] < 0.1
    assert row["ratio_transformer"] == pytest.approx(row["lattice_ms"] / row["transformer_ms"])
    assert 0 < row["lattice_matmul_share"] < 1 and row["lattice_kernels"] > 0
    assert row["lattice_syncs_per_step"] == 1.0
    assert "| routing |" in capsys.readouterr().out
