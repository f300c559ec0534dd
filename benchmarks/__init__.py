"""loragen's benchmark suite: `python -m benchmarks` (or `loragen bench`) runs every measurement and writes
benchmarks/results/bench-<cpu|gpu>.json and .md. See benchmarks/README.md."""
