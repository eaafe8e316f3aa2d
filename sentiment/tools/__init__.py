"""Tools around the worker, never imported by it: benchmarks, the chaos run, throwaway servers for tests
and benchmarks, and the default model's training. Left out of the wheel and the image (pyproject.toml)."""
