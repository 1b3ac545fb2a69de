"""The adaptive flow budget (efgraph.training.flow_budget): it binds in the engine, follows the compute
target up and down, follows the memory limit (its cap is the largest budget whose worst case fits
under the plan), never exceeds the cap or max_active_flows, and the trainer applies, logs, saves and
restores it."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import build_processor, force_spawning, tiny_config
from efgraph import EnergyConfig, EnergyTrainer, FlowProcessor, load_model
from efgraph.config import ARCHITECTURE_KEYS, RESUME_MUTABLE_KEYS
from efgraph.model_io import export_model
from efgraph.training import flow_budget
from efgraph.training import trainer as trainer_module
from efgraph.training.flow_budget import (AdaptiveFlowBudget, at_budget, budget_cap, budget_for_flow_steps,
                                          plan_adaptive_budget)
from efgraph.training.schedule import warmup_cosine_scheduler
from efgraph.utils import memory
from efgraph.utils.memory import estimate_training_memory, plan_memory


def _spawning_config(**overrides) -> EnergyConfig:
    """4 flows a sample that may grow by 10 a step to 40 over 7 steps (worst case 170 flow-steps)."""
    base = dict(initial_flows_per_sample=4, max_active_flows=40, max_spawn_per_step=10, lattice_depth=8,
                energy_threshold=0.001, spawn_threshold=0.002, batch_size=2)
    return tiny_config(**{**base, **overrides})


def _spawn_every_step(proc: FlowProcessor) -> None:
    """Every flow spawns whenever it may, keeps its energy and moves one cell in z a step: the
    forward runs all D-1 steps and only the budgets stop the flows from growing."""
    force_spawning(proc)
    with torch.no_grad():
        proc.carrier.displacement_head.weight[2].zero_()
        proc.carrier.displacement_head.bias[2] = -30.0  # dz = one cell per step
        proc.carrier.energy_head.weight.zero_()
        proc.carrier.spawn_head.weight[0].zero_()


def _flows_per_sample(proc: FlowProcessor, x: torch.Tensor) -> list[list[int]]:
    """Each lattice step's active flows of each sample, from the recorded paths."""
    proc.record_paths = True
    with torch.no_grad():
        proc(x)
    proc.record_paths = False
    return [torch.bincount(step["batch"], minlength=x.size(0)).tolist() for step in proc.last_trace.paths[:-1]]


# ---- the engine honours the budget ----------------------------------------------------------------
@pytest.mark.parametrize("budget", [4, 13, 40])
def test_the_budget_binds_every_sample_reaches_it_and_none_exceeds_it(budget):
    config = _spawning_config()
    proc = build_processor(config)
    _spawn_every_step(proc)
    proc.active_flow_budget = budget
    per_step = _flows_per_sample(proc, torch.randn(2, config.input_dim))
    assert len(per_step) == config.lattice_depth - 1
    assert max(max(step) for step in per_step) <= budget
    assert per_step[-1] == [budget, budget]  # it binds: spawning would go past it
    # what the budget allows is what the forward runs: the worst case of max_active_flows = budget
    assert sum(proc.last_trace.active) == 2 * at_budget(config, budget).worst_case_flow_steps


# ---- the compute target ---------------------------------------------------------------------------
def _follow(controller: AdaptiveFlowBudget, proc: FlowProcessor, x: torch.Tensor, updates: int) -> list[float]:
    """Forwards under the controller's budget; the measured flow-steps per sample after each."""
    measured = []
    for _ in range(updates):
        proc.active_flow_budget = controller.budget
        with torch.no_grad():
            proc(x)
        controller.update(sum(proc.last_trace.active), proc.last_trace.batch_size)
        measured.append(controller.last_flow_steps_per_sample)
    return measured


def test_flow_steps_follow_the_target_up_and_down():
    config = _spawning_config(flow_budget="adaptive", flow_budget_target=60.0)
    proc = build_processor(config)
    _spawn_every_step(proc)
    x = torch.randn(2, config.input_dim)
    controller = AdaptiveFlowBudget(config, plan=None)
    # the first budget is the one whose worst case reaches the target: 4 + 8 + 5 x 10 = 62 flow-steps
    assert controller.budget == 10 == budget_for_flow_steps(config, 60.0)
    assert _follow(controller, proc, x, 1) == [62.0]

    controller.target = 140.0  # up: the measured flow-steps climb toward it
    up = _follow(controller, proc, x, 7)
    assert up[0] == 62.0 and all(b >= a for a, b in zip(up, up[1:]))
    assert abs(up[-1] - 140) <= 0.05 * 140, up
    assert controller.budget < config.max_active_flows  # it binds below the ceiling

    controller.target = 40.0  # down
    down = _follow(controller, proc, x, 8)
    assert all(b <= a for a, b in zip(down, down[1:])) and down[-1] < up[-1]
    assert abs(down[-1] - 40) <= 0.1 * 40, down


