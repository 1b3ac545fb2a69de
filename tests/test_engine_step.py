"""The vectorised step and output face equal slow per-flow references (tests/reference.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reference import cell_from_id, dense_face, dense_readout, reference_step
from conftest import build_processor, force_spawning, spread_next_energies, tiny_config


def _rows(state):
    return [
        dict(h=state.h[:, i], c=None if state.c is None else state.c[:, i], pos=tuple(state.pos[i].tolist()),
             energy=float(state.energy[i]), batch=int(state.batch[i]), flow_id=int(state.flow_id[i]))
        for i in range(state.num_flows)
    ]


def _assert_step_equal(proc, state, batch_size, next_id):
    fast = proc.step(state, batch_size, next_id)
    slow = reference_step(proc, state, batch_size, next_id)
    batch_of, cells = cell_from_id(proc.config, fast.occupied_cell_id)
    assert [(int(b), int(c[2]), int(c[1]), int(c[0])) for b, c in zip(batch_of, cells)] == slow["occupied"]
    assert fast.num_spawned == slow["num_spawned"]
    assert fast.num_died == slow["num_died"]
    fast_rows = _rows(fast.next_state)
    assert len(fast_rows) == len(slow["next"])
    for a, b in zip(fast_rows, slow["next"]):
        assert (a["batch"], a["flow_id"]) == (b["batch"], b["flow_id"])
        assert a["pos"] == pytest.approx(b["pos"], abs=1e-5)
        assert a["energy"] == pytest.approx(b["energy"], abs=1e-6)
        torch.testing.assert_close(a["h"], b["h"], atol=1e-5, rtol=1e-4)
        if a["c"] is not None:
            torch.testing.assert_close(a["c"], b["c"], atol=1e-5, rtol=1e-4)
    arr = fast.arrivals
    assert arr.flow_id.tolist() == [r["flow_id"] for r in slow["arrivals"]]
    for i, r in enumerate(slow["arrivals"]):
        assert tuple(arr.xy[i].tolist()) == pytest.approx(r["xy"], abs=1e-5)
        assert float(arr.energy[i]) == pytest.approx(r["energy"], abs=1e-6)
        torch.testing.assert_close(arr.value[i], r["value"], atol=1e-5, rtol=1e-4)
    assert float(fast.books.dissipated) == pytest.approx(slow["energy_dissipated"], abs=1e-5)
    assert float(fast.books.died) == pytest.approx(slow["energy_died"], abs=1e-5)
    assert float(fast.books.created) == pytest.approx(slow["energy_created"], abs=1e-5)
    assert float(fast.neighbourhood_flows) == slow["neighbourhood_flows"]
    return fast


@pytest.mark.parametrize("carrier_type", ["gru", "lstm"])
@pytest.mark.parametrize("aggregation", ["mean", "sum"])
@pytest.mark.parametrize("spawning", [False, True])
# radius 0 always reads the edges (one per flow); at radius 1 the tiny lattice picks the grid
@pytest.mark.parametrize("radius,layout", [(0, "chosen"), (1, "chosen"), (1, "edges"), (1, "grid")])
def test_every_step_of_a_forward_equals_the_reference(carrier_type, aggregation, spawning, radius, layout,
                                                      monkeypatch):
    """Each message-passing layout (the one the step picks by cost, and each forced) equals the
    per-flow reference."""
    from efgraph.core import flow_step
    if layout != "chosen":
        monkeypatch.setattr(flow_step, "grid_is_cheaper", lambda *args: layout == "grid")
    overrides = dict(carrier_type=carrier_type, aggregation=aggregation, max_lateral_step=3.0,
                     interaction_radius=radius, lattice_width=2, lattice_height=3)  # small face: flows share cells
    if spawning:
        overrides.update(energy_threshold=0.001, spawn_threshold=0.002)
    else:
        # energies set around 0.5: some flows die, some arrive; depth 3: every flow's first jump
        # ends in the z = 1 layer (dz < 2), where flows of a sample share cells on the small face
        overrides.update(energy_threshold=0.5, lattice_depth=3, initial_flows_per_sample=6)
    config = tiny_config(**overrides)
    proc = build_processor(config, seed=1)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(2))
    if spawning:
        force_spawning(proc)
    else:
        with torch.no_grad():  # start energies spread over (0, 1), long jumps,
            proc.input_face.energy_bias.fill_(-2.0)
            proc.input_face.face_keys.mul_(5.0)
            proc.carrier.displacement_head.bias[2] = 2.0
        spread_next_energies(proc, x)  # and next energies around the threshold 0.5: some flows die, some arrive
    with torch.no_grad():
        state = proc.inject(x)
        # the second flow of every sample starts on its first flow's cell: flows share cells
        # whatever the learned injection does (every sample's flows are consecutive rows)
        k = config.initial_flows_per_sample
        pos = state.pos.clone()
        pos[1::k] = pos[0::k]
        state = dataclasses.replace(state, pos=pos)
        next_id, steps, shared, heard_others = state.num_flows, 0, 0, 0.0
        seen = {"spawned": 0, "died": 0, "arrived": 0}
        while state.num_flows:
            fast = _assert_step_equal(proc, state, 3, next_id)
            shared += state.num_flows - fast.occupied_cell_id.numel()
            heard_others += float(fast.neighbourhood_flows) - state.num_flows
            next_id += fast.num_spawned
            seen["spawned"] += fast.num_spawned
            seen["died"] += fast.num_died
            seen["arrived"] += fast.arrivals.batch.numel()
            state, steps = fast.next_state, steps + 1
    assert shared > 0, "the test lattice should put several flows in one cell"
    if radius:  # flows of other cells were heard as well
        assert heard_others > shared
    if spawning:
        assert seen["spawned"] > 0
    else:
        assert seen["died"] > 0 and seen["arrived"] > 0


def _random_arrivals(config, a=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, 3, (a,), generator=g)
    xy = torch.rand(a, 2, generator=g) * torch.tensor([config.lattice_width - 1.0, config.lattice_height - 1.0])
    xy[0] = torch.tensor([config.lattice_width - 1.0, config.lattice_height - 1.0])  # exact corner of the face
    xy[1] = torch.tensor([0.0, 2.0])  # exactly on cell centres
    return batch, xy, torch.rand(a, generator=g), torch.randn(a, config.face_channels, generator=g)


@pytest.mark.parametrize("readout,layout", [("face", "chosen"), ("face", "landings"), ("face", "grid"),
                                            ("shared", "chosen")])
def test_output_face_equals_a_dense_face_read_cell_by_cell(readout, layout, monkeypatch):
    from efgraph.core import readout as readout_module
    if layout != "chosen":
        monkeypatch.setattr(readout_module, "face_grid_is_cheaper", lambda *args: layout == "grid")
    config = tiny_config(output_gate_init=0.7, readout=readout)
    proc = build_processor(config)
    with torch.no_grad():
        proc.output_face.readout_bias.normal_()
    batch, xy, energy, value = _random_arrivals(config)
    with torch.no_grad():
        fast_y = proc.output_face.read(proc.output_face.collect(batch, xy, energy, value, 3))
        dense_v, _ = dense_face(proc, batch, xy, energy, value, 3)
        torch.testing.assert_close(fast_y, dense_readout(proc, dense_v), atol=1e-5, rtol=1e-5)


def test_shared_readout_deposits_equal_a_dense_face():
    config = tiny_config(readout="shared")
    proc = build_processor(config)
    batch, xy, energy, value = _random_arrivals(config)
    with torch.no_grad():
        dep = proc.output_face.deposit_on_cells(batch, xy, energy, value, 3)
        dense_v, dense_e = dense_face(proc, batch, xy, energy, value, 3)
        w, h = config.lattice_width, config.lattice_height
        fast_v = torch.zeros(3 * h * w, config.face_channels).index_add_(0, dep.cell_id, dep.values).view(3, h, w, -1)
        fast_e = torch.zeros(3 * h * w).index_add_(0, dep.cell_id, dep.energy).view(3, h, w)
        torch.testing.assert_close(fast_v, dense_v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast_e, dense_e, atol=1e-6, rtol=1e-6)
        # energy is conserved by the bilinear deposit
        assert float(dep.energy.sum()) == pytest.approx(float(energy.sum()), rel=1e-6)
    # only hit cells are materialised; the padding rows belong to no sample
    assert dep.cell_id.numel() <= 4 * batch.numel()
    assert (dep.batch[int(dep.num_cells):] == 3).all()


def test_shared_readout_padding_rows_reach_no_sample_even_with_a_bias():
    """The padding rows of the compacted face used to land on sample 0 and add 0 only because the
    hidden layer has no bias; with a bias they must still add nothing to any sample."""
    config = tiny_config(readout="shared")
    proc = build_processor(config)
    lat = proc.output_face
    biased = torch.nn.Linear(config.face_channels, config.readout_hidden_dim, bias=True)
    with torch.no_grad():
        biased.weight.copy_(lat.readout_hidden.weight)
        biased.bias.normal_()
    lat.readout_hidden = biased
    batch, xy, energy, value = _random_arrivals(config, a=6)
    batch = torch.full_like(batch, 1)  # every arrival in sample 1; samples 0 and 2 get nothing
    xy[:] = torch.tensor([1.0, 1.0])  # on one cell centre: 1 hit cell, 23 padding rows
    with torch.no_grad():
        collected = lat.collect(batch, xy, energy, value, 3)
    assert collected[0].abs().max() == 0 and collected[2].abs().max() == 0
    # sample 1 gets its hit cells' hidden vectors only (the bias once per hit cell, not per padding row)
    with torch.no_grad():
        dep = lat.deposit_on_cells(batch, xy, energy, value, 3)
        hit = int(dep.num_cells)
        assert hit < dep.cell_id.numel()  # there are padding rows to leak
        expected = torch.nn.functional.gelu(biased(dep.values[:hit])).sum(dim=0)
    torch.testing.assert_close(collected[1], expected)


def test_face_readout_depends_on_where_a_flow_lands():
    """The same deposit on another cell writes another output (the position-blind readout does not)."""
    outputs = {}
    for readout in ["face", "shared"]:
        config = tiny_config(readout=readout, output_gate_init=1.0)  # gate open: the flows' part shows
        proc = build_processor(config)
        if readout == "shared":
            with torch.no_grad():
                proc.output_face.face_position_value.weight.zero_()  # position only as an additive code: off
        value = torch.randn(1, config.face_channels, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ys = [proc.output_face.read(proc.output_face.collect(
                torch.tensor([0]), torch.tensor([xy]), torch.tensor([0.8]), value, 1)) for xy in ([1.0, 1.0], [4.0, 3.0])]
        outputs[readout] = (ys[0] - ys[1]).abs().max().item()
    assert outputs["shared"] == 0.0
    assert outputs["face"] > 1e-3


def test_dense_reference_gives_the_same_output():
    import importlib.util

    from conftest import ROOT  # the dense reference is the benchmark's baseline, in scripts/
    spec = importlib.util.spec_from_file_location("dense_reference", ROOT / "scripts/dense_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    DenseReferenceProcessor = module.DenseReferenceProcessor

    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002)
    sparse = build_processor(config)
    force_spawning(sparse)
    dense = DenseReferenceProcessor(sparse.lattice, sparse.neuron, config)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(dense(x), sparse(x), atol=1e-5, rtol=1e-5)
    assert dense.last_trace.occupied == sparse.last_trace.occupied
    assert sparse.last_trace.total_spawned > 0


def test_optimized_faces_parameter_counts():
    """The faces at the optimized preset (100 x 100, 768 in and out, c = 64, r = 16): low rank, so
    the readout is 946k parameters, not 472 M for a dense 768 x 64 matrix per output cell."""
    from efgraph import create_optimized_config
    from efgraph.core.energy_lattice import EnergyLattice
    from efgraph.core.input_face import InputFace
    from efgraph.core.readout import OutputFace

    config = create_optimized_config()
    lattice = EnergyLattice(config)
    counts = {n: p.numel() for face in (InputFace(config, lattice), OutputFace(config, lattice))
              for n, p in face.named_parameters()}
    assert counts["readout_keys"] == 100 * 100 * 16 and counts["readout_out.weight"] == 16 * 64 * 768
    assert counts["face_keys"] == counts["content_keys"] == 100 * 100 * 16  # amplitude and content keys
    assert counts["input_content.weight"] + counts["input_content.bias"] == 768 * 16 * 64 + 16 * 64
    assert counts["input_query.weight"] + counts["input_query.bias"] == 768 * 16 + 16


def test_box_sum_equals_the_sum_over_every_offset():
    """The separable box sum = the explicit sum over the (2r+1)^3 offsets, zero past the faces."""
    from efgraph.core.message_passing import box_sum, neighbourhood_offsets

    grid = torch.randn(2, 3, 4, 5, 2, dtype=torch.float64)
    for radius in (1, 2):
        expected = torch.zeros_like(grid)
        for dx, dy, dz in neighbourhood_offsets(radius).tolist():
            for z in range(3):
                for y in range(4):
                    for x in range(5):
                        if 0 <= z + dz < 3 and 0 <= y + dy < 4 and 0 <= x + dx < 5:
                            expected[:, z, y, x] += grid[:, z + dz, y + dy, x + dx]
        torch.testing.assert_close(box_sum(grid, radius), expected)


def test_the_step_picks_the_layout_that_touches_fewer_rows():
    from efgraph.core.message_passing import grid_is_cheaper

    assert grid_is_cheaper(rows=1536, grid_cells=65 * 128, radius=1)  # routing: 8,320 cells < 41,472 edges
    assert not grid_is_cheaper(rows=64, grid_cells=65 * 32 * 32 * 16, radius=1)  # a large sparse lattice
    assert not grid_is_cheaper(rows=10_000, grid_cells=10, radius=0)  # radius 0: one edge per flow


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_the_two_layouts_give_the_same_output_and_gradients(aggregation, monkeypatch):
    """A whole forward and backward (several steps, spawns) is the same in either layout."""
    from efgraph.core import flow_step

    config = tiny_config(aggregation=aggregation, lattice_width=3, lattice_height=3, energy_threshold=0.001,
                         spawn_threshold=0.002)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    results = {}
    for layout in ("edges", "grid"):
        monkeypatch.setattr(flow_step, "grid_is_cheaper", lambda *args, grid=layout == "grid": grid)
        proc = build_processor(config, seed=3)
        force_spawning(proc)
        y = proc(x)
        y.square().sum().backward()
        assert proc.last_trace.num_steps > 1 and sum(proc.last_trace.spawned) > 0
        results[layout] = (y.detach(), {n: p.grad for n, p in proc.named_parameters() if p.grad is not None},
                           proc.last_trace.summary()["neighbourhood_flows"])
    (y_e, g_e, heard_e), (y_g, g_g, heard_g) = results["edges"], results["grid"]
    torch.testing.assert_close(y_g, y_e, atol=1e-5, rtol=1e-4)
    assert g_g.keys() == g_e.keys() and "flow_step.conv.lin.weight" in g_g
    for name in g_e:
        torch.testing.assert_close(g_g[name], g_e[name], atol=1e-5, rtol=1e-4, msg=name)
    assert heard_g == heard_e


def test_the_two_face_layouts_give_the_same_gradients(monkeypatch):
    """The collected face over the landing points and on the materialised face: the same gradient
    to the landing points, energies, values and keys (padding rows of sample B included)."""
    from efgraph.core import readout as readout_module

    config = tiny_config(output_gate_init=0.7)
    proc = build_processor(config)
    batch, xy, energy, value = _random_arrivals(config)
    batch[-5:] = 3  # rows that deposit nothing
    grads = {}
    for layout in ("landings", "grid"):
        monkeypatch.setattr(readout_module, "face_grid_is_cheaper", lambda *args, grid=layout == "grid": grid)
        inputs = [t.clone().requires_grad_() for t in (xy, energy, value)]
        proc.zero_grad()
        proc.output_face.collect(batch, *inputs, 3).sin().sum().backward()
        grads[layout] = [t.grad for t in inputs] + [proc.output_face.readout_keys.grad.clone()]
    for landing, grid in zip(grads["landings"], grads["grid"]):
        torch.testing.assert_close(grid, landing, atol=1e-5, rtol=1e-4)
    assert grads["grid"][2][-5:].abs().max() == 0  # the padding rows' values reach nothing
