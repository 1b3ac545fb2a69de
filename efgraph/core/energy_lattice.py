"""`EnergyLattice`: the W x H x D geometry that every part of the engine reads.

Coordinates. A flow's position is continuous: ``x in [0, W-1]``, ``y in [0, H-1]`` (cell centres sit
on integers) and ``z in [0, D-1]``. Its *cell* is the nearest centre in x and y and ``floor(z)`` in z,
so that "z strictly grows" means the cell index along z grows by at least one every step, and a flow
has arrived exactly when ``z == D-1``. Lateral moves *reflect* off the faces (a triangle wave), which
keeps a gradient at the border where clamping would zero it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from efgraph.core.model_config import ModelConfig, config_attribute


class PositionEncoding(nn.Module):
    """Sinusoidal encoding of lattice positions.

    Each axis is normalised to ``u in [0, 1]`` (z by ``z_extent`` when it is > 0, so past it u > 1)
    and encoded as ``sin(pi * 2^k * u), cos(pi * 2^k * u)``
    for ``k < frequencies``.

    Shapes:
        input: ``[N, 3]`` float positions (x, y, z) in lattice units.
        output: ``[N, 6 * frequencies]``.
    """

    def __init__(self, width: int, height: int, depth: int, frequencies: int, z_extent: int = 0) -> None:
        super().__init__()
        z = z_extent if z_extent > 0 else max(depth - 1, 1)  # see ModelConfig.position_z_extent
        extent = torch.tensor([max(width - 1, 1), max(height - 1, 1), z], dtype=torch.float32)
        self.register_buffer("inv_extent", 1.0 / extent, persistent=False)
        self.register_buffer(
            "freqs", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32), persistent=False
        )

    def forward(self, pos: Tensor) -> Tensor:
        angles = (pos * self.inv_extent).unsqueeze(-1) * self.freqs  # [N, 3, F]
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)


def reflect(u: Tensor, upper: int) -> Tensor:
    """Fold ``u`` into ``[0, upper]`` by reflecting off both ends (differentiable a.e.)."""
    if upper == 0:
        return u * 0.0  # a one-cell-wide lattice: keep the graph, position is always 0
    period = 2.0 * upper
    r = torch.remainder(u, period)
    return upper - (r - upper).abs()


class EnergyLattice(nn.Module):
    """The lattice's geometry: W x H x D cells, cell ids, the forward-only move and the position code.

    It holds no parameters (the learned faces are :class:`~efgraph.core.input_face.InputFace` and
    :class:`~efgraph.core.readout.OutputFace`), only constants as non-persistent buffers, so that
    cell ids and reflection are a few fused tensor ops on the flows' device.

    Args:
        config: reads ``lattice_width``, ``lattice_height``, ``lattice_depth``,
            ``position_frequencies``.
    """

    config = config_attribute()  # the processor's one frozen config, set once
    # the config fields the geometry reads: a model refuses a lattice that differs in one of them
    READS = ("lattice_width", "lattice_height", "lattice_depth", "position_frequencies", "position_z_extent")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.width, self.height, self.depth = config.lattice_width, config.lattice_height, config.lattice_depth
        self.num_cells = config.num_cells
        self.position_encoding = PositionEncoding(self.width, self.height, self.depth, config.position_frequencies,
                                                  config.position_z_extent)
        self.register_buffer("round_offset", torch.tensor([0.5, 0.5, 0.0]), persistent=False)
        self.register_buffer("id_stride", torch.tensor([1, self.width, self.width * self.height]), persistent=False)
        self.register_buffer("face_upper", torch.tensor([self.width - 1.0, self.height - 1.0]), persistent=False)
        self.register_buffer("cell_bounds", torch.tensor([self.width, self.height, self.depth]), persistent=False)

    # ---- geometry ------------------------------------------------------------------------------
    def cell_coordinates(self, pos: Tensor) -> Tensor:
        """``[N, 3]`` continuous positions -> ``[N, 3]`` int64 cell (nearest x, y; floor z)."""
        return (pos + self.round_offset).floor().long()

    def cell_id(self, batch: Tensor, cell: Tensor) -> Tensor:
        """Unique id of (sample, cell) pairs, ``((sample * D + z) * H + y) * W + x``: ``[N]`` int64."""
        return batch * self.num_cells + (cell * self.id_stride).sum(dim=1)

    def move(self, pos: Tensor, dxy: Tensor, dz_fraction: Tensor) -> Tensor:
        """Apply one step of displacement.

        Args:
            pos: ``[F, 3]`` current positions, ``z < D-1``.
            dxy: ``[F, 2]`` lateral displacement (reflected at the faces).
            dz_fraction: ``[F]`` in (0, 1): how far beyond the mandatory one cell to jump, as a
                fraction of the distance left; ``dz = 1 + max(left - 1, 0) * fraction``.

        Returns:
            ``[F, 3]`` new positions with ``z_new >= z + 1`` or ``z_new == D - 1``.
        """
        xy = self.reflect_xy(pos[:, :2] + dxy)
        z = pos[:, 2]
        left = (self.depth - 1) - z
        dz = 1.0 + (left - 1.0).clamp(min=0.0) * dz_fraction
        z_new = torch.clamp(z + dz, max=float(self.depth - 1))
        return torch.cat([xy, z_new.unsqueeze(1)], dim=1)

    def reflect_xy(self, xy: Tensor) -> Tensor:
        """Fold ``[N, 2]`` lateral positions back into the face (both axes in one go)."""
        if self.width == 1 or self.height == 1:
            return torch.stack([reflect(xy[:, 0], self.width - 1), reflect(xy[:, 1], self.height - 1)], dim=1)
        upper = self.face_upper
        return upper - (torch.remainder(xy, 2.0 * upper) - upper).abs()

    def face_position(self, face_cell: Tensor, z: float) -> Tensor:
        """``[N]`` face cell index (``y * W + x``) -> ``[N, 3]`` float position (x, y, ``z``)."""
        return torch.stack([(face_cell % self.width).float(), (face_cell // self.width).float(),
                            torch.full_like(face_cell, z, dtype=torch.float)], dim=-1)

    def landing_corners(self, xy: Tensor) -> tuple[Tensor, Tensor]:
        """The four face cells nearest each landing point and their bilinear weights.

        Args:
            xy: ``[A, 2]`` continuous landing positions in ``[0, W-1] x [0, H-1]``.

        Returns:
            ``(cell [A, 4] int64 face index y * W + x, weight [A, 4])``; the weights sum to 1 and
            carry the gradient of the landing point.
        """
        w, h = self.width, self.height
        x0f = torch.floor(xy[:, 0]).clamp(max=w - 1)
        y0f = torch.floor(xy[:, 1]).clamp(max=h - 1)
        fx, fy = xy[:, 0] - x0f, xy[:, 1] - y0f  # in [0, 1], carry the gradient of the landing spot
        x0, y0 = x0f.long(), y0f.long()
        x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
        corner_x = torch.stack([x0, x1, x0, x1], dim=1)  # [A, 4]
        corner_y = torch.stack([y0, y0, y1, y1], dim=1)
        weight = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=1)
        return corner_y * w + corner_x, weight
