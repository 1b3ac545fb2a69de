"""The run's figures: flow paths as per-flow polylines coloured by their root's start cell."""

from __future__ import annotations

import torch

from conftest import build_processor, force_spawning, tiny_config
from efgraph.training.figures import flow_counts_figure, flow_paths_figure, flow_polylines, landing_figure


def _traced(config, seed=0, spawn=True):
    proc = build_processor(config, seed=seed)
    if spawn:
        force_spawning(proc)
    proc.eval()
    proc.record_paths = True
    with torch.no_grad():
        proc(torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(seed)))
    return proc.last_trace


def test_polylines_start_on_the_input_face_climb_in_z_and_children_inherit_the_start_cell():
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002)
    trace = _traced(config)
    assert trace.total_spawned > 0
    lines = flow_polylines(trace, config)
    ids = {int(f) for record in trace.paths for f in record["flow_id"]}
    assert len(lines) == len(ids)
    start = trace.paths[0]
    root_cell = {int(f): int(round(float(p[1]))) * config.lattice_width + int(round(float(p[0])))
                 for f, p in zip(start["flow_id"], start["pos"])}
    sample_of = {int(f): int(b) for record in trace.paths for f, b in zip(record["flow_id"], record["batch"])}
    for (sample, cell, pts), fid in zip(lines, sorted(ids)):
        assert pts[0, 2] == 0.0, fid  # every polyline starts on the input face
        assert (pts[1:, 2] > pts[:-1, 2]).all(), fid  # and moves on in z at every point
        assert pts[-1, 2] <= config.lattice_depth - 1
        root = fid
        while root not in root_cell:
            root = trace.parent_of[root]
        assert cell == root_cell[root] and sample == sample_of[fid] == sample_of[root]
        if root != fid:  # a child's polyline begins with its root's start
            assert torch.equal(pts[0, :2], start["pos"][(start["flow_id"] == root).nonzero()[0, 0], :2])
    children = [fid for fid in trace.parent_of if fid in ids]
    assert children, "no child was recorded"
    # the arrivals end on the output face
    landed = set(trace.paths[-1]["flow_id"].tolist())
    assert all(float(pts[-1, 2]) == config.lattice_depth - 1 for (_, _, pts), fid in zip(lines, sorted(ids))
               if fid in landed)
    # only the samples asked for
    assert {s for s, _, _ in flow_polylines(trace, config, samples=[1])} == {1}


def test_the_flow_paths_figure_has_a_row_per_model(tmp_path):
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002)
    rows = {"untrained": _traced(config, seed=1, spawn=False), "trained": _traced(config)}
    path = flow_paths_figure(rows, config, tmp_path / "flow_paths.png")
    assert path.stat().st_size > 5000


def _drawn(monkeypatch, draw):
    """The matplotlib figure that ``draw()`` saves."""
    import matplotlib.figure

    saved = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    draw()
    assert len(saved) == 1
    return saved[0]


def test_figures_read_alone_colour_bar_one_step_bars_and_channel_text(tmp_path, monkeypatch):
    from efgraph.training.channels import channels_figure

    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002)
    trace = _traced(config)
    landing = _drawn(monkeypatch, lambda: landing_figure(trace, config, tmp_path / "landing.png"))
    labels = [ax.get_ylabel() for ax in landing.axes]
    assert len(landing.axes) == 3 and any("arrivals per output-face cell" in label for label in labels)  # colour bar
    channels = _drawn(monkeypatch, lambda: channels_figure(trace, config, tmp_path / "channels.png"))
    assert "regions" in channels.get_suptitle() and "Concentration 1" in channels.get_suptitle()
    # a one-step lattice (depth 2): bars, one per quantity, not one dot per curve
    one = tiny_config(lattice_depth=2)
    one_trace = _traced(one, spawn=False)
    assert one_trace.num_steps == 1
    counts = _drawn(monkeypatch, lambda: flow_counts_figure(one_trace, tmp_path / "flow_counts.png"))
    assert [len(ax.patches) for ax in counts.axes] == [5, 4, 1] and not any(ax.lines for ax in counts.axes)
    deep = _drawn(monkeypatch, lambda: flow_counts_figure(trace, tmp_path / "flow_counts_deep.png"))
    assert all(ax.lines for ax in deep.axes)  # curves over the steps
