"""Python binding of the fused LAMB / LARS kernels (ctypes over the C ABI).

Calling convention shared by the CPU twin and the CUDA library:

* tensor lists are parallel (one entry per tensor), contiguous, on one device; params and
  grads share one dtype (fp32, bf16 or fp16); moments, buffers and step counters are fp32;
* ``steps`` are per-tensor fp32 scalars already incremented for this step;
* ``lr`` (and the optional clip divisor) are 1-element fp32 tensors on the device, so the
  CUDA kernels read them without a host sync;
* ``sq`` is an fp32 ``[n, 2]`` tensor: pass 1 writes per-tensor squared norms into it and
  pass 2 reads them, so a caller can all-reduce it between the passes (ZeRO fragments).
"""

from __future__ import annotations

import array
import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _loader

PASS1, PASS2, BOTH = 1, 2, 3

WD_MODES = {"paper": 0, "decoupled": 1, "l2": 2}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SUPPORTED_DTYPES = tuple(_DTYPES)


class LambHyper(ctypes.Structure):
    _fields_ = [
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("beta3", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("wd_mode", ctypes.c_int32),
        ("bias_correction", ctypes.c_int32),
        ("adapt", ctypes.c_int32),
        ("phi_lo", ctypes.c_float),
        ("phi_hi", ctypes.c_float),
        ("ratio_lo", ctypes.c_float),
        ("ratio_hi", ctypes.c_float),
    ]


class LarsHyper(ctypes.Structure):
    _fields_ = [
        ("momentum", ctypes.c_float),
        ("dampening", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("trust_coeff", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("nesterov", ctypes.c_int32),
        ("trust_clip", ctypes.c_int32),
        ("adapt", ctypes.c_int32),
        ("lr_in_buffer", ctypes.c_int32),  # 1: the paper's v = m v + lr * local_lr * (g + wd w)
    ]


_P = ctypes.c_void_p


def _check_abi(lib: ctypes.CDLL) -> None:
    lib.bk_abi_sizes.restype = ctypes.c_int64
    lib.bk_abi_sizes.argtypes = [ctypes.c_int32]
    for which, struct in ((0, LambHyper), (1, LarsHyper)):
        got = lib.bk_abi_sizes(which)
        if got != ctypes.sizeof(struct):
            raise RuntimeError(f"ABI mismatch for {struct.__name__}: C {got} bytes, Python {ctypes.sizeof(struct)}")
    is_cuda = hasattr(lib, "bk_cuda_lamb")
    prefix = "bk_cuda_" if is_cuda else "bk_"
    tail = [_P, _P] if is_cuda else []  # workspace, stream
    lamb = getattr(lib, prefix + "lamb")
    lamb.restype = ctypes.c_int
    lamb.argtypes = [ctypes.c_int32, ctypes.c_int64, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int32,
                     ctypes.POINTER(LambHyper), _P, _P, _P, *tail]
    lars = getattr(lib, prefix + "lars")
    lars.restype = ctypes.c_int
    lars.argtypes = [ctypes.c_int32, ctypes.c_int64, _P, _P, _P, _P, _P, ctypes.c_int32,
                     ctypes.POINTER(LarsHyper), _P, _P, *tail]
    if is_cuda:
        lib.bk_cuda_workspace_floats.restype = ctypes.c_int64
        lib.bk_cuda_workspace_floats.argtypes = [ctypes.c_int64, _P]
        lib.bk_cuda_error_string.restype = ctypes.c_char_p
        lib.bk_cuda_error_string.argtypes = [ctypes.c_int]
        lib.bk_cuda_set_launch_limits.restype = ctypes.c_int
        lib.bk_cuda_set_launch_limits.argtypes = [ctypes.c_int32] * 3 + [ctypes.POINTER(ctypes.c_int32)]


def library_for(device: torch.device) -> ctypes.CDLL | None:
    """The fused library serving ``device``, building it on first use; None if unavailable."""
    if device.type == "cpu":
        return _loader.get_library("cpu")
    if device.type == "cuda":
        return _loader.get_library("cuda")
    return None


def is_available(device: torch.device | str = "cpu") -> bool:
    return library_for(torch.device(device)) is not None


def set_cuda_launch_limits(tensors: int = 0, blocks: int = 0, reduce: int = 0) -> tuple[int, int, int]:
    """Lower the CUDA kernels' launch-table sizes (tensors and 64K-element blocks per launch,
    tensors per reduce launch; 0 = the compiled maximum) and return the compiled maxima.

    For tests: small limits make small tensors cross launch boundaries. Process-wide."""
    lib = _loader.get_library("cuda")
    if lib is None:
        raise RuntimeError(f"the CUDA library is unavailable: {_loader.failure_reason('cuda')}")
    maxima = (ctypes.c_int32 * 3)()
    if lib.bk_cuda_set_launch_limits(tensors, blocks, reduce, maxima) != 0:
        raise ValueError(f"launch limits ({tensors}, {blocks}, {reduce}) outside [0, {tuple(maxima)}]")
    return tuple(maxima)


class _Pointers:
    """Addresses of a tensor list as a C array (``array`` builds it ~2x faster than ctypes
    arrays; this runs for every list of every step)."""

    __slots__ = ("array",)

    def __init__(self, tensors: Sequence[torch.Tensor | None]):
        self.array = array.array("Q", [0 if t is None else t.data_ptr() for t in tensors])

    @property
    def _as_parameter_(self) -> int:  # what ctypes passes for a c_void_p argument
        return self.array.buffer_info()[0]


def _check_lists(name_lists: dict[str, Sequence[torch.Tensor | None]], device: torch.device,
                 param_dtype: torch.dtype) -> None:
    params = name_lists["params"]
    for name, tensors in name_lists.items():
        if len(tensors) != len(params):
            raise ValueError(f"{name}: {len(tensors)} tensors for {len(params)} params")
        for t, p in zip(tensors, params):
            if t is None:
                continue
            if t.device != device:
                raise ValueError(f"{name}: tensor on {t.device}, expected {device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}: fused kernels need contiguous tensors")
            want = param_dtype if name in ("params", "grads") else torch.float32
            if t.dtype != want:
                raise ValueError(f"{name}: dtype {t.dtype}, expected {want}")
            if name != "steps" and t.numel() != p.numel():
                raise ValueError(f"{name}: {t.numel()} elements, param has {p.numel()}")


@dataclass
class _Call:
    lib: ctypes.CDLL
    is_cuda: bool
    numel: ctypes.Array
    n: int


def _prepare(params: Sequence[torch.Tensor]) -> _Call:
    device = params[0].device
    lib = library_for(device)
    if lib is None:
        raise RuntimeError(f"fused kernels unavailable on {device}: {_loader.failure_reason(device.type)}")
    numel = (ctypes.c_int64 * len(params))(*[p.numel() for p in params])
    return _Call(lib, device.type == "cuda", numel, len(params))


def _cuda_tail(call: _Call, device: torch.device) -> tuple[torch.Tensor, list]:
    floats = call.lib.bk_cuda_workspace_floats(call.n, call.numel)
    workspace = torch.empty(int(floats), dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream
    return workspace, [workspace.data_ptr(), stream]


def _raise_on(code: int, call: _Call, what: str) -> None:
    if code != 0:
        detail = call.lib.bk_cuda_error_string(code).decode() if call.is_cuda and code > 0 else f"code {code}"
        raise RuntimeError(f"batchkit-cuda-ext {what} failed: {detail}")


def lamb(what: int, params, grads, exp_avgs, exp_avg_sqs, steps, hyper: LambHyper,
         lr: torch.Tensor, sq: torch.Tensor, clip: torch.Tensor | None = None, stash=None,
         check: bool = True) -> None:
    """One fused LAMB call over parallel lists (see the module docstring).

    ``check=False`` skips the per-tensor device/dtype/layout/size checks (about 1 us per tensor
    and list, which is most of the host time of a GPU step with hundreds of tensors): for
    callers that guarantee them, as the optimizers do when they create and load their state.

    ``stash``: None, or fp32 buffers shaped like the params where pass 1 stores the update
    direction u and pass 2 reads it back instead of recomputing it from m, v and x: 4 more
    bytes of memory per parameter, no second sqrt/division, and pass 2 reads 8 instead of 12
    bytes per parameter. The result is bit-identical either way.
    """
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    lists = dict(params=params, grads=grads if what & 1 else params, exp_avgs=exp_avgs,
                 exp_avg_sqs=exp_avg_sqs, steps=steps)
    if stash is not None:
        lists["stash"] = stash
    if check:
        _check_lists(lists, device, dtype)
    if sq.shape != (len(params), 2) or sq.dtype != torch.float32 or not sq.is_contiguous():
        raise ValueError("sq must be a contiguous fp32 tensor of shape [n, 2]")
    call = _prepare(params)
    tail, keep = [], None
    if call.is_cuda:
        keep, tail = _cuda_tail(call, device)
    fn = call.lib.bk_cuda_lamb if call.is_cuda else call.lib.bk_lamb
    code = fn(what, call.n, call.numel, _Pointers(grads if what & 1 else params), _Pointers(params),
              _Pointers(exp_avgs), _Pointers(exp_avg_sqs), None if stash is None else _Pointers(stash), _Pointers(steps),
              _DTYPES[dtype], ctypes.byref(hyper),
              clip.data_ptr() if clip is not None else None, lr.data_ptr(), sq.data_ptr(), *tail)
    _raise_on(code, call, "lamb")
    del keep  # the workspace lives until the launches are queued; the allocator is stream-ordered


def lars(what: int, params, grads, momentum_buffers, steps, hyper: LarsHyper,
         lr: torch.Tensor, sq: torch.Tensor, check: bool = True) -> None:
    """One fused LARS call; ``momentum_buffers`` entries may be None when momentum is 0.
    ``check``: as for :func:`lamb`."""
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    if check:
        _check_lists(dict(params=params, grads=grads, momentum_buffers=momentum_buffers, steps=steps),
                     device, dtype)
    if sq.shape != (len(params), 2) or sq.dtype != torch.float32 or not sq.is_contiguous():
        raise ValueError("sq must be a contiguous fp32 tensor of shape [n, 2]")
    call = _prepare(params)
    tail, keep = [], None
    if call.is_cuda:
        keep, tail = _cuda_tail(call, device)
    fn = call.lib.bk_cuda_lars if call.is_cuda else call.lib.bk_lars
    code = fn(what, call.n, call.numel, _Pointers(grads), _Pointers(params), _Pointers(momentum_buffers),
              _Pointers(steps), _DTYPES[dtype], ctypes.byref(hyper), lr.data_ptr(), sq.data_ptr(), *tail)
    _raise_on(code, call, "lars")
    del keep
