"""The agent package and its C extensions (csrc/): the engine and the spawn
helpers, built by cffi; the loader's speedups, a limited-API module that the
workers' own interpreters load (csrc/loader_speedups.c)."""

import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "csrc"))
from native_build import WARNINGS  # noqa: E402  (one set of warnings for both builds)

# Never built with the sanitizers, even for `make sanitize`: the workers that
# load it run without their runtimes. tests/unit/loaders/test_speedups_asan.py
# builds its own instrumented copy and checks it in a process that has them.
loader_speedups = Extension(
    "agent.loaders._agent_loader_speedups",
    sources=["csrc/loader_speedups.c"],
    py_limited_api=True,
    extra_compile_args=["-std=gnu11", "-O2", "-g", *WARNINGS],
)

setup(
    name="agent",
    version="0.1.0",
    description="A process-managing application server for Python web apps, fronted by nginx",
    packages=find_packages(include=["agent", "agent.*"]),
    package_data={"agent": ["py.typed"], "agent.control": ["dashboard.html"], "agent.loaders": ["*.py"]},
    python_requires=">=3.10",
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "psutil>=5.9", "msgpack>=1.0", "pyyaml>=6.0"],
    cffi_modules=["csrc/native_build.py:ffibuilder"],
    ext_modules=[loader_speedups],
    entry_points={"console_scripts": ["agentctl=agent.cli.agentctl:main"]},
    zip_safe=False,
)
