"""Native 3x3 convolutions of the split streaming parts (C source: service/kernels/_native/conv.c).

After the feature cache and the native deformable convolution, ONNX Runtime's float32 ``Conv``
was most of the remaining time. Two kernels replace it in a part split by ``csist split-amx``:

- ``"amx"``: Intel AMX tiles in bfloat16 (inputs and weights rounded to 8 significant bits, sums
  in float32) for the convolutions with 32-channel input; several times ONNX Runtime's float32
  speed on a CPU with AMX (Intel Sapphire Rapids and later). A reduced-precision path: the card
  records its measured accuracy; the `amx` execution plan runs it (``service/engine/plans.py``).
- ``"direct"``: float32, for convolutions with at most 8 input or output channels, where ONNX
  Runtime's general kernel is far from its 32-channel speed.

Either can end with an activation folded in from the graph: ``"relu"``, or the ISTA stages' soft
threshold ``"soft_threshold"``, y = x - clip(x, lo, hi); and then with a residual Add (a residual
block's x + body(x)), given as a second input.

    conv = Conv3x3(weight, bias, "amx", "relu")   # weight (C_out, C_in, 3, 3)
    y = conv(x)                                   # x (N, C_in, H, W) -> (N, C_out, H, W)

:data:`BUILT` says whether the extension was built, :data:`AMX` whether AMX can run here (CPU, OS
and kernel), :data:`WHY_NOT_AMX` why not; :func:`cpu_flags` which instruction sets the CPU offers
the process. Calls release the GIL; with ``threads`` > 1 one call also spreads its batch over that
many threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    from service.kernels import _conv
except ImportError:  # installed without a C compiler
    _conv = None

BUILT = _conv is not None
if _conv is None:
    AMX, WHY_NOT_AMX = False, "the extension service.kernels._conv is not built (install with a C compiler)"
else:
    AMX, WHY_NOT_AMX = _conv.amx_usable()


def cpu_flags() -> tuple[str, ...] | None:
    """The instruction sets this process may use (CPUID where the OS saves their registers,
    named as /proc/cpuinfo names them), read by the extension; None where it is not built (or
    was built from older source) or not for x86-64."""
    read = getattr(_conv, "cpu_flags", None)
    return None if read is None else read()


KERNELS = ("amx", "direct")
ACTIVATIONS = {"none": 0, "relu": 1, "soft_threshold": 2}
DIRECT_MAX_CHANNELS = 8  # direct when C_in or C_out is at most this
CHAIN_MAX = 16  # convs in one ConvChain (the native side's limit)


def kernel_for(cin: int, cout: int) -> str | None:
    """Which kernel computes a 3x3 conv with these channel counts (None: leave it to ONNX Runtime)."""
    if 32 <= cin <= 1024 and cin % 32 == 0 and 16 <= cout <= 1024:
        return "amx"
    if min(cin, cout) <= DIRECT_MAX_CHANNELS and max(cin, cout) <= 1024:
        return "direct"
    return None


def in_slices(run, pool: ThreadPoolExecutor | None, threads: int, n: int, *arrays: np.ndarray) -> None:
    """``run(*arrays)``, or with a pool ``run`` on up to ``threads`` slices of the batch axis at
    once (the kernels release the GIL; each call is single-threaded)."""
    slices = min(threads, n) if pool is not None else 1
    if slices <= 1:
        run(*arrays)
        return
    bounds = np.linspace(0, n, slices + 1).astype(int)
    parts = [pool.submit(run, *(a[i:j] for a in arrays)) for i, j in zip(bounds[:-1], bounds[1:])]
    for part in parts:
        part.result()


def checked_weights(weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(C_out, C_in, 3, 3) float32 weight and (C_out,) bias (zeros when None), or ValueError."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if weight.ndim != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"weight must be (C_out, C_in, 3, 3), got {weight.shape}")
    cout = weight.shape[0]
    bias = np.zeros(cout, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    if bias.shape != (cout,):
        raise ValueError(f"bias must be ({cout},), got {bias.shape}")
    return weight, bias


def thread_pool(threads: int, name: str) -> ThreadPoolExecutor | None:
    """The pool that :func:`in_slices` spreads a batch over (None for one thread)."""
    return ThreadPoolExecutor(threads, thread_name_prefix=name) if threads > 1 else None


def to_bfloat16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even like the CPU's VCVTNEPS2BF16."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(a), (bits >> 16) | 0x40, rounded).astype(np.uint16)


def pack_weight(weight: np.ndarray) -> tuple[np.ndarray, int]:
    """(C_out, C_in, 3, 3) -> AMX B tiles in VNNI layout [tap][C_in / 32][C_out' / 16][16 channel
    pairs][16 outputs][2] bf16, and C_out': C_out rounded up to 16 with zero outputs."""
    cout, cin = weight.shape[:2]
    tiles = -(-cout // 16)
    w = np.zeros((tiles * 16, cin, 9), np.float32)
    w[:cout] = weight.reshape(cout, cin, 9)
    w = w.reshape(tiles, 16, cin // 32, 16, 2, 9).transpose(5, 2, 0, 3, 1, 4)  # (9, C_in/32, tiles, 16, 16, 2)
    return np.ascontiguousarray(to_bfloat16(w)), tiles * 16


class _MapsOp:
    """What Conv3x3 and ConvChain share: x (N, cin, H, W) -> (N, cout, H, W), plus a residual of
    the output's shape when the op adds one; the batch is spread over ``threads``; ``_run(x, out,
    *residual)`` is the native call."""

    cin: int
    cout: int
    residual: bool
    threads: int

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.cin:
            raise ValueError(f"x must be (N, {self.cin}, H, W), got {x.shape}")
        out = np.empty((x.shape[0], self.cout, *x.shape[2:]), np.float32)
        if self.residual != (residual is not None):
            raise ValueError("this conv adds a residual: pass one" if self.residual else "this conv takes no residual")
        extra = ()
        if residual is not None:
            extra = (np.ascontiguousarray(residual, dtype=np.float32),)
            if extra[0].shape != out.shape:
                raise ValueError(f"residual must be {out.shape}, got {extra[0].shape}")
        in_slices(self._run, self._pool, self.threads, x.shape[0], x, out, *extra)
        return out


class Conv3x3(_MapsOp):
    """Stride 1, padding 1, dilation 1, one group, then an optional activation (and residual)."""

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        kernel: str = "amx",
        activation: str = "none",
        clip: tuple[float, float] | None = None,
        threads: int = 1,
        residual: bool = False,
    ):
        if _conv is None:
            raise RuntimeError(WHY_NOT_AMX)
        if kernel == "amx" and not AMX:
            raise RuntimeError(f"the AMX convolution cannot run here: {WHY_NOT_AMX}")
        self.weight, self.bias = weight, bias = checked_weights(weight, bias)
        self.cout, self.cin = weight.shape[:2]
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r} is not one of {KERNELS}")
        if kernel_for(self.cin, self.cout) != kernel:
            raise ValueError(f"the {kernel} kernel does not take a conv of shape {weight.shape}")
        self.kernel = kernel
        if kernel == "amx":
            self.packed, self.cout_tiles = pack_weight(weight)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {tuple(ACTIVATIONS)}")
        if (activation == "soft_threshold") != (clip is not None):
            raise ValueError("clip=(lo, hi) goes with activation='soft_threshold', and only with it")
        self.activation = activation
        self.clip = (float(clip[0]), float(clip[1])) if clip is not None else (0.0, 0.0)
        self.residual = bool(residual)
        self.threads = max(1, int(threads))
        self._pool = thread_pool(self.threads, "conv")

    def _run(self, x: np.ndarray, out: np.ndarray, res: np.ndarray | None = None) -> None:
        act, (lo, hi) = ACTIVATIONS[self.activation], self.clip
        n, _, h, w = x.shape
        if self.kernel == "amx":
            _conv.amx_conv(
                x, self.packed, self.bias, act, lo, hi, out, n, self.cin, self.cout_tiles, self.cout, h, w, res
            )
        else:
            _conv.direct_conv(x, self.weight, self.bias, act, lo, hi, out, n, self.cin, self.cout, h, w, res)

    def layer(self) -> tuple:
        """This conv as one layer of :class:`ConvChain` (the tuple ``_conv.chain_conv`` reads)."""
        amx = self.kernel == "amx"
        wt, cout = (self.packed, self.cout_tiles) if amx else (self.weight, self.cout)
        return (int(amx), wt, self.bias, ACTIVATIONS[self.activation], *self.clip, self.cin, cout, self.cout)


