"""Build step of the compiled pieces, service.kernels._deform and service.kernels._conv (see service/kernels/_native/).

Everything else is declared in pyproject.toml. Both extensions are optional: without a C compiler
the install still succeeds and the service runs ONNX Runtime's DeformConv and Conv instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "service.kernels._deform",
            sources=["service/kernels/_native/deform.c"],
            depends=["service/kernels/_native/native.h"],
            # gnu11, not c11: strict ISO mode turns off fused multiply-add contraction (about
            # 20 % slower here); -fno-wrapv undoes Python's -fwrapv, which blocks vectorizing
            # the kernel's index arithmetic (its sizes are bounded so that nothing overflows).
            extra_compile_args=["-O3", "-fno-wrapv", "-std=gnu11", "-Wall"],
            optional=True,
        ),
        Extension(
            "service.kernels._conv",
            sources=["service/kernels/_native/conv.c"],
            depends=["service/kernels/_native/native.h"],
            # No -m flags: the AMX functions carry target attributes, so the module imports
            # (and says AMX is unusable) on any CPU; -fno-wrapv and gnu11 as above.
            extra_compile_args=["-O3", "-fno-wrapv", "-std=gnu11", "-Wall"],
            optional=True,
        ),
    ]
)
