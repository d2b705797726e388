from setuptools import find_packages, setup

setup(
    name="ldm",
    version="0.1.0",
    description="Latent diffusion models (the Stable Diffusion family) on current Lightning",
    packages=find_packages(include=["ldm", "ldm.*"]),
    py_modules=["main"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19,<=0.29.1",
        "pytorch-lightning>=2.2,<3",
        "transformers>=4.40,<6",
        "open_clip_torch>=2.24,<4",
        "omegaconf>=2.3,<3",
        "einops>=0.7",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
        "scikit-image>=0.22",
        "webdataset>=0.2.86",
        "scipy>=1.10",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            # property-based fault injection (tests/reliability)
            "hypothesis>=6.100",
            "diffusers>=0.30",
            "accelerate>=0.30",
            "ruff>=0.5",
            "lpips>=0.1.4",
            "peft>=0.12",
            # the optimizer extra's packages: all install and run on a CPU-only machine
            "lion-pytorch>=0.2",
            "prodigyopt>=1.1",
            "bitsandbytes>=0.50",
            # the web UI and its browser test (Chromium itself: apt, see .ci/run)
            "gradio>=6,<7",
            "selenium>=4.20",
            # Ray Tune sweeps (ASHA, Optuna, a simulated two-node cluster)
            "ray[tune]>=2.9",
            "optuna>=3",
            # mutation testing of the core (scripts/mutation.py, docs/mutation.md)
            "mutmut>=3.8",
        ],
        "adapters": ["peft>=0.12"],
        # optimizer_config types beyond torch's (docs/optimizers.md): lion, prodigy, adamw8bit /
        # lion8bit (bitsandbytes >= 0.50 also steps on the CPU)
        "optim": ["lion-pytorch>=0.2", "prodigyopt>=1.1", "bitsandbytes>=0.50"],
        "xformers": ["xformers"],
        # python -m ldm.ui / ldm-ui (docs/ui.md); gradio needs no torch of its own
        "ui": ["gradio>=6,<7"],
        # --sweep-backend ray (ldm/sweep_ray.py): Ray Tune trials, ASHA, Optuna search
        "sweep": ["ray[tune]>=2.9", "optuna>=3"],
    },
    entry_points={
        "console_scripts": [
            "ldm-txt2img=ldm.commands.sample:txt2img_main",
            "ldm-img2img=ldm.commands.sample:img2img_main",
            "ldm-inpaint=ldm.commands.sample:inpaint_main",
            "ldm-convert=ldm.commands.convert:main",
            "ldm-lora=ldm.commands.lora:main",
            "ldm-ui=ldm.ui.cli:main",
        ]
    },
)
