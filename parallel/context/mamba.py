"""Mamba2 under context parallelism: each of a rank's two pieces runs the model's own conv and
SSD, with what comes from the pieces before it.

Conv: an output reads the d_conv - 1 inputs before it. The pieces' last d_conv - 1 inputs are
all-gathered (a few tokens per piece); each piece reads those of the piece before it (zeros
before the first piece: the conv's own padding), and seq_idx keeps another document's out.

SSD, state passing (mamba_ssm's ssd_combined_cp; docs/PARALLEL.md says why not the head
all-to-all): the scan is linear in its initial state. Each piece scans from a zero state,
giving y0 and its final state S_j, and its decay a_j = exp(sum of dt * A over the piece) (zero
where a document starts inside the piece: no state passes it). The (S_j, a_j) of every piece
are all-gathered (nheads x headdim x d_state numbers each) and every rank runs the short scan
h_0 = 0, h_j = a_{j-1} h_{j-1} + S_{j-1} for the state entering each piece. A piece's output is
then y0_t + C_t . exp(sum of dt * A from the piece's start to t) h_j, for the tokens that still
continue the document h_j belongs to (up to the first document start inside the piece). The
gradient reaches the other ranks' S_j and a_j through the gather's backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.kernels import ops
from strata.kernels.ssd.reference import acc, expand_groups, prepare_dt
from strata.parallel.context.pieces import PIECES_PER_RANK, SEQ_DIM, CPContext


def no_cache(cache) -> None:
    if cache is not None:
        raise ValueError("decoding with caches runs without context parallelism; generate with the model "
                         "itself (parallel.cp = 1)")


def documents_of(seq_idx: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The documents of tokens [start, stop) of the whole sequence, counted from the first of them
    (as the kernels take seq_idx); tokens before the sequence (start < 0) join the first one's."""
    part = seq_idx[:, max(start, 0):stop]
    if start < 0:
        part = torch.cat([part[:, :1].expand(-1, -start), part], dim=1)
    return part - part[:, :1]


@dataclass
class PieceScan:
    """One piece scanned from a zero state: what is gathered of it, and what its correction needs."""

    y: torch.Tensor
    """(b, l, h, p): the output from a zero entering state."""
    C: torch.Tensor
    final: torch.Tensor
    """(b, h, p, n): the state after the piece (its last document's)."""
    decay: torch.Tensor
    """(b, h): how the state entering the piece decays across it; zero where a document starts inside."""
    to_token: torch.Tensor
    """(b, l, h): the decay from the piece's start to each token; zero from its first document start."""


class ContextParallelMamba:
    """What Mamba2 adds under CP (a mixin before the mixer's class; blocks.py). seq_idx is the
    whole sequence's (b, L); the tensors are this rank's two pieces."""

    cp: CPContext

    def conv(self, xbc_in: torch.Tensor, cache=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        no_cache(cache)
        halo = self.cfg.d_conv - 1
        pieces = xbc_in.chunk(PIECES_PER_RANK, dim=SEQ_DIM)
        length = pieces[0].shape[SEQ_DIM]
        before = self.cp.gather_pieces(torch.stack([p[:, length - halo:] for p in pieces]))
        outputs = []
        for j, piece in zip(self.cp.local_pieces(), pieces):
            previous = before[j - 1] if j > 0 else torch.zeros_like(before[0])
            documents = None if seq_idx is None else documents_of(seq_idx, j * length - halo, (j + 1) * length)
            seen = torch.cat([previous, piece], dim=SEQ_DIM)
            outputs.append(ops.causal_conv1d(seen, self.conv_weight, self.conv1d.bias, activation="silu",
                                             seq_idx=documents)[:, halo:])
        return torch.cat(outputs, dim=SEQ_DIM)

    def scan(self, x, dt, B, C, cache=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        no_cache(cache)
        length = x.shape[SEQ_DIM] // PIECES_PER_RANK
        local = [self.piece_scan(j, length, *parts, seq_idx)
                 for j, *parts in zip(self.cp.local_pieces(), *(t.chunk(PIECES_PER_RANK, dim=SEQ_DIM)
                                                                 for t in (x, dt, B, C)))]
        finals = self.cp.gather_pieces(torch.stack([piece.final for piece in local]))
        decays = self.cp.gather_pieces(torch.stack([piece.decay for piece in local]))
        entering = states_entering(finals, decays)
        return torch.cat([self.corrected(piece, entering[j]) for j, piece in zip(self.cp.local_pieces(), local)],
                         dim=SEQ_DIM)

    def piece_scan(self, j: int, length: int, x, dt, B, C, seq_idx) -> PieceScan:
        """Piece j (tokens [j L, (j + 1) L) of the whole sequence) scanned from a zero state."""
        documents = None if seq_idx is None else documents_of(seq_idx, j * length, (j + 1) * length)
        y, final = self.ssd(x, dt, B, C, return_final_states=True, seq_idx=documents)
        log_decay = torch.cumsum(prepare_dt(dt, self.dt_bias, True, self.dt_limit) * self.decay_rate(), dim=1)
        continues = continues_document(seq_idx, j, length, x)
        return PieceScan(y, C, final, decay=torch.exp(log_decay[:, -1]) * continues[:, -1:],
                         to_token=torch.exp(log_decay) * continues[..., None])

    def corrected(self, piece: PieceScan, state: torch.Tensor) -> torch.Tensor:
        """y0_t + C_t . (decay from the piece's start to t) . state, for each token of the piece."""
        C = expand_groups(acc(piece.C), piece.y.shape[2])
        return (acc(piece.y) + torch.einsum("blhn,bhpn,blh->blhp", C, state, piece.to_token)).to(piece.y.dtype)


def continues_document(seq_idx: torch.Tensor | None, j: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """(b, L): 1 for the tokens of piece j still in the document of the token before the piece (the
    state entering the piece is that document's), 0 from the first document start on."""
    b = like.shape[0]
    if seq_idx is None or j == 0:
        return torch.ones(b, length, dtype=acc(like).dtype, device=like.device)
    own = seq_idx[:, j * length:(j + 1) * length]
    return (own == seq_idx[:, j * length - 1:j * length]).to(acc(like).dtype)


def states_entering(finals: torch.Tensor, decays: torch.Tensor) -> list[torch.Tensor]:
    """The state entering each piece from the pieces before it: h_0 = 0, h_j = a_{j-1} h_{j-1} + S_{j-1}.
    finals (2 CP, b, h, p, n), decays (2 CP, b, h), in global order."""
    states = [torch.zeros_like(finals[0])]
    for final, decay in zip(finals[:-1], decays[:-1]):
        states.append(states[-1] * decay[..., None, None] + final)
    return states
