"""The smallest training script on torch-ps: a linear regression on data it
makes itself, the same program on every worker.

Start the servers, then one copy of this script per worker:

    ps-server --port 50051 & ps-server --port 50052 &
    PS_SERVERS=127.0.0.1:50051,127.0.0.1:50052 RANK=0 WORLD_SIZE=2 python examples/quickstart.py &
    PS_SERVERS=127.0.0.1:50051,127.0.0.1:50052 RANK=1 WORLD_SIZE=2 python examples/quickstart.py

Each worker trains on its own half of every batch; in BSP the servers
average the two halves' gradients, so both workers end with the weights of
one process training on whole batches.
"""

from __future__ import annotations

import os

import torch

from ps_worker import DistributedOptimizer, PSClient

STEPS, BATCH, FEATURES = 200, 64, 16


def main() -> None:
    servers = os.environ.get("PS_SERVERS", "127.0.0.1:50051").split(",")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    torch.manual_seed(0)  # the same model and data on every worker
    true_weights = torch.randn(FEATURES, 1)
    model = torch.nn.Linear(FEATURES, 1)

    with PSClient(servers, worker_id=rank, num_workers=world) as client:
        # The one change to a local training loop: wrap the optimizer.
        opt = DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), client, named_parameters=model.named_parameters()
        )
        for step in range(STEPS):
            x = torch.randn(BATCH, FEATURES)
            y = x @ true_weights
            mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # this worker's share of the batch
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[mine]), y[mine])
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == STEPS - 1:
                print(f"worker {rank} step {step} loss {loss.item():.6f}", flush=True)
        opt.pull_final()
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    print(f"worker {rank} done, weights checksum {checksum:.12f}", flush=True)


if __name__ == "__main__":
    main()
