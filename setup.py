"""normkd-plugin: NormKD and NormDKD for mdistiller, registered through entry points."""

from setuptools import setup

MDISTILLER = "mdistiller @ git+https://github.com/megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259"

setup(
    name="normkd-plugin",
    version="0.1.0",
    description="NormKD and NormDKD (arXiv:2308.00520) distillers, configs and tools for mdistiller",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.9",
    packages=["normkd_plugin", "normkd_plugin.engine", "normkd_plugin.leaderboard", "normkd_plugin.configs"],
    package_dir={"normkd_plugin.configs": "configs"},
    package_data={
        "normkd_plugin.configs": ["cifar100/*/*.yaml", "imagenet/*/*.yaml"],
        "normkd_plugin.leaderboard": ["*.csv", "field/*.csv"],
        "normkd_plugin.engine": ["*.csv"],
    },
    # scipy is mdistiller's: importing mdistiller.distillers (which every distiller here subclasses) imports
    # scipy.stats (OFD.py), and mdistiller's setup.py and requirements.txt do not declare it
    install_requires=["torch", "torchvision", "yacs", "tensorboardX", "tqdm", "scipy", "numpy", "pyyaml"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "matplotlib", "ruff"],
        "plot": ["matplotlib"],
        "mdistiller": [MDISTILLER],
    },
    entry_points={
        "mdistiller.distillers": [
            "NORMKD = normkd_plugin.distillers:NormKD",
            "NORMDKD = normkd_plugin.distillers:NormDKD",
            "NormKD = normkd_plugin.distillers:NormKDRelease",
            "NormKD_W_DKD = normkd_plugin.distillers:NormDKDRelease",
            "KD_LS = normkd_plugin.distillers:KDLS",
            "DKD_LS = normkd_plugin.distillers:DKDLS",
        ],
        "mdistiller.trainers": [
            "fast = normkd_plugin.engine.trainer:FastTrainer",
            "ddp = normkd_plugin.engine.trainer:LoaderFedTrainer",
        ],
        "console_scripts": [
            "normkd-train = normkd_plugin.train:main",
            "normkd-configs = normkd_plugin.configs_cli:main",
            "normkd-sweep = normkd_plugin.sweep:main",
            "normkd-leaderboard = normkd_plugin.leaderboard.cli:main",
            "normkd-teachers = normkd_plugin.teachers:main",
            "normkd-temperatures = normkd_plugin.temperatures:main",
        ],
    },
)
