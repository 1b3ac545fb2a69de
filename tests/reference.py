"""Slow, obviously-correct per-flow references of the engine's step and output face.

Everything here loops over flows and cells in Python and re-derives the geometry with ``math``;
it shares only the learned weights with the engine. The fast vectorised engine must equal it.
"""

from __future__ import annotations

import math

import torch

from efgraph.core.flow_processor import FlowProcessor
from efgraph.core.flow_state import FlowState


def position_encoding(config, x: float, y: float, z: float) -> torch.Tensor:
    sizes = [config.lattice_width, config.lattice_height, config.lattice_depth]
    feats_sin, feats_cos = [], []
    for value, size in zip([x, y, z], sizes):
        u = value / max(size - 1, 1)
        s = [math.sin(math.pi * 2**k * u) for k in range(config.position_frequencies)]
        c = [math.cos(math.pi * 2**k * u) for k in range(config.position_frequencies)]
        feats_sin.append(s)
        feats_cos.append(c)
    out = []
    for s, c in zip(feats_sin, feats_cos):  # per axis: sin block then cos block
        out.extend(s + c)
    return torch.tensor(out, dtype=torch.float32)


def cell_from_id(config, cell_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :meth:`EnergyLattice.cell_id`: ``(batch [N], cell [N, 3])`` (x, y, z)."""
    w, h, d = config.lattice_width, config.lattice_height, config.lattice_depth
    x = cell_id % w
    y = (cell_id // w) % h
    z = (cell_id // (w * h)) % d
    return cell_id // (w * h * d), torch.stack([x, y, z], dim=1)


def reflect(u: float, upper: int) -> float:
    if upper == 0:
        return 0.0
    while u < 0 or u > upper:
        u = -u if u < 0 else 2 * upper - u
    return u


def reference_step(proc: FlowProcessor, state: FlowState, batch_size: int, next_id: int) -> dict:
    """One step, flow by flow. Returns plain Python / small tensors for comparison."""
    cfg = proc.config
    carrier = proc.carrier
    n = state.num_flows
    pos = state.pos.tolist()
    energy = state.energy.tolist()
    batch = state.batch.tolist()

    # 1. occupied cells, keyed (sample, z, y, x) so that sorting matches the engine's id order
    cells: dict[tuple[int, int, int, int], list[int]] = {}
    for f in range(n):
        x, y, z = pos[f]
        key = (batch[f], math.floor(z), math.floor(y + 0.5), math.floor(x + 0.5))
        cells.setdefault(key, []).append(f)
    occupied = sorted(cells)

    # 2. messages, aggregation over every flow of the sample within the radius, neuron
    r = cfg.interaction_radius
    transformation = [None] * n
    heard_by_flow = [0] * n
    for b, cz, cy, cx in occupied:
        members = cells[(b, cz, cy, cx)]
        heard = [f for (b2, z2, y2, x2), fs in cells.items() for f in fs
                 if b2 == b and max(abs(z2 - cz), abs(y2 - cy), abs(x2 - cx)) <= r]
        msgs = [proc.flow_step.conv.lin(state.h[-1, f]) + state.energy[f] * proc.flow_step.conv.energy_weight for f in heard]
        agg = torch.stack(msgs).sum(0)
        if cfg.aggregation == "mean":
            agg = agg / len(heard)
        t = proc.neuron(torch.cat([agg, position_encoding(cfg, cx, cy, cz)]).unsqueeze(0))[0]
        for f in members:
            transformation[f] = t
            heard_by_flow[f] = len(heard)

    # 3. carrier, flow by flow
    new_h, new_c, tops = [], [], []
    for f in range(n):
        inp = torch.cat([transformation[f], state.energy[f : f + 1], position_encoding(cfg, *pos[f])])
        h0 = state.h[:, f : f + 1].contiguous()
        if carrier.is_lstm:
            out, (h1, c1) = carrier.rnn(inp.view(1, 1, -1), (h0, state.c[:, f : f + 1].contiguous()))
            new_c.append(c1[:, 0])
        else:
            out, h1 = carrier.rnn(inp.view(1, 1, -1), h0)
        new_h.append(h1[:, 0])
        tops.append(out[0, 0])

    # 4-5. heads, move, next energy, lifecycle
    step = cfg.max_lateral_step
    moved, gated, score, child_off, status = [], [], [], [], []
    for f in range(n):
        d = carrier.displacement_head(tops[f])
        s = carrier.spawn_head(tops[f])
        x = reflect(pos[f][0] + math.tanh(float(d[0])) * step, cfg.lattice_width - 1)
        y = reflect(pos[f][1] + math.tanh(float(d[1])) * step, cfg.lattice_height - 1)
        left = cfg.lattice_depth - 1 - pos[f][2]
        z = min(pos[f][2] + 1 + max(left - 1, 0) * torch.sigmoid(d[2]).item(), cfg.lattice_depth - 1)
        e = torch.sigmoid(carrier.energy_head(tops[f])).item()  # the carrier sets the next energy
        moved.append((x, y, z))
        gated.append(e)
        score.append(float(s[0]))
        child_off.append((math.tanh(float(s[1])) * step, math.tanh(float(s[2])) * step))
        if e < cfg.energy_threshold:
            status.append("died")
        elif z >= cfg.lattice_depth - 1:
            status.append("arrived")
        else:
            status.append("alive")

    # spawning: per sample, best score first, within both budgets
    spawners = set()
    for b in range(batch_size):
        alive_b = [f for f in range(n) if batch[f] == b and status[f] == "alive"]
        room = min(cfg.max_spawn_per_step, max(0, cfg.max_active_flows - len(alive_b)))
        cands = [f for f in alive_b if gated[f] > cfg.spawn_threshold and score[f] > 0]
        cands.sort(key=lambda f: (-score[f], f))
        spawners.update(cands[:room])

    next_rows, children = [], []
    for f in range(n):
        if status[f] != "alive":
            continue
        frac = 0.5 / (1 + math.exp(-score[f])) if f in spawners else 0.0
        next_rows.append(dict(h=new_h[f], c=new_c[f] if new_c else None, pos=moved[f], energy=gated[f] * (1 - frac),
                              batch=batch[f], flow_id=int(state.flow_id[f])))
    for i, f in enumerate(sorted(spawners)):
        frac = 0.5 / (1 + math.exp(-score[f]))
        h_child = new_h[f] + carrier.child_up(torch.tanh(carrier.child_down(new_h[f])))
        children.append(dict(
            h=h_child, c=new_c[f] if new_c else None,
            pos=(reflect(moved[f][0] + child_off[f][0], cfg.lattice_width - 1),
                 reflect(moved[f][1] + child_off[f][1], cfg.lattice_height - 1), moved[f][2]),
            energy=gated[f] * frac, batch=batch[f], flow_id=next_id + i,
        ))
    arrivals = [dict(batch=batch[f], xy=moved[f][:2], energy=gated[f], value=proc.output_face.value_head(tops[f]),
                     flow_id=int(state.flow_id[f])) for f in range(n) if status[f] == "arrived"]
    return dict(
        occupied=occupied,
        next=next_rows + children,
        arrivals=arrivals,
        num_spawned=len(spawners),
        num_died=status.count("died"),
        energy_dissipated=sum(max(old - new, 0.0) for old, new in zip(energy, gated)),
        energy_created=sum(max(new - old, 0.0) for old, new in zip(energy, gated)),
        energy_died=sum(g for g, s in zip(gated, status) if s == "died"),
        neighbourhood_flows=sum(heard_by_flow),
    )


def dense_face(proc: FlowProcessor, batch, xy, energy, value, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense output face ``[B, H, W, C]`` and energy ``[B, H, W]`` built arrival by arrival
    (with ``readout: shared`` each deposit's value includes its cell's position code)."""
    cfg = proc.config
    w, h = cfg.lattice_width, cfg.lattice_height
    values = torch.zeros(batch_size, h, w, cfg.face_channels)
    energies = torch.zeros(batch_size, h, w)
    for a in range(len(batch)):
        x, y = float(xy[a][0]), float(xy[a][1])
        x0, y0 = min(math.floor(x), w - 1), min(math.floor(y), h - 1)
        fx, fy = x - x0, y - y0
        for cx, cy, wt in [(x0, y0, (1 - fx) * (1 - fy)), (min(x0 + 1, w - 1), y0, fx * (1 - fy)),
                           (x0, min(y0 + 1, h - 1), (1 - fx) * fy), (min(x0 + 1, w - 1), min(y0 + 1, h - 1), fx * fy)]:
            v = value[a]
            if cfg.readout == "shared":
                v = v + proc.output_face.face_position_value(position_encoding(cfg, cx, cy, cfg.lattice_depth - 1))
            values[batch[a], cy, cx] += float(energy[a]) * wt * v
            energies[batch[a], cy, cx] += float(energy[a]) * wt
    return values, energies


def dense_readout(proc: FlowProcessor, face: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, C]`` dense face -> ``[B, output_dim]``, cell by cell: ``readout: face`` gives
    every cell its own matrix ``R_q = sum_k L_qk B_k`` (materialised here, never in the engine);
    ``readout: shared`` runs one MLP on every cell (empty cells add GELU(0) = 0)."""
    cfg, lat = proc.config, proc.output_face
    b, h, w, c = face.shape
    total = torch.zeros(b, cfg.output_dim)
    for cy in range(h):
        for cx in range(w):
            f = face[:, cy, cx]  # [B, C]
            if cfg.readout == "face":
                keys = lat.readout_keys[cy * w + cx]  # [r]
                blocks = lat.readout_out.weight.view(cfg.output_dim, cfg.readout_rank, c)
                cell_matrix = torch.einsum("k,okc->oc", keys, blocks)  # R_q [output_dim, C]
                total += f @ cell_matrix.t()
            else:
                total += lat.readout_out(torch.nn.functional.gelu(lat.readout_hidden(f)))
    return lat.output_gate * total + lat.readout_bias
