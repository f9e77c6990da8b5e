"""`python -m benchmarks [--quick] [--out PATH]`: run every comparison, print
a table, optionally write the rows as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import training_step, update_rate, wire


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under 2 minutes)")
    parser.add_argument("--out", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        *wire.run(args.quick),
        *update_rate.run(args.quick),
        *training_step.run(args.quick),
        *training_step.run_network(args.quick),
        *training_step.run_scaling(args.quick),
        *training_step.run_memory(args.quick),
    ]
    table = Table(title=f"benchmarks on {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    for column in ("comparison", "ours", "baseline", "unit", "ratio (higher is better)", "target"):
        table.add_column(column)
    for row in rows:
        mark = "[green]" if row.ratio >= row.target else "[red]"
        table.add_row(row.name, str(row.ours), str(row.baseline), row.unit, f"{mark}{row.ratio}", str(row.target))
    Console().print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
