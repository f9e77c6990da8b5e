"""The smallest training script on torch-ps: a linear regression on data it
makes itself, the same program on every worker.

    ps-run --servers 2 --workers 2 examples/quickstart.py

or by hand: start the servers, then one copy of this script per worker:

    ps-server --port 50051 & ps-server --port 50052 &
    PS_SERVERS=127.0.0.1:50051,127.0.0.1:50052 RANK=0 WORLD_SIZE=2 python examples/quickstart.py &
    PS_SERVERS=127.0.0.1:50051,127.0.0.1:50052 RANK=1 WORLD_SIZE=2 python examples/quickstart.py

Each worker trains on its own half of every batch; in BSP the servers
average the two halves' gradients, so both workers end with the weights of
one process training on whole batches.
"""

from __future__ import annotations

import torch

from ps_worker import DistributedOptimizer, PSClient

STEPS, BATCH, FEATURES = 200, 64, 16


def main() -> None:
    torch.manual_seed(0)  # the same model and data on every worker
    true_weights = torch.randn(FEATURES, 1)
    model = torch.nn.Linear(FEATURES, 1)

    # The two changes to a local training loop: a client of the servers (its
    # place in the job from the environment), and the optimizer wrapped.
    with PSClient() as client:
        rank, world = client.worker_id, client.num_workers
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
