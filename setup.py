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
            extra_compile_args=["-O3", "-fno-wrapv", "-std=c11", "-Wall"],
            optional=True,
        )
    ]
)
