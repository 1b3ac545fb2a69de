"""`EnergyLattice`: the W x H x D geometry, injection at the input face, collection at the output face.

Coordinates. A flow's position is continuous: ``x in [0, W-1]``, ``y in [0, H-1]`` (cell centres sit
on integers) and ``z in [0, D-1]``. Its *cell* is the nearest centre in x and y and ``floor(z)`` in z,
so that "z strictly grows" means the cell index along z grows by at least one every step, and a flow
has arrived exactly when ``z == D-1``. Lateral moves *reflect* off the faces (a triangle wave), which
keeps a gradient at the border where clamping would zero it.

Collection. An arriving flow deposits ``energy * value`` on the four output-face cells nearest its
continuous (x, y) with bilinear weights, so the landing position receives a gradient. The cost
grows with the number of arrivals, never with W * H: with ``readout: face`` each arrival adds one
outer product ``energy * L(xy) value^T`` (its readout key interpolated at the landing point)
scattered into its sample's row, and no face cell is materialised; with ``readout: shared`` the
deposits are compacted to the hit cells by :func:`~efgraph.core.compaction.unique_padded`
(:meth:`EnergyLattice.deposit_on_cells`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from efgraph.config import EnergyConfig, config_attribute
from efgraph.core.compaction import unique_padded


class PositionEncoding(nn.Module):
    """Sinusoidal encoding of lattice positions.

    Each axis is normalised to ``u in [0, 1]`` and encoded as ``sin(pi * 2^k * u), cos(pi * 2^k * u)``
    for ``k < frequencies``.

    Shapes:
        input: ``[N, 3]`` float positions (x, y, z) in lattice units.
        output: ``[N, 6 * frequencies]``.
    """

    def __init__(self, width: int, height: int, depth: int, frequencies: int) -> None:
        super().__init__()
        extent = torch.tensor([max(width - 1, 1), max(height - 1, 1), max(depth - 1, 1)], dtype=torch.float32)
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


@dataclass
class InjectedFlows:
    """The flows that start at the input face, one row per flow (F0 = B * K).

    Attributes:
        batch: ``[F0]`` sample index of each flow.
        pos: ``[F0, 3]`` start position (integer x, y of the chosen cell, z = 0).
        energy: ``[F0]`` start energy in (0, 1), a differentiable function of the amplitude.
        content: ``[F0, face_channels]`` the part of the embedding that lies on the flow's start
            cell (``injection: face``), or ``None`` (``injection: broadcast``: every flow starts
            from the whole embedding).
    """

    batch: Tensor
    pos: Tensor
    energy: Tensor
    content: Tensor | None = None


@dataclass
class FaceDeposit:
    """What arrived on the output face, compacted to the cells that were hit (``readout: shared``).

    A forward with A arrivals has N = 4A rows (a static size, so compaction needs no host
    sync): rows ``< num_cells`` are the M hit cells, ascending; the rest are padding rows, which
    the readout masks out (their ``batch`` is B, a row that is dropped).

    Attributes:
        cell_id: ``[N]`` sample * W * H + y * W + x (padding rows: 0).
        batch: ``[N]`` sample index of each cell; B for the padding rows.
        values: ``[N, face_channels]`` sum of energy * bilinear weight * value.
        energy: ``[N]`` sum of energy * bilinear weight (sums to the arrived energy).
        num_cells: scalar int64 tensor, M.
    """

    cell_id: Tensor
    batch: Tensor
    values: Tensor
    energy: Tensor
    num_cells: Tensor


class EnergyLattice(nn.Module):
    r"""The lattice: geometry, position encoding, and the learned input and output faces.

    **Input face** (:meth:`place_initial_energy`). With ``injection: face`` the embedding is laid
    across the face as two fields of rank ``r`` (``c = face_channels``, ``r = injection_rank``):
    cell ``p`` holds

    .. math::
        a_p = K_p^\top (W_q x) / \sqrt{r}, \qquad u_p = C_p^\top \mathrm{mat}_{r \times c}(W_u x),

    an amplitude and its own ``c``-wide part of x (``K``, ``C``: learned amplitude and content
    keys per face cell; ``C`` starts as ``r`` tiles of the face, :func:`face_tiles`). The
    ``initial_flows_per_sample`` cells of highest amplitude start flows with energy
    ``sigmoid(a_p + b)``; a flow's carrier state starts from *its cell's* ``u_p`` and position
    only. With ``injection: broadcast`` (the earlier formulation) every flow starts from the whole
    ``x``, ``tanh(W_x x + W_p pe(p))``, so flows differ only by a position code.

    **Output face** (:meth:`collect_output_energy`, :meth:`read_out`: the arithmetic of one set of
    deposits; which deposits a forward collects when is :class:`~efgraph.core.readout.OutputFace`'s).
    An arriving flow deposits ``f = energy * value`` with bilinear weights on the four face cells
    nearest its landing point. With ``readout: face`` each face cell ``q`` owns its readout ``R_q = \sum_k L_{qk} B_k``
    (rank ``readout_rank``; ``L``: a learned key per cell, ``B_k``: ``[output_dim, c]``)::

        y = g * sum_q R_q f_q + b = g * B vec(sum_q L_q f_q^T) + b

    so the same deposit on another cell writes another part of y, and moving a flow moves y
    through the weights. Only the landing points cost compute: ``sum_q L_q f_q^T`` is a sum over
    arrivals of ``energy * L(xy) value^T``, with ``L(xy)`` the bilinear interpolation of the
    keys at the landing point (which is how the landing position gets its gradient).
    With ``readout: shared`` (the earlier formulation) one bias-free MLP runs on every hit cell
    and is summed per sample, position entering only as an additive code in each deposit: y is
    blind to where the flows land. ``g`` is a learned gate initialised to ``output_gate_init``.
    """

    config = config_attribute()  # the processor's one frozen config, set once

    def __init__(self, config: EnergyConfig) -> None:
        super().__init__()
        self.config = config
        self.width, self.height, self.depth = config.lattice_width, config.lattice_height, config.lattice_depth
        self.position_encoding = PositionEncoding(self.width, self.height, self.depth, config.position_frequencies)
        # geometry constants as buffers, so that cell ids and reflection are a few fused tensor ops
        self.register_buffer("round_offset", torch.tensor([0.5, 0.5, 0.0]), persistent=False)
        self.register_buffer("id_stride", torch.tensor([1, self.width, self.width * self.height]), persistent=False)
        self.register_buffer("face_upper", torch.tensor([self.width - 1.0, self.height - 1.0]), persistent=False)
        self.register_buffer("cell_bounds", torch.tensor([self.width, self.height, self.depth]), persistent=False)
        # input face: amplitude (both injections) and, for injection: face, each cell's content
        self.input_query = nn.Linear(config.input_dim, config.injection_rank)
        self.face_keys = nn.Parameter(torch.empty(config.face_cells, config.injection_rank))
        self.energy_bias = nn.Parameter(torch.empty(()))
        self.input_content = None
        if config.injection == "face":  # each cell's part of x: content_keys[p] . mat(W_u x)
            self.input_content = nn.Linear(config.input_dim, config.injection_rank * config.face_channels)
            self.content_keys = nn.Parameter(torch.empty(config.face_cells, config.injection_rank))
        # output face
        if config.readout == "face":
            self.readout_keys = nn.Parameter(torch.empty(config.face_cells, config.readout_rank))
            self.readout_out = nn.Linear(config.readout_rank * config.face_channels, config.output_dim, bias=False)
        else:
            self.face_position_value = nn.Linear(config.position_encoding_dim, config.face_channels, bias=False)
            self.readout_hidden = nn.Linear(config.face_channels, config.readout_hidden_dim, bias=False)
            self.readout_out = nn.Linear(config.readout_hidden_dim, config.output_dim, bias=False)
        self.readout_bias = nn.Parameter(torch.empty(config.output_dim))
        # learned scalar on the flows' contribution; starting at 0 scales the lattice in from zero
        self.output_gate = nn.Parameter(torch.empty(()))
        # the std (cells) of the readout-key blur of training forwards (readout_key_blur): a
        # tensor the trainer sets between steps, so a compiled graph reads it as data
        self.register_buffer("key_blur", torch.zeros(()), persistent=False)
        # the Gumbel scale of the start cells of training forwards (start_cell_noise), set likewise
        self.register_buffer("start_noise", torch.zeros(()), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.input_query.reset_parameters()
        nn.init.normal_(self.face_keys, std=1.0)
        nn.init.constant_(self.energy_bias, 1.0)  # start energies near sigmoid(1) = 0.73
        if self.input_content is not None:
            self.input_content.reset_parameters()
            with torch.no_grad():
                self.content_keys.copy_(face_tiles(self.width, self.height, self.config.injection_rank))
        if self.config.readout == "face":
            with torch.no_grad():
                self.readout_keys.copy_(smooth_face_field(self.width, self.height, self.config.readout_rank))
        else:
            self.face_position_value.reset_parameters()
            self.readout_hidden.reset_parameters()
        self.readout_out.reset_parameters()
        nn.init.zeros_(self.readout_bias)
        nn.init.constant_(self.output_gate, self.config.output_gate_init)

    # ---- geometry ------------------------------------------------------------------------------
    def cell_coordinates(self, pos: Tensor) -> Tensor:
        """``[N, 3]`` continuous positions -> ``[N, 3]`` int64 cell (nearest x, y; floor z)."""
        return (pos + self.round_offset).floor().long()

    def cell_id(self, batch: Tensor, cell: Tensor) -> Tensor:
        """Unique id of (sample, cell) pairs, ``((sample * D + z) * H + y) * W + x``: ``[N]`` int64."""
        return batch * self.config.num_cells + (cell * self.id_stride).sum(dim=1)

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

    # ---- input face ------------------------------------------------------------------------------
    def amplitudes(self, x: Tensor) -> Tensor:
        """``[B, input_dim]`` -> ``[B, W*H]`` injection amplitude per input-face cell."""
        query = self.input_query(x)
        return query @ self.face_keys.t() / math.sqrt(self.config.injection_rank)

    def face_content(self, x: Tensor, cell: Tensor) -> Tensor:
        """The part of ``x`` that lies on some input-face cells (``injection: face``).

        Args:
            x: ``[B, input_dim]``.
            cell: ``[B, K]`` face cell index (``y * W + x``) per sample.

        Returns:
            ``[B, K, face_channels]``: ``C_p^T mat(W_u x)`` for each chosen cell; only the chosen
            cells are computed, never the whole face.
        """
        r, c = self.config.injection_rank, self.config.face_channels
        coefficients = self.input_content(x).view(x.size(0), r, c)  # [B, r, c]
        keys = self.content_keys.index_select(0, cell.reshape(-1)).view(*cell.shape, r)  # [B, K, r]
        return torch.bmm(keys, coefficients)

    def place_initial_energy(self, x: Tensor) -> InjectedFlows:
        """Start ``K = initial_flows_per_sample`` flows per sample on its top-K amplitude cells,
        each carrying its cell's part of ``x`` (``injection: face``). Training forwards with
        ``start_cell_noise`` rank the cells by amplitude plus Gumbel noise of scale
        :attr:`start_noise` (a sample of K cells without replacement, ``p ~ exp(a_p / noise)``),
        so cells outside the top K get a gradient when they are drawn; the cost is one
        ``[B, W*H]`` draw per forward, the size of the amplitudes already computed."""
        k = self.config.initial_flows_per_sample
        amp = self.amplitudes(x)
        if self.training and self.config.start_cell_noise > 0:  # Gumbel top-k: explore the start cells
            gumbel = -torch.empty_like(amp).exponential_().log()
            top_cell = (amp.detach() + self.start_noise * gumbel).topk(k, dim=1).indices  # [B, K]
            top_amp = amp.gather(1, top_cell)  # each flow's energy is its own cell's, noise-free
        else:
            top_amp, top_cell = amp.topk(k, dim=1)  # [B, K]
        batch = torch.arange(x.size(0), device=x.device).repeat_interleave(k)
        cell = top_cell.reshape(-1)
        pos = torch.stack(
            [(cell % self.width).float(), (cell // self.width).float(), torch.zeros_like(cell, dtype=torch.float)],
            dim=1,
        )
        # energies are bookkept in fp32 even under autocast, so energy accounting stays exact
        energy = torch.sigmoid(top_amp.reshape(-1).float() + self.energy_bias)
        content = None
        if self.input_content is not None:
            content = self.face_content(x, top_cell).reshape(batch.numel(), -1)
        return InjectedFlows(batch=batch, pos=pos, energy=energy, content=content)

    # ---- output face -----------------------------------------------------------------------------
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

    def collect_output_energy(
        self, batch: Tensor, xy: Tensor, energy: Tensor, values: Tensor, batch_size: int
    ) -> Tensor:
        """Deposit arriving flows on the output face and gather each sample's face for the readout.

        Args:
            batch: ``[A]`` sample of each arriving flow; ``B`` marks a row that deposits nothing.
            xy: ``[A, 2]`` continuous landing position.
            energy: ``[A]`` energy on arrival.
            values: ``[A, face_channels]`` the flow's value vector (from the carrier).
            batch_size: B.

        Returns:
            ``[B, K]`` what :meth:`read_out` turns into y. ``readout: face``: ``vec(sum_q L_q f_q^T)``
            (``K = readout_rank * face_channels``), the face's deposits in its rank-r cell basis;
            ``readout: shared``: ``sum_q GELU(W_1 f_q)`` over the hit cells (``K = readout_hidden_dim``).
            Linear in the deposits for ``readout: face``, so a zero-energy deposit adds exactly 0.
        """
        if self.config.readout == "shared":
            deposit = self.deposit_on_cells(batch, xy, energy, values, batch_size)
            per_cell = nn.functional.gelu(self.readout_hidden(deposit.values))
            # padding rows go to row B, which is dropped: nothing of them reaches any sample
            return scatter(per_cell, deposit.batch, dim=0, dim_size=batch_size + 1, reduce="sum")[:batch_size]
        cell, weight = self.landing_corners(xy)
        r, c = self.config.readout_rank, self.config.face_channels
        table = self.readout_keys
        if self.training and self.config.readout_key_blur > 0:  # global credit for landings (config)
            table = blur_face_field(table, self.width, self.height, self.key_blur)
        keys = (weight.unsqueeze(-1) * table[cell]).sum(dim=1)  # [A, r]: L at the landing point
        outer = keys.unsqueeze(2) * (energy.unsqueeze(1) * values).unsqueeze(1)  # [A, r, c]
        # rows of sample B (the engine's rows that deposit nothing) go to row B, which is dropped
        return scatter(outer.reshape(-1, r * c), batch, dim=0, dim_size=batch_size + 1, reduce="sum")[:batch_size]

    def deposit_on_cells(
        self, batch: Tensor, xy: Tensor, energy: Tensor, values: Tensor, batch_size: int
    ) -> FaceDeposit:
        """The bilinear deposits compacted to the hit cells (``readout: shared``), each deposit's
        value plus the position code of its cell; see :class:`FaceDeposit`."""
        w, h = self.width, self.height
        face_cell, weight = self.landing_corners(xy)
        corner_id = batch.unsqueeze(1) * (w * h) + face_cell  # [A, 4]
        corner_pos = torch.stack(
            [(face_cell % w).float(), (face_cell // w).float(),
             torch.full_like(face_cell, self.depth - 1, dtype=torch.float)], dim=-1
        ).reshape(-1, 3)
        corner_value = values.unsqueeze(1) + self.face_position_value(self.position_encoding(corner_pos)).view(
            -1, 4, values.size(1)
        )
        deposit_energy = energy.unsqueeze(1) * weight  # [A, 4]
        deposit = deposit_energy.unsqueeze(-1) * corner_value  # [A, 4, C]

        cell_id, inverse, num_cells = unique_padded(corner_id.reshape(-1), fill=0)
        m = cell_id.numel()
        real = torch.arange(m, device=cell_id.device) < num_cells
        return FaceDeposit(
            cell_id=cell_id,
            batch=torch.where(real, cell_id // (w * h), batch_size),
            values=scatter(deposit.reshape(-1, values.size(1)), inverse, dim=0, dim_size=m, reduce="sum"),
            energy=scatter(deposit_energy.reshape(-1), inverse, dim=0, dim_size=m, reduce="sum"),
            num_cells=num_cells,
        )

    def read_out(self, collected: Tensor, phantom: Tensor | None = None) -> Tensor:
        """``[B, K]`` collected face (:meth:`collect_output_energy`) -> ``[B, output_dim]``.

        ``y = g * W_out(collected) + b``. ``phantom`` is the collected face of the dying flows'
        zero-energy deposits (:mod:`efgraph.core.survival`): exactly zero in the forward, it enters
        with a gate of ``+-max(|g|, 1)`` (detached) instead of ``g``, so the survival gradient
        still reaches the energy head when ``g`` is 0 (the default start), which is what lets a
        dead lattice come back.
        """
        gate = self.output_gate
        summed = gate * collected
        if phantom is not None:
            g = gate.detach()
            phantom_gate = torch.where(g < 0, -1.0, 1.0) * g.abs().clamp(min=1.0)
            summed = summed + phantom_gate * phantom
        # sum over cells before the (linear, bias-free) last layer: it runs on B rows, not 4A
        return self.readout_out(summed) + self.readout_bias


def blur_face_field(field: Tensor, width: int, height: int, sigma: Tensor) -> Tensor:
    """``[W*H, r]`` face field (row ``y * W + x``) blurred by a Gaussian of std ``sigma`` cells.

    Separable and normalised per cell (the face's border does not darken it); ``sigma`` near 0
    (below 1e-3) is the field itself. Cost ``O((W + H) W H r)``, independent of the flows.
    """
    s = sigma.clamp(min=1e-3)

    def kernel(n: int) -> Tensor:
        d = torch.arange(n, device=field.device, dtype=field.dtype)
        k = torch.exp(-((d.view(-1, 1) - d.view(1, -1)) ** 2) / (2 * s * s))
        return k / k.sum(dim=1, keepdim=True)

    grid = field.view(height, width, -1)
    return torch.einsum("yY,xX,YXr->yxr", kernel(height), kernel(width), grid).reshape(field.shape)


def face_tiles(width: int, height: int, channels: int) -> Tensor:
    """``[W*H, channels]``: the face cut into ``channels`` rectangular tiles (a ``gx x gy`` grid
    with ``gx * gy = channels``, as square as the factors allow), each cell one-hot on its tile.

    The input face's content keys start so: tile k holds row k of ``mat(W_u x)``, a part of x
    of its own, learned independently of the other tiles' parts -- the embedding laid across
    the face. (Random keys would start every cell on a random mixture of all the parts; the two
    starts were not compared over whole runs.)
    """
    gx = max(d for d in range(1, int(math.isqrt(channels)) + 1) if channels % d == 0)
    gy = channels // gx
    if width < height:
        gx, gy = gy, gx  # more tiles along the longer side
    xs = torch.arange(width) * gx // width
    ys = torch.arange(height) * gy // height
    tile = (ys.view(-1, 1) * gx + xs.view(1, -1)).reshape(-1)  # [W*H], row y * W + x
    return nn.functional.one_hot(tile, channels).float()


def smooth_face_field(width: int, height: int, channels: int, components: int = 4) -> Tensor:
    """``[W*H, channels]`` random smooth fields over the face (row ``y * W + x``), unit std each.

    Each channel is a sum of ``components`` random plane waves of at most 1.5 cycles across the
    face. The readout keys start smooth so that the gradient with respect to a landing point
    (the difference of the keys of neighbouring cells) points the same way over several cells
    instead of changing at every cell; training is free to make them rough.
    """
    if width * height == 1:
        return torch.randn(1, channels)
    u = torch.arange(width, dtype=torch.float32) / max(width - 1, 1)
    v = torch.arange(height, dtype=torch.float32) / max(height - 1, 1)
    uv = torch.stack(torch.meshgrid(v, u, indexing="ij")[::-1], dim=-1).reshape(-1, 2)  # [W*H, (u, v)]
    freq = (torch.rand(channels, components, 2) * 2 - 1) * 1.5
    phase = torch.rand(channels, components) * 2 * math.pi
    waves = torch.cos(2 * math.pi * torch.einsum("pd,kjd->pkj", uv, freq) + phase).sum(dim=-1)  # [W*H, channels]
    return (waves - waves.mean(dim=0)) / waves.std(dim=0).clamp(min=1e-6)
