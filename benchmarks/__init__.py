"""gradmem-fast benchmarks: kernel microbenchmarks, end-to-end WRITE throughput, second-order step, peak.

``python -m benchmarks.run --dry-run`` (CPU, tiny sizes) or ``bash benchmarks/gpu_suite.sh`` (CUDA).
See benchmarks/README.md.
"""
