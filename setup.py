"""pyramidion_ds: DeepSpeed-scaled pretraining, fine-tuning and generation for Pyramidion models.

Install torch first, the build that fits the machine (``pip install torch==2.13.0`` takes the CPU build
on our dev/CI machines; on a GPU cluster install the CUDA build your drivers want), then
``pip install -e .[dev]``. The ranges below are satisfied by an installed torch, so pip pulls no second
(CUDA) torch on a CPU machine.
"""

from setuptools import find_packages, setup

setup(
    name="pyramidion_ds",
    version="0.1.0",
    description="Pyramidion long-document summarizers (trainable top-k pooling) trained with DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the DeepSpeed JSONs stay at the top level (ds_configs/, where users edit and copy them) and install as
    # the data-only package pyramidion_ds.ds_configs, so a shipped name resolves in any install
    packages=find_packages(include=["pyramidion_ds", "pyramidion_ds.*"]) + ["pyramidion_ds.ds_configs"],
    package_dir={"pyramidion_ds.ds_configs": "ds_configs"},
    package_data={"pyramidion_ds": ["configs/*.yaml"], "pyramidion_ds.ds_configs": ["*.json"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16,<0.20",
        "sentencepiece>=0.2",
        "mpi4py>=3.1",
        "datasets>=2.19",
        "tensorboard>=2.14",
        "numpy>=1.24",
        "pyyaml>=6.0",  # config files: safe_load, no eval
        "tqdm>=4.66",  # progress bars on every long step
        "safetensors>=0.4",  # export format that never unpickles
        "tokenizers>=0.19",  # BART's byte-level BPE for imported checkpoints (pyramidion-import)
        "rouge-score>=0.1.2",  # Google's reference ROUGE implementation (stemming, Lsum)
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",  # top-k kernels on CUDA
    ],
    extras_require={
        # transformers: the import equality tests compare against it (the package never imports it)
        "dev": [
            "pytest>=8",
            "mpich>=4.2",
            "ninja>=1.11",
            "ruff>=0.16.4,<0.17",  # ruff: pyproject.toml
            "pre-commit>=3.5",  # the README's contributor hooks
            "transformers>=4.40",
        ],
        "bench": ["transformers>=4.40", "matplotlib>=3.8", "psutil>=5.9"],
    },
    entry_points={
        "console_scripts": [
            "pyramidion-preprocess=pyramidion_ds.cli.preprocess:main",
            "pyramidion-train=pyramidion_ds.cli.train:main",
            "pyramidion-generate=pyramidion_ds.cli.generate:main",
            "pyramidion-tune=pyramidion_ds.cli.tune:main",
            "pyramidion-bench=pyramidion_ds.cli.bench:main",
            "pyramidion-import=pyramidion_ds.cli.import_hf:main",
        ],
    },
)
