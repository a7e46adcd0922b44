"""Install moca_fast; kernels/ is installed as the subpackage moca_fast.kernels."""
from setuptools import setup

setup(
    name="moca_fast",
    version="0.1.0",
    description="Fast, exact MOCA self-supervised ViT pretraining (PyTorch, Triton, DeepSpeed, DALI)",
    python_requires=">=3.10",
    packages=[
        "moca_fast",
        "moca_fast.model",
        "moca_fast.data",
        "moca_fast.train",
        "moca_fast.eval",
        "moca_fast.fakegpu",
        "moca_fast.io",
        "moca_fast.viz",
        "moca_fast.figures",
        "moca_fast.probes",
        "moca_fast.kernels",
    ],
    package_dir={"moca_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",
        "torchvision",
        "triton>=3.0; platform_system == 'Linux'",
        "deepspeed>=0.15",
        "numpy",
        "pyyaml",
        "pillow",
        "tqdm",
        "mlxtend",
        "scikit-learn",  # low-shot logistic regression (moca_fast.eval lowshot), PCA (moca_fast.viz)
        "matplotlib>=3.7",  # every figure of moca_fast.viz (Agg backend: no display needed)
        "timm",  # fine-tuning builds on timm's ViT, Mixup, transforms, layer-decay groups, losses
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
        "dev": ["pytest", "timm", "tensorboard", "nvidia-dali-cuda130; platform_system == 'Linux'"],
    },
)
