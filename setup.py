"""sat-cogvideo: a clean reimplementation of the CogVideoX SAT code path."""
from setuptools import find_packages, setup

setup(
    name="sat-cogvideo",
    version="0.1.0",
    description="CogVideoX SAT code path: inference, finetuning and conversion of SAT checkpoints",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["sat_cogvideo", "sat_cogvideo.*", "sgm", "sgm.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "SwissArmyTransformer==0.4.12",
        # SwissArmyTransformer imports these at `import sat`
        "deepspeed>=0.14",
        "triton",
        "wandb",
        "omegaconf>=2.3",
        "einops",
        "sentencepiece",
        "transformers>=4.40",
        "imageio>=2.30",
        "imageio-ffmpeg",
        "safetensors",
        "tqdm",
        "numpy",
        "pillow",
        # tools/convert_weight_sat2hf.py writes the diffusers pipeline with it; the tests compare against it
        "diffusers==0.42.1",
        # --load / MODEL_PATH given a Hugging Face id (sat_cogvideo/hub.py)
        "huggingface_hub>=0.34",
        # --weights-dtype int8 (sat_cogvideo/accel/lowbit.py): int8 weight-only tensors, CPU and CUDA
        "torchao>=0.10",
    ],
    extras_require={
        "test": ["pytest", "peft", "scikit-image"],  # scikit-image: PSNR/SSIM in benchmarks/bench_options.py
    },
)