def test_target_zero_is_the_cap_and_an_unbinding_budget_climbs_to_the_cap():
    config = _spawning_config(flow_budget="adaptive")
    controller = AdaptiveFlowBudget(config, plan=None)
    assert controller.budget == controller.cap == config.max_active_flows
    assert controller.update(flow_steps=10.0, batch_size=2) == config.max_active_flows
    # the dynamics use 30 flow-steps whatever the budget (below the target of 100): the budget is
    # no constraint there, so it rises to the cap and stays, without passing it
    controller = AdaptiveFlowBudget(config.replace(flow_budget_target=100.0), plan=None)
    start = controller.budget
    budgets = [controller.update(flow_steps=60.0, batch_size=2) for _ in range(12)]
    assert start < config.max_active_flows and budgets[-1] == config.max_active_flows
    assert max(budgets) == config.max_active_flows


# ---- the memory plan's cap --------------------------------------------------------------------------
def _planned(config, limit):
    num_parameters = sum(p.numel() for p in FlowProcessor.from_config(config).parameters())
    return num_parameters, estimate_training_memory(config, num_parameters, config.batch_size, limit)


def test_the_cap_is_the_largest_budget_that_fits_and_follows_the_free_memory():
    config = _spawning_config(flow_budget="adaptive", carrier_hidden_dim=32, batch_size=4)
    num_parameters, plan = _planned(config, 2**30)
    controller = AdaptiveFlowBudget(config, plan)
    assert controller.cap == controller.budget == config.max_active_flows  # 1 GiB: everything fits

    def total(n, limit):
        return plan_memory(at_budget(config, n), num_parameters, plan.batch_size, plan.micro_batch_size,
                           plan.activation_checkpointing, limit).total_bytes

    # limits between the worst cases of budgets 4 and 40 under this plan: the free memory drops
    lows = [total(n, 0) for n in (30, 20, 9)]
    caps = []
    for limit in lows:
        cap = controller.replan(limit)
        caps.append(cap)
        assert total(cap, limit) <= limit < total(cap + 1, limit)  # the largest that fits
        assert controller.budget == cap  # no target: the budget is the cap, and it drops at once
    assert caps == [30, 20, 9]
    assert controller.replan(2**30) == config.max_active_flows  # free memory back: the cap rises again
    assert controller.budget == config.max_active_flows
    # not even the no-spawn budget fits: the budget stays at that floor (with a warning)
    assert controller.replan(1) == config.initial_flows_per_sample


def test_a_target_budget_drops_with_the_cap_and_stays_under_it():
    config = _spawning_config(flow_budget="adaptive", flow_budget_target=160.0, carrier_hidden_dim=32)
    num_parameters, plan = _planned(config, 2**30)
    controller = AdaptiveFlowBudget(config, plan)
    assert controller.budget == budget_for_flow_steps(config, 160.0) == 36  # 162 flow-steps at worst
    limit = plan_memory(at_budget(config, 15), num_parameters, plan.batch_size, plan.micro_batch_size,
                        plan.activation_checkpointing, 0).total_bytes
    assert controller.replan(limit) == 15 and controller.budget == 15
    # the target asks for more than fits: the budget stays at the cap
    assert [controller.update(flow_steps=2 * 60.0, batch_size=2) for _ in range(5)] == [15] * 5


def test_the_budget_never_leaves_floor_and_cap_nor_exceeds_max_active_flows():
    config = _spawning_config(flow_budget="adaptive", flow_budget_target=90.0, carrier_hidden_dim=32)
    num_parameters, plan = _planned(config, 2**30)
    controller = AdaptiveFlowBudget(config, plan)
    worst = plan_memory(config, num_parameters, plan.batch_size, plan.micro_batch_size,
                        plan.activation_checkpointing, 0).total_bytes
    floor = plan_memory(at_budget(config, config.initial_flows_per_sample), num_parameters, plan.batch_size,
                        plan.micro_batch_size, plan.activation_checkpointing, 0).total_bytes
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        if rng.random() < 0.2:  # the free memory changes, between what the floor needs and twice the worst case
            controller.replan(rng.randrange(floor, 2 * worst))
        budget = controller.update(flow_steps=rng.choice([0.0, 1.0, rng.uniform(0, 400), 1e6]), batch_size=2)
        assert config.initial_flows_per_sample <= budget <= controller.cap <= config.max_active_flows
        assert plan_memory(at_budget(config, budget), num_parameters, plan.batch_size, plan.micro_batch_size,
                           plan.activation_checkpointing, 0).total_bytes <= controller.limit_bytes
        seen.add(budget)
    assert {config.initial_flows_per_sample, config.max_active_flows} <= seen  # both ends were reached