def chains_into(first: Conv3x3, second: Conv3x3) -> bool:
    """Whether ``second`` can follow ``first`` in one :class:`ConvChain`: it reads all of
    ``first``'s outputs, and ``first`` adds no residual (only a chain's last conv may). (An AMX
    conv's input has a multiple of 32 channels, so an AMX conv feeding one has whole 32-channel
    rows, which the native side writes straight from its tiles.)"""
    return second.cin == first.cout and not first.residual


class ConvChain(_MapsOp):
    """Consecutive convs whose intermediate results feed only the next conv, in one native call.

    Computes exactly what the convs compute one after another (the same bfloat16 rounding and
    float32 sums), but the intermediates stay in the layouts the kernels read (planar float32
    maps for a direct conv, position-major bfloat16 rows for an AMX conv) instead of going back
    to NCHW float32 between convs; an ISTA stage (direct, AMX, AMX, direct) is one call. Needs
    AMX (the split parts that have chains run on it).
    """

    def __init__(self, convs: list[Conv3x3]):
        if not AMX:
            raise RuntimeError(f"the conv chain cannot run here: {WHY_NOT_AMX}")
        if not 2 <= len(convs) <= CHAIN_MAX:
            raise ValueError(f"a chain has 2 to {CHAIN_MAX} convs, got {len(convs)}")
        for a, b in zip(convs, convs[1:]):
            if not chains_into(a, b):
                raise ValueError(
                    f"a {b.kernel} conv of {b.cin} input channels cannot follow a {a.kernel} conv "
                    f"of {a.cout} outputs in a chain"
                )
        self.convs = list(convs)
        self.cin, self.cout = convs[0].cin, convs[-1].cout
        self.residual = convs[-1].residual
        self.threads = max(c.threads for c in convs)
        self._pool = thread_pool(self.threads, "conv-chain")
        self._layers = tuple(c.layer() for c in convs)

    def _run(self, x: np.ndarray, out: np.ndarray, res: np.ndarray | None = None) -> None:
        n, _, h, w = x.shape
        _conv.chain_conv(x, out, n, h, w, self._layers, res)
