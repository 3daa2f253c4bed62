"""Build step of the one compiled piece, service._deform (see service/_native/deform.c).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler
the install still succeeds and the service runs ONNX Runtime's DeformConv instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "service._deform",
            sources=["service/_native/deform.c"],
            # gnu11, not c11: strict ISO mode turns off fused multiply-add contraction (about
            # 20 % slower here); -fno-wrapv undoes Python's -fwrapv, which blocks vectorizing
            # the kernel's index arithmetic (its sizes are bounded so that nothing overflows).
            extra_compile_args=["-O3", "-fno-wrapv", "-std=gnu11", "-Wall"],
            optional=True,
        )
    ]
)
