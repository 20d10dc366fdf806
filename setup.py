"""The agent package and its C extension (csrc/, built by cffi)."""

from setuptools import find_packages, setup

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
    entry_points={"console_scripts": ["agentctl=agent.cli.agentctl:main"]},
    zip_safe=False,
)
