"""The state a composition keeps across calls: running z-score statistics per part, and the ticketed call
order that makes concurrent calls fold and all-reduce those statistics in one order on every rank (the
concurrency rule, docs/composition.md). Used by ``rewardkit.compose``; public names are re-exported there.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from concurrent.futures import Executor, Future
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["RunningStats", "Ticket", "Turns", "submit_in_call_order"]


class RunningStats(nn.Module):
    """Count, sum and sum of squares of a stream of scores (float64 buffers); non-finite values ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros((), dtype=torch.float64))

    @staticmethod
    def moments(values: torch.Tensor) -> torch.Tensor:
        """``(n, sum, sum of squares)`` of the finite entries of ``values`` (float64 ``(3,)``, this process only)."""
        finite = values.detach().double()[torch.isfinite(values.detach())]
        return torch.stack([finite.new_tensor(float(finite.numel())), finite.sum(), (finite**2).sum()])

    def add(self, moments: torch.Tensor) -> None:
        """Add ``moments`` (``(3,)`` as from :meth:`moments`, possibly all-reduced) to the running sums."""
        moments = moments.to(self.count.device, torch.float64)
        self.count += moments[0]
        self.total += moments[1]
        self.total_sq += moments[2]

    def update(self, values: torch.Tensor, sync: bool = True) -> None:
        """Add the finite entries of ``values`` (all-reduced across processes when distributed; call it
        from one thread at a time, in the same order on every rank)."""
        delta = self.moments(values).to(self.count.device)
        if sync and _distributed():
            torch.distributed.all_reduce(delta)
        self.add(delta)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation of everything seen (0 before two values)."""
        variance = self.total_sq / self.count.clamp_min(1) - self.mean**2
        return variance.clamp_min(0).sqrt()


class Ticket:
    """A place in a composition's call order (``reward.reserve()``); pass it as ``reward(..., ticket=t)``.

    Use each ticket exactly once, or ``release()`` it (e.g. when its job is cancelled): a reserved ticket
    that is never used nor released blocks every later call of the composition.
    """

    __slots__ = ("index", "_turns", "_used")

    def __init__(self, index: int, turns: Turns | None) -> None:
        self.index, self._turns, self._used = index, turns, False

    def release(self) -> None:
        """Give the turn up without scoring (no-op once the ticket was used; no collective is issued)."""
        if self._turns is not None:
            self._turns.abandon(self)

    def __repr__(self) -> str:
        return f"Ticket({self.index}, used={self._used})"


class Turns:
    """Hands out tickets in call order and runs critical sections in ticket order."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())  # claim() inside abandon()
        self._issued = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    def take(self) -> Ticket:
        with self._cond:
            self._issued += 1
            return Ticket(self._issued - 1, self)

    def claim(self, ticket: Ticket) -> bool:
        """Mark ``ticket`` used; False if it already was (or was released)."""
        if ticket._turns is not self:
            raise ValueError(f"compose: {ticket!r} was reserved by another composition; pass that one's reserve()")
        with self._cond:
            fresh, ticket._used = not ticket._used, True
            return fresh

    @contextmanager
    def turn(self, ticket: Ticket) -> Iterator[None]:
        """Wait until every earlier ticket has had its turn, run the block, pass the turn on (also on error)."""
        with self._cond:
            self._cond.wait_for(lambda: self._serving == ticket.index)
        try:
            yield
        finally:
            with self._cond:
                self._advance()

    def abandon(self, ticket: Ticket) -> None:
        with self._cond:
            if self.claim(ticket):
                self._abandoned.add(ticket.index)
                if self._serving == ticket.index:
                    self._advance(step=False)

    def _advance(self, step: bool = True) -> None:
        self._serving += int(step)
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()


def submit_in_call_order(executor: Executor, reward: Any, fn: Callable[..., Any], *args: Any) -> Future:
    """``executor.submit(fn, *args, ticket)``, reserving ``reward``'s next place in its call order first.

    For a reward with ``reserve()`` (a composition) the place is taken here, in the *submitting* thread, so
    results follow the submission order whatever order the workers run in; ``ticket`` is ``None`` for other
    rewards. A job that fails to queue, or is cancelled before it runs, gives its place up (later calls would
    wait for it forever). Callers that submit from several threads hold one lock around this call.
    """
    reserve = getattr(reward, "reserve", None)
    ticket = reserve() if callable(reserve) else None
    try:
        future = executor.submit(fn, *args, ticket)
    except BaseException:
        if ticket is not None:
            ticket.release()
        raise
    if ticket is not None:
        future.add_done_callback(lambda done: ticket.release() if done.cancelled() else None)
    return future