def test_plan_runs_the_largest_budget_that_fits_where_the_fixed_budget_is_refused():
    config = _spawning_config(flow_budget="adaptive", carrier_hidden_dim=32, batch_size=4)
    num_parameters = sum(p.numel() for p in FlowProcessor.from_config(config).parameters())
    # checkpointed micro-batches of one row at budget 12 fit exactly; at 40 nothing fits
    limit = plan_memory(at_budget(config, 12), num_parameters, 4, 1, True, 0).total_bytes
    with pytest.raises(ValueError, match="memory_check"):
        estimate_training_memory(config, num_parameters, 4, limit)
    plan = plan_adaptive_budget(config, num_parameters, 4, limit)
    assert (plan.activation_checkpointing, plan.micro_batch_size) == (True, 1)
    assert budget_cap(config, plan) == 12
    with pytest.raises(ValueError, match="initial_flows_per_sample"):  # not even the no-spawn budget fits
        plan_adaptive_budget(config, num_parameters, 4, 1024)


# ---- the trainer -------------------------------------------------------------------------------------
def _small(**overrides) -> EnergyConfig:
    """Fewer steps, for the trainer: 4 flows a sample, +10 a step to 20 over 5 steps (worst case 68)."""
    return _spawning_config(**{"lattice_depth": 6, "max_active_flows": 20, **overrides})


def _trainer(config, **kwargs) -> EnergyTrainer:
    proc = build_processor(config)
    _spawn_every_step(proc)
    trainer = EnergyTrainer(proc, config, progress=False, **kwargs)
    trainer.scheduler = warmup_cosine_scheduler(trainer.optimizer, 0, 10)
    return trainer


def _batch(config, n=2):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, config.input_dim, generator=gen), torch.randn(n, config.output_dim, generator=gen)


def test_fixed_trainer_logs_max_active_flows_as_the_budget():
    config = _small(max_active_flows=12)
    trainer = _trainer(config)
    metrics = trainer.train_step(*_batch(config))
    assert trainer.flow_budget is None and "flows/budget_cap" not in metrics
    assert metrics["flows/budget"] == 12.0
    assert metrics["flows/flow_steps_per_sample"] == at_budget(config, 12).worst_case_flow_steps


def test_adaptive_trainer_moves_logs_and_applies_the_budget(tmp_path):
    config = _small(flow_budget="adaptive", flow_budget_target=45.0, log_every=1)
    trainer = _trainer(config, run_dir=tmp_path)
    # the first budget is the one whose worst case reaches the target (11: 45 flow-steps); start
    # the controller elsewhere to see the trainer move it
    assert trainer.flow_budget.budget == trainer.processor.active_flow_budget == 11
    trainer.flow_budget.value = 20.0
    x, y = _batch(config)
    budgets, measured = [], []
    for _ in range(3):
        metrics = trainer.train_step(x, y)
        trainer.step += 1
        trainer.run_logger.log(metrics, trainer.step)
        budgets.append(metrics["flows/budget"])
        measured.append(metrics["flows/flow_steps_per_sample"])
        # the forward ran under the logged budget (every flow spawns: it binds at every step)
        assert measured[-1] == at_budget(config, int(budgets[-1])).worst_case_flow_steps
        assert metrics["flows/budget_cap"] == config.max_active_flows  # the CPU's memory: no cap
    # between the steps the budget moved toward the target: 20 * (45 / 68) ** 0.5 = 16.3, ...
    assert budgets == [20, 16, 14] and measured == [68, 60, 54]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["flows/budget"] for row in rows] == budgets  # the W&B / JSONL metric
    # evaluation runs under the budget the last training forward ran under
    trainer.evaluate(x, y)
    assert max(trainer.processor.last_trace.active) == 2 * budgets[-1] < 2 * config.max_active_flows


