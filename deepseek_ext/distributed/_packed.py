"""The wire format of int8 gradient chunks: each row is a chunk's int8 values
followed by its fp32 scales, so one collective carries both."""

from typing import Optional

import torch


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class Packed:
    """int8 values and their fp32 scales for ``rows`` chunks of ``n`` elements,
    laid out ``[rows, n + 4 * n / block_size]`` bytes so that one collective
    carries both (row r: chunk r's q, then its scales)."""

    def __init__(self, rows: int, n: int, block_size: int, device, buf: Optional[torch.Tensor] = None):
        self.rows, self.n, self.nb = rows, n, n // block_size
        width = n + 4 * self.nb
        self.buf = buf.view(rows, width) if buf is not None else torch.empty(
            rows, width, dtype=torch.uint8, device=device)

    @property
    def q(self) -> torch.Tensor:  # [rows, n] int8 (row-strided view)
        return self.buf[:, : self.n].view(torch.int8)

    @property
    def scales(self) -> torch.Tensor:  # [rows, nb] float32 (row-strided view)
        return self.buf[:, self.n:].view(torch.float32)

    def fill(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        """Copy flat ``q`` / ``scales`` (possibly shorter than rows * n: the
        tail is zero padding, which dequantises to 0) into the rows."""
        copy_padded(self.q, q)
        copy_padded(self.scales, scales)


def copy_padded(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst [rows, n] (row-strided) <- flat src of at most rows * n elements, zero tail."""
    rows, n = dst.shape
    full, rem = divmod(src.numel(), n)
    if full:
        dst[:full].copy_(src[: full * n].view(full, n))
    if full < rows:
        dst[full, :rem].copy_(src[full * n:])
        dst[full, rem:].zero_()
        dst[full + 1:].zero_()
