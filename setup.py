"""The C extension of appliance.native (everything else is in pyproject.toml).

Built against Debian's libsrtp2 (`libsrtp2-dev`, which `make` installs). `optional=True`:
where it cannot build (no headers, no compiler) pip still installs the package and the
workers run the pure-Python packet path, saying so in the log and /metrics.
"""

import shlex
import subprocess

from setuptools import Extension, setup


def pkg_config(option: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", option, "libsrtp2"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return shlex.split(out)


packetloop = Extension(
    "appliance.native._packetloop",
    sources=["appliance/native/_packetloop.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        *pkg_config("--cflags")],
    extra_link_args=[*(pkg_config("--libs") or ["-lsrtp2"]), "-lm"],
    optional=True,
)

setup(ext_modules=[packetloop])
