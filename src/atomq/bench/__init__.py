"""Benchmarks: kernels (gemm.py), throughput and serving; JSON out with device and versions."""
