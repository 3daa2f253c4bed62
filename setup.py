"""Build step of the compiled pieces, service.kernels._deform, service.kernels._conv and
service.kernels._fit (see service/kernels/_native/).

Everything else is declared in pyproject.toml. The extensions are optional: without a C compiler
the install still succeeds and the service runs ONNX Runtime's DeformConv and Conv and the fit's
numpy solver instead.
"""

from setuptools import Extension, setup

# gnu11, not c11: strict ISO mode turns off fused multiply-add contraction (about 20 % slower in
# the deformable convolution); -fno-wrapv undoes Python's -fwrapv, which blocks vectorizing the
# kernels' index arithmetic (their sizes are bounded so that nothing overflows). No -m flags:
# conv.c's AMX functions carry target attributes, so the module imports (and says AMX is
# unusable) on any CPU.
FLAGS = ["-O3", "-fno-wrapv", "-std=gnu11", "-Wall"]


def native(name: str) -> Extension:
    return Extension(
        f"service.kernels._{name}",
        sources=[f"service/kernels/_native/{name}.c"],
        depends=["service/kernels/_native/native.h"],
        extra_compile_args=FLAGS,
        optional=True,
    )


setup(ext_modules=[native("deform"), native("conv"), native("fit")])
