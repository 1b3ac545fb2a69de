"""Learning diagnostics (efgraph.core.diagnostics): they change nothing the model computes, the
gradient per lattice step equals autograd's on the same tensors, output shares add up, landings
equal a hand count, start churn sees a changed input face, and the trainer logs them on its logged
steps only, through micro-batches, activation checkpointing and compile."""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict

import pytest
import torch

from conftest import build_processor, spread_next_energies, tiny_config
from efgraph import EnergyTrainer, FlowProcessor
from efgraph.core.diagnostics import GRADIENT_KEYS, PROBE_SIZE, StartCellProbe, diagnostics_metrics
from efgraph.training.schedule import warmup_cosine_scheduler
from efgraph.utils.dispatch_count import count_ops

B = 4


def _config(**overrides):
    base = dict(energy_threshold=0.5, spawn_threshold=0.6, batch_size=B, grad_clip=1e9, log_every=1)
    return tiny_config(**{**base, **overrides})


def _lively(config, seed=4):
    """A model and batch whose forward spawns, kills and lands flows, arriving over several steps
    (seed 4 of the tiny config: arrivals at steps 2, 3 and 4, deaths at step 1)."""
    proc = build_processor(config, seed)
    x = torch.randn(B, config.input_dim, generator=torch.Generator().manual_seed(seed))
    target = torch.randn(B, config.output_dim, generator=torch.Generator().manual_seed(seed + 100))
    spread_next_energies(proc, x)
    with torch.no_grad():
        proc.carrier.displacement_head.weight[2].mul_(8.0)  # jump lengths differ: arrivals over several steps
        proc.carrier.spawn_head.bias[0] = 5.0
    return proc, x, target


def _loss(pred, target):
    return torch.nn.functional.mse_loss(pred, target) + (1 - torch.nn.functional.cosine_similarity(pred, target)).mean()


def _forward_backward(proc, x, target, diagnostics):
    proc.zero_grad(set_to_none=True)
    proc.record_diagnostics = diagnostics
    try:
        y = proc(x)
    finally:
        proc.record_diagnostics = False
    _loss(y, target).backward()
    grads = {name: p.grad.clone() for name, p in proc.named_parameters() if p.grad is not None}
    return y.detach(), grads, proc.last_diagnostics


def build_processor_like(proc, config):
    twin = FlowProcessor.from_config(config)
    twin.load_state_dict(proc.state_dict())
    return twin


def _metrics(proc, record):
    return diagnostics_metrics([record], proc.config.lattice_depth - 1, grad_scale=record.batch_size)


@pytest.mark.parametrize("readout,carrier,checkpointing,seed", [("face", "gru", False, 2), ("face", "lstm", True, 1),
                                                               ("shared", "gru", False, 0), ("shared", "gru", True, 0)])
def test_diagnostics_on_and_off_give_identical_outputs_and_gradients(readout, carrier, checkpointing, seed):
    config = _config(readout=readout, carrier_type=carrier, activation_checkpointing=checkpointing)
    proc, x, target = _lively(config, seed)
    y_off, grads_off, none = _forward_backward(proc, x, target, diagnostics=False)
    trace = proc.last_trace
    assert none is None and trace.total_spawned and trace.total_died and trace.total_arrived
    y_on, grads_on, record = _forward_backward(proc, x, target, diagnostics=True)
    assert torch.equal(y_on, y_off)
    assert grads_on.keys() == grads_off.keys()
    for name, g in grads_on.items():
        assert torch.equal(g, grads_off[name]), name
    # the hooks did fire: every executed step received gradient on every watched tensor
    assert len(record.steps) == trace.num_steps
    metrics = _metrics(proc, record)
    for k in range(1, trace.num_steps + 1):
        for key in GRADIENT_KEYS:
            value = metrics[f"diag/grad_{key}_step_{k}"]
            assert math.isfinite(value) and value > 0, (key, k, value)
    assert proc.record_diagnostics is False and proc._recording is None
    proc(x)  # a forward without diagnostics leaves no stale record behind
    assert proc.last_diagnostics is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_record_keeps_nothing_of_the_graph_alive(monkeypatch, checkpointing):
    """The hooked tensors (the carrier inputs here) die with their graph after the backward: the
    record holds detached per-row norms and faces only, never a tensor of the graph."""
    import gc
    import weakref

    proc, x, target = _lively(_config(activation_checkpointing=checkpointing))
    hooked = []
    step = proc.carrier.step

    def capture_step(inputs, h, c):
        hooked.append(weakref.ref(inputs))
        return step(inputs, h, c)

    monkeypatch.setattr(proc.carrier, "step", capture_step)
    proc.record_diagnostics = True
    y = proc(x)
    proc.record_diagnostics = False
    loss = _loss(y, target)
    # kept by the graph until backward (checkpointed: not kept at all, the hooks sit on its nodes)
    assert hooked and all((r() is not None) != checkpointing for r in hooked)
    loss.backward()
    del y, loss
    gc.collect()
    assert all(r() is None for r in hooked), "a hooked tensor outlived its graph"
    record = proc.last_diagnostics
    tensors = [t for s in record.steps for t in [s.valid, *s.squared.values()] if t is not None]
    tensors += [t for t in [*record.step_outputs, record.output_norms, record.landing_cells] if t is not None]
    assert tensors and not any(t.requires_grad or t.grad_fn is not None for t in tensors)


