"""Multi-process OCNOpt on torch.distributed (gloo, 2 processes on 127.0.0.1, CPU)."""

from __future__ import annotations

import pytest
import torch

from ocnopt.distributed import Communicator, assign_work
from tests.distributed_utils import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed not available")


def test_assign_work_balances_costs_deterministically():
    costs = [("a", 8.0), ("b", 1.0), ("c", 4.0), ("d", 4.0), ("e", 1.0)]
    got = assign_work(costs, 2)
    loads = [sum(c for k, c in costs if got[k] == r) for r in range(2)]
    assert got == assign_work(costs, 2) and max(loads) == 9.0
    assert assign_work(costs, 1) == {k: 0 for k, _ in costs}


def _comm_rank(rank, world):
    comm = Communicator(torch.distributed.group.WORLD)
    a = torch.full((2, 3), float(rank + 1))
    b = torch.arange(4.0) * (rank + 1)
    comm.mean_([a, b], "gradients")
    flags = (comm.all_true(True), comm.all_true(rank == 0))
    c = torch.full((3,), float(rank))
    comm.broadcast_([c], src=1, kind="bases")
    return a, b, flags, c, comm.bytes["gradients"]


def test_communicator_means_consensus_and_broadcast():
    results = run_ranks(_comm_rank, 2)
    for a, b, flags, c, nbytes in results:
        assert torch.equal(a, torch.full((2, 3), 1.5))
        assert torch.equal(b, torch.arange(4.0) * 1.5)
        assert flags == (True, False)
        assert torch.equal(c, torch.ones(3))
        assert nbytes == 10 * 4
