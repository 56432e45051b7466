"""On-demand benchmarks: each `bench_*.py` module has a `main()` that prints its figures.
`python -m benchmarks` runs them all; `python -m benchmarks twin env` runs the named ones."""