def _captured_gradients(proc, x, target, monkeypatch):
    """Per lattice step, the mean over its flows of |d L_b / d t| for the carrier input, the move
    (dxy, dz_fraction) and the energy logit, by autograd on tensors captured where the engine
    passes them on (carrier.step, lattice.move, carrier.heads): not through the diagnostics' hooks."""
    captured = defaultdict(list)
    step, move, heads = proc.carrier.step, proc.lattice.move, proc.carrier.heads

    def capture_step(inputs, h, c):
        captured["carrier_in"].append(inputs)
        return step(inputs, h, c)

    def capture_move(pos, dxy, dz_fraction):
        captured["dxy"].append(dxy)
        captured["dz"].append(dz_fraction)
        return move(pos, dxy, dz_fraction)

    def capture_heads(top):
        out = heads(top)
        captured["energy"].append(out.energy_logit)
        return out

    monkeypatch.setattr(proc.carrier, "step", capture_step)
    monkeypatch.setattr(proc.lattice, "move", capture_move)
    monkeypatch.setattr(proc.carrier, "heads", capture_heads)
    loss = _loss(proc(x), target) * x.size(0)  # the loss of each flow's own sample
    names = ("carrier_in", "dxy", "dz", "energy")
    flat = [t for name in names for t in captured[name]]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    monkeypatch.undo()
    steps = len(captured["energy"])
    by_name = {name: grads[i * steps:(i + 1) * steps] for i, name in enumerate(names)}

    def sq(g, t):
        return torch.zeros(t.size(0)) if g is None else g.pow(2).reshape(t.size(0), -1).sum(1)

    out = {}
    for k in range(steps):
        per_flow = {
            "carrier_in": sq(by_name["carrier_in"][k], captured["carrier_in"][k]),
            "move": sq(by_name["dxy"][k], captured["dxy"][k]) + sq(by_name["dz"][k], captured["dz"][k]),
            "energy": sq(by_name["energy"][k], captured["energy"][k]),
        }
        for key, v in per_flow.items():
            out[f"diag/grad_{key}_step_{k + 1}"] = float(v.sqrt().mean())
    return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_per_step_equals_autograd_on_the_captured_tensors(monkeypatch, checkpointing):
    config = _config(activation_checkpointing=checkpointing)
    proc, x, target = _lively(config)
    reference = _captured_gradients(build_processor_like(proc, config.replace(activation_checkpointing=False)),
                                    x, target, monkeypatch)
    _, _, record = _forward_backward(proc, x, target, diagnostics=True)
    metrics = _metrics(proc, record)
    steps = proc.last_trace.num_steps
    assert steps >= 3 and len(reference) == 3 * steps
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key
    # steps the forward never ran: no flows, no gradient
    for k in range(steps + 1, config.lattice_depth):
        assert all(metrics[f"diag/grad_{key}_step_{k}"] == 0.0 for key in GRADIENT_KEYS)


