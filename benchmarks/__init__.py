"""Side-by-side benchmarks: each row measures our path and a baseline in the
same run, so the ratio survives a noisy machine. Run `python -m benchmarks`."""