def test_adaptive_trainer_fits_a_device_where_fixed_is_refused_and_follows_its_free_memory(monkeypatch):
    config = _small(flow_budget="adaptive", carrier_hidden_dim=32, batch_size=2)
    num_parameters = sum(p.numel() for p in FlowProcessor.from_config(config).parameters())

    def limit_at(budget):  # checkpointed micro-batches of one row at this budget fit exactly
        return plan_memory(at_budget(config, budget), num_parameters, 2, 1, True, 0).total_bytes

    free = [limit_at(9)]
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: free[0])
    # what the process holds (on the CPU its resident set) is what the tensors' churn makes it: pinned
    for module in (flow_budget, trainer_module):
        monkeypatch.setattr(module, "held_memory_bytes", lambda device: 0)
    with pytest.raises(ValueError, match="memory_check"):
        _trainer(config.replace(flow_budget="fixed"))
    trainer = _trainer(config)
    assert trainer.flow_budget.cap == trainer.flow_budget.budget == 9
    assert trainer.memory_plan.total_bytes <= free[0] and trainer.micro_batch_size == 1
    x, y = _batch(config)
    metrics = trainer.train_step(x, y)
    assert metrics["flows/budget"] == metrics["flows/budget_cap"] == 9
    assert max(trainer.processor.last_trace.active) == 2 * 9  # two micro-batches of one row, each at 9
    free[0] = limit_at(6)  # the free memory drops: the next logged step re-plans, the budget follows
    assert trainer.train_step(x, y)["flows/budget_cap"] == 6
    metrics = trainer.train_step(x, y)
    assert metrics["flows/budget"] == 6 and max(trainer.processor.last_trace.active) == 2 * 6


def test_the_budget_is_saved_resumed_kept_with_the_best_state_and_exported(tmp_path):
    config = _small(flow_budget="adaptive", flow_budget_target=30.0, log_every=1, eval_every=2,
                    checkpoint_every=2, batch_size=2, warmup_steps=0)
    x, y = _batch(config, n=4)

    def fresh(run_dir):
        torch.manual_seed(0)
        return EnergyTrainer(FlowProcessor.from_config(config), config, run_dir=run_dir, progress=False)

    straight = fresh(tmp_path / "a")
    straight.train(x, y, epochs=2, val_inputs=x[:2], val_targets=y[:2])
    first = fresh(tmp_path / "b")
    first.train(x, y, epochs=2, val_inputs=x[:2], val_targets=y[:2], max_steps=2)
    saved = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["extra"]
    assert saved["flow_budget"]["value"] == first.flow_budget.value
    second = fresh(tmp_path / "b")
    second.train(x, y, epochs=2, val_inputs=x[:2], val_targets=y[:2], resume_from=tmp_path / "b/checkpoints/last.pt")
    assert second.flow_budget.value == straight.flow_budget.value  # the same trajectory as without the stop
    rows = [json.loads(line) for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    budgets = [r["flows/budget"] for r in rows if "flows/budget" in r]
    assert budgets == [r["flows/budget"] for r in straight_rows if "flows/budget" in r]
    # the best state comes back with the budget it was evaluated under; the model files carry it
    second.restore_best()
    best_budget = second.processor.active_flow_budget
    assert best_budget == torch.load(tmp_path / "b/checkpoints/best.pt", weights_only=True)["extra"]["active_flow_budget"]
    assert load_model(tmp_path / "b").active_flow_budget == best_budget
    assert load_model(export_model(second.processor, tmp_path / "model") / "model.safetensors").active_flow_budget \
        == best_budget


# ---- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"flow_budget": "auto"}, "flow_budget: must be one of"),
        ({"flow_budget": "adaptive", "flow_budget_target": -1.0}, "flow_budget_target: must be >= 0"),
        ({"flow_budget_target": 50.0}, "flow_budget_target: only used with flow_budget: adaptive"),
        ({"flow_budget": "adaptive", "flow_budget_target": 171.0}, "flow_budget_target: must be <= 170"),
        ({"flow_budget": "adaptive", "flow_budget_target": float("inf")}, "flow_budget_target"),
        ({"flow_budget": 1}, "flow_budget"),
    ],
)
def test_bad_flow_budget_settings_raise_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        _spawning_config(**changes)


def test_flow_budget_settings_default_fixed_round_trip_and_are_no_resume_knobs(tmp_path):
    assert (EnergyConfig().flow_budget, EnergyConfig().flow_budget_target) == ("fixed", 0.0)
    config = _spawning_config(flow_budget="adaptive", flow_budget_target=170)  # the worst case is reachable
    path = tmp_path / "c.yaml"
    config.to_yaml(path)
    assert EnergyConfig.from_yaml(path) == config and config.flow_budget_target == 170.0
    # they change what a run computes (not its shapes): a resume may not change them
    for name in ("flow_budget", "flow_budget_target"):
        assert name not in RESUME_MUTABLE_KEYS and name not in ARCHITECTURE_KEYS