def test_gradients_are_zero_where_the_lattice_cannot_affect_the_loss():
    """A closed gate without the survival phantom: y = bias, so nothing in the lattice has any
    effect on the loss, and every per-step gradient is exactly 0; the output shares, which leave
    the gate out, are still measured."""
    proc, x, target = _lively(_config(output_gate_init=0.0, survival_gradient=False))
    with torch.no_grad():
        proc.output_face.output_gate.zero_()
    _, _, record = _forward_backward(proc, x, target, diagnostics=True)
    metrics = _metrics(proc, record)
    assert proc.last_trace.total_arrived > 0
    for k in range(1, proc.config.lattice_depth):
        for key in GRADIENT_KEYS:
            assert metrics[f"diag/grad_{key}_step_{k}"] == 0.0
    assert sum(metrics[f"diag/output_share_step_{k}"] for k in range(1, 6)) == pytest.approx(1.0)
    # the same model with the gate open: gradient reaches every executed step
    with torch.no_grad():
        proc.output_face.output_gate.fill_(1.0)
    _, _, record = _forward_backward(proc, x, target, diagnostics=True)
    assert all(_metrics(proc, record)[f"diag/grad_carrier_in_step_{k}"] > 0
               for k in range(1, proc.last_trace.num_steps + 1))


def test_output_shares_are_fractions_that_add_up_and_decompose_the_face_readout():
    proc, x, target = _lively(_config())
    y, _, record = _forward_backward(proc, x, target, diagnostics=True)
    trace = proc.last_trace
    metrics = _metrics(proc, record)
    shares = [metrics[f"diag/output_share_step_{k}"] for k in range(1, proc.config.lattice_depth)]
    assert all(0.0 <= s <= 1.0 for s in shares)
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)
    # a step without arrivals carries nothing, a step with arrivals carries something
    for k, (arrived, share) in enumerate(zip(trace.arrived + [0] * 5, shares), 1):
        assert (share > 0) == (arrived > 0), (k, arrived, share)
    assert sum(s > 0 for s in shares) >= 2
    # the steps' faces are the readout's parts: gate * sum_k W_out c_k + bias is y
    lattice = proc.output_face
    parts = [torch.zeros(B, proc.config.output_dim) if c is None else c @ lattice.readout_out.weight.t()
             for c in record.step_outputs]
    torch.testing.assert_close(lattice.output_gate.detach() * sum(parts) + lattice.readout_bias.detach(), y)
    # the shares are per sample: each sample's step norms over their sum, averaged over samples
    norms = torch.stack([p.norm(dim=1) for p in parts])  # [S, B]
    expected = (norms / norms.sum(0)).mean(1)
    torch.testing.assert_close(torch.tensor(shares[: len(parts)]), expected)


def test_a_forward_without_arrivals_has_no_output_shares_and_no_landings():
    proc, x, target = _lively(_config())
    with torch.no_grad():  # every flow dies in the first step
        proc.carrier.energy_head.weight.zero_()
        proc.carrier.energy_head.bias.fill_(-10.0)
    _, _, record = _forward_backward(proc, x, target, diagnostics=True)
    assert proc.last_trace.total_arrived == 0
    metrics = _metrics(proc, record)
    assert all(metrics[f"diag/output_share_step_{k}"] == 0.0 for k in range(1, 6))
    assert metrics["diag/landing_cells_per_sample"] == 0.0 and metrics["diag/landing_effective_cells"] == 0.0
    # the survival phantom still reaches the energy head of the dying step
    assert metrics["diag/grad_energy_step_1"] > 0


