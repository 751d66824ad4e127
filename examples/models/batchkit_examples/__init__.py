"""Models and data on real data that ships offline, for batchkit's demo, examples and benchmarks."""
