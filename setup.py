"""
Build hook: everything else is in setup.cfg.

On Linux the kernel splice's inner loop is also built as a small C
extension (``shardtcp.proxy._kpump``).  It is optional: without a compiler
or Python's headers the install goes on and the pure-Python loop is used.
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(
        Extension(
            "shardtcp.proxy._kpump",
            ["shardtcp/proxy/_kpump.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
        )
    )

setup(ext_modules=extensions)