@pytest.mark.parametrize("snap", [False, True])
def test_landing_cells_equal_a_hand_count_over_the_recorded_landings(snap):
    """The landings of ``trace.paths`` (record_paths) counted by hand: the 4 bilinear corners of
    each landing point, a corner counting when its weight is > 0, energies summed per cell.
    ``snap``: the lateral moves are zeroed, so flows land on cell centres (weights 1, 0, 0, 0)
    and several flows of a sample share cells."""
    proc, x, target = _lively(_config())
    if snap:
        with torch.no_grad():
            proc.carrier.displacement_head.weight[:2].zero_()
            proc.carrier.displacement_head.bias[:2].zero_()
            proc.carrier.spawn_head.weight[1:].zero_()
            proc.carrier.spawn_head.bias[1:].zero_()
    proc.record_paths = True
    _, _, record = _forward_backward(proc, x, target, diagnostics=True)
    landed = proc.last_trace.paths[-1]
    assert landed["batch"].numel() == proc.last_trace.total_arrived > 0
    w, h = proc.config.lattice_width, proc.config.lattice_height
    received = [defaultdict(float) for _ in range(B)]
    for b, (px, py, _), e in zip(landed["batch"].tolist(), landed["pos"].tolist(), landed["energy"].tolist()):
        x0, y0 = min(math.floor(px), w - 1), min(math.floor(py), h - 1)
        fx, fy = px - x0, py - y0
        x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
        for cx, cy, weight in [(x0, y0, (1 - fx) * (1 - fy)), (x1, y0, fx * (1 - fy)), (x0, y1, (1 - fx) * fy),
                               (x1, y1, fx * fy)]:
            if weight > 0:
                received[b][(cx, cy)] += e * weight
    cells = [len(r) for r in received]
    effective = []
    for r in received:
        total = sum(r.values())
        effective.append(math.exp(-sum(v / total * math.log(v / total) for v in r.values())) if total else 0.0)
    if snap:  # on cell centres one corner takes everything, and flows share cells
        assert sum(cells) < proc.last_trace.total_arrived
    assert record.landing_cells.tolist() == cells
    torch.testing.assert_close(record.landing_effective, torch.tensor(effective), rtol=1e-5, atol=1e-6)
    metrics = _metrics(proc, record)
    assert metrics["diag/landing_cells_per_sample"] == pytest.approx(sum(cells) / B)
    assert metrics["diag/landing_effective_cells"] == pytest.approx(sum(effective) / B, rel=1e-5)
    assert all(1.0 - 1e-6 <= e <= c for e, c in zip(effective, cells) if c)


def test_start_churn_is_zero_for_unchanged_parameters_and_counts_changed_start_cells():
    config = _config(initial_flows_per_sample=4)
    proc = build_processor(config)
    inputs = torch.randn(PROBE_SIZE, config.input_dim, generator=torch.Generator().manual_seed(5))
    probe = StartCellProbe(inputs)
    assert float(probe.update(proc.input_face)) == 0.0  # the first logged step
    assert float(probe.update(proc.input_face)) == 0.0  # nothing changed
    before = StartCellProbe.start_cells(proc.input_face, inputs)
    # the cells where the injected flows start
    injected = proc.inject(inputs).pos[:, :2].long()
    start = (injected[:, 1] * config.lattice_width + injected[:, 0]).view(PROBE_SIZE, -1)
    assert torch.equal(start.sort(1).values, before.sort(1).values)
    with torch.no_grad():  # perturb the injection amplitude weights
        proc.input_face.face_keys.add_(0.5 * torch.randn_like(proc.input_face.face_keys))
    churn = float(probe.update(proc.input_face))
    after = StartCellProbe.start_cells(proc.input_face, inputs)
    by_hand = sum(len(set(a) - set(b)) for a, b in zip(after.tolist(), before.tolist())) / after.numel()
    assert churn > 0 and churn == pytest.approx(by_hand)
    assert float(probe.update(proc.input_face)) == 0.0


def test_compile_runs_a_diagnostics_forward_and_its_recompute_eagerly():
    """With compile: true a diagnostics forward runs the step's parts eagerly (the compiled graphs
    are replaced here by ones that raise, so a call to any of them fails the test); so does its
    recompute under activation checkpointing; a plain forward still calls the compiled graphs."""
    config = _config(compile=True, activation_checkpointing=True)
    proc, x, target = _lively(config)

    def compiled_graph(*args):
        raise RuntimeError("the compiled graph ran")

    proc._compiled = {name: compiled_graph for name in ("decide", "compact", "deposit")}
    y, grads, record = _forward_backward(proc, x, target, diagnostics=True)
    metrics = _metrics(proc, record)
    assert all(metrics[f"diag/grad_carrier_in_step_{k}"] > 0 for k in range(1, proc.last_trace.num_steps + 1))
    # eager on padded rows (the compiled shapes) computes what the unpadded eager engine computes
    eager = build_processor_like(proc, config.replace(compile=False, activation_checkpointing=False))
    y_ref, grads_ref, record_ref = _forward_backward(eager, x, target, diagnostics=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    reference = _metrics(eager, record_ref)
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
    with pytest.raises(RuntimeError, match="the compiled graph ran"):
        proc(x)


# ---- the trainer -------------------------------------------------------------------------------

def _pairs(config, n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, config.input_dim, generator=gen), torch.randn(n, config.output_dim, generator=gen)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A short training run with log_every 2: its run folder, and whether each forward recorded."""
    run_dir = tmp_path_factory.mktemp("diag") / "run"
    config = _config(batch_size=8, log_every=2, eval_every=3, checkpoint_every=100, warmup_steps=1,
                     learning_rate=3e-2)
    torch.manual_seed(0)
    proc = FlowProcessor.from_config(config)
    flags = []  # per forward: (training step it belongs to, training forward, recorded diagnostics)
    forward = proc.forward

    def watched(x):
        flags.append((trainer.step + 1, torch.is_grad_enabled(), proc.record_diagnostics))
        return forward(x)

    proc.forward = watched
    trainer = EnergyTrainer(proc, config, run_dir=run_dir, progress=False)
    x, y = _pairs(config)
    trainer.train(x[:32], y[:32], val_inputs=x[32:], val_targets=y[32:], max_steps=7, total_steps=7)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows, flags, config


def test_the_trainer_logs_diagnostics_on_logged_steps_only(logged_run):
    _, rows, flags, config = logged_run
    steps = config.lattice_depth - 1
    expected = {f"diag/grad_{k}_step_{s}" for k in GRADIENT_KEYS for s in range(1, steps + 1)}
    expected |= {f"diag/output_share_step_{s}" for s in range(1, steps + 1)}
    expected |= {"diag/landing_cells_per_sample", "diag/landing_effective_cells", "diag/start_churn"}
    logged = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 7]  # log_every 2, and the last step
    for row in logged:
        assert {k for k in row if k.startswith("diag/")} == expected, row["step"]
        assert all(math.isfinite(row[k]) and row[k] >= 0 for k in expected)
        assert row["diag/grad_carrier_in_step_1"] > 0
    assert logged[0]["diag/start_churn"] == 0.0  # nothing to compare with yet
    others = [r for r in rows if "train/loss" not in r]
    assert [r["step"] for r in others] == [3, 6, 7] and all("val/loss" in r for r in others)
    assert not any(k.startswith("diag/") for r in others for k in r)
    # the training forwards of the logged steps recorded, no other forward did (evaluations neither)
    training = [(step, recorded) for step, grad, recorded in flags if grad]
    assert training == [(step, step in (2, 4, 6, 7)) for step in range(1, 8)]
    assert not any(recorded for _, grad, recorded in flags if not grad) and len(flags) > len(training)


def test_learning_diagnostics_off_logs_no_diag_keys():
    config = _config(batch_size=8, learning_diagnostics=False)
    trainer = EnergyTrainer(FlowProcessor.from_config(config), config, progress=False)
    trainer.scheduler = warmup_cosine_scheduler(trainer.optimizer, 0, 10)
    metrics = trainer.train_step(*_pairs(config, n=8), log=True)
    assert "flows/active_step_1" in metrics and not any(k.startswith("diag/") for k in metrics)


def _trainer_step(config, batch, log=True):
    proc, _, _ = _lively(config)
    trainer = EnergyTrainer(proc, config, progress=False)
    trainer.scheduler = warmup_cosine_scheduler(trainer.optimizer, 0, 10)
    return trainer, trainer.train_step(*batch, log=log)


@pytest.mark.parametrize("micro,checkpointing", [(3, False), (1, True)])
def test_micro_batches_and_checkpointing_give_the_whole_batch_diagnostics(micro, checkpointing):
    """A flow's gradient is the whole batch's however the batch is split (the trainer weights each
    micro-batch's loss by its rows), and shares and landings are per sample: the same numbers."""
    config = _config(batch_size=7, memory_check=False)
    batch = _pairs(config, n=7, seed=3)
    _, whole = _trainer_step(config, batch)
    trainer, split = _trainer_step(config.replace(micro_batch_size=micro, activation_checkpointing=checkpointing),
                                   batch)
    assert trainer.micro_batch_size == micro and trainer.processor.activation_checkpointing == checkpointing
    keys = [k for k in whole if k.startswith("diag/")]
    assert len(keys) == 4 * (config.lattice_depth - 1) + 2  # no probe outside train(): no churn
    assert whole["diag/grad_carrier_in_step_2"] > 0 and whole["diag/output_share_step_3"] > 0
    for key in keys:
        assert split[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-9), key


def test_steps_off_the_log_grid_cost_no_op_or_sync_of_the_diagnostics():
    config = _config(batch_size=B)
    batch = (torch.randn(B, config.input_dim), torch.randn(B, config.output_dim))
    counts = {}
    for name, on, log in [("off", False, False), ("on", True, False), ("on, logged", True, True),
                          ("off, logged", False, True)]:
        proc, _, _ = _lively(config.replace(learning_diagnostics=on))
        trainer = EnergyTrainer(proc, config.replace(learning_diagnostics=on), progress=False)
        trainer.scheduler = warmup_cosine_scheduler(trainer.optimizer, 0, 10)
        with count_ops() as mode:
            trainer.train_step(*batch, log=log)
        counts[name] = mode.count
    assert counts["on"].ops == counts["off"].ops and counts["on"].syncs == counts["off"].syncs
    assert counts["on"].by_name == counts["off"].by_name
    # the counter does see the diagnostics where they run: a logged step's hooks and statistics
    assert counts["on, logged"].ops > counts["off, logged"].ops


def test_compiled_training_logs_diagnostics_without_new_graphs(monkeypatch):
    """Real graphs (dynamo + AOT autograd, the aot_eager backend): logged steps run eagerly with
    diagnostics, and a second pass over logged and unlogged steps compiles nothing new (the
    engine's diagnostics check compiles to a guard, not to a recompile)."""
    import efgraph.core.flow_processor as fp
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fp, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        config = _config(compile=True, memory_check=False)
        torch.manual_seed(0)
        trainer = EnergyTrainer(FlowProcessor.from_config(config), config, progress=False)
        trainer.scheduler = warmup_cosine_scheduler(trainer.optimizer, 0, 100)
        batch = (torch.randn(B, config.input_dim), torch.randn(B, config.output_dim))
        logged = [trainer.train_step(*batch, log=i % 2 == 1) for i in range(4)]
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        logged += [trainer.train_step(*batch, log=i % 2 == 1) for i in range(4)]
        assert counters["stats"]["unique_graphs"] == graphs
        for i, metrics in enumerate(logged):
            assert ("diag/grad_carrier_in_step_1" in metrics) == (i % 2 == 1)
            if i % 2:
                assert metrics["diag/grad_carrier_in_step_1"] > 0
    finally:
        torch._dynamo.reset()


# ---- the reports ---------------------------------------------------------------------------------

def test_the_reports_draw_a_line_per_lattice_step(logged_run):
    pytest.importorskip("matplotlib")
    from efgraph.training.report import DIAGNOSTICS_PANELS, RunRecord, _curve_images, expand_keys

    run_dir, rows, _, config = logged_run
    run = RunRecord(run_dir, "run", config.to_dict(), None, rows)
    keys = expand_keys(("diag/grad_carrier_in_step_*",), rows)
    assert keys == [f"diag/grad_carrier_in_step_{k}" for k in range(1, config.lattice_depth)]
    titles = {t for t, _ in DIAGNOSTICS_PANELS}
    images = _curve_images([run])
    drawn = {t for t in titles for img in images if img.startswith(f"<img alt='{html.escape(t)}'")}
    assert drawn == titles

    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    from efgraph.training.report import build_wandb_report

    report = build_wandb_report([run], [], entity="team", project="efgraph")
    grid = [b for b in report.blocks if isinstance(b, wr.PanelGrid)][0]
    plots = {p.title: p for p in grid.panels if isinstance(p, wr.LinePlot)}
    carrier = plots["Gradient reaching each lattice step: |d loss / d carrier input| per flow"]
    assert carrier.metric_regex == r"^diag/grad_carrier_in_step_\d+$" and carrier.y == []
    assert plots["Output-face cells receiving energy per sample"].y == ["diag/landing_cells_per_sample",
                                                                       "diag/landing_effective_cells"]
    assert plots["Validation loss"].y == ["val/loss"] and plots["Validation loss"].metric_regex is None
