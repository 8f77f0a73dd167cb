"""What crosses between the trusted parent and the target's child process: plain data, never live objects.

Everything is encoded to a tree of Python primitives (None, bool, int, float,
str, bytes, lists) before it is pickled, and the parent unpickles with an
``Unpickler`` that refuses every class: a hostile child cannot make the parent
run code by sending a crafted pickle. Tensors travel as their bytes beside the
pickle (a copy, never shared memory, so nothing the child does later can change
a tensor the parent holds); an NF4 weight travels as its fields; a model stays
in the child and crosses as a handle number. Anything else a target returns (a library's own
quantized type, a tensor subclass, a custom object) stays in the child too: the
parent gets an ``ObjectRef`` naming its type, and handing that back in a later
call gives the target its own object again.
"""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch

NF4_FIELDS = ("packed", "absmax", "blocksize", "shape", "dtype", "double_quant", "absmax_code", "absmax_scale",
              "absmax_offset")
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128)}
_MISSING = object()


@dataclass(frozen=True)
class ObjectRef:
    """A value of a type that does not cross processes (a library's quantized weight, a module, a custom object): it
    stays in the target's process, named here by its number, its type and its repr."""

    number: int
    type_name: str
    text: str

    def __repr__(self) -> str:
        return f"<{self.type_name} from the target: {self.text}>"


class ObjectStore:
    """The child's side of ``ObjectRef``: the objects kept for the parent, the oldest dropped past ``limit``."""

    def __init__(self, limit: int = 512) -> None:
        from collections import OrderedDict

        self.objects: OrderedDict[int, Any] = OrderedDict()
        self.limit, self.counter = limit, 0

    def keep(self, value: Any) -> list:
        self.counter += 1
        self.objects[self.counter] = value
        while len(self.objects) > self.limit:
            self.objects.popitem(last=False)
        return ["ref", self.counter, type(value).__qualname__, _short_repr(value)]

    def get(self, number: int) -> Any:
        if number not in self.objects:
            raise ValueError(f"object #{number} from an earlier call was dropped (more than {self.limit} kept)")
        return self.objects[number]

    def clear(self) -> None:
        self.objects.clear()


@dataclass
class ReturnedNF4:
    """An NF4 weight returned by a target whose fields do not form a valid ``NF4Tensor``: the fields as they came."""

    packed: Any = None
    absmax: Any = None
    blocksize: Any = None
    shape: Any = None
    dtype: Any = None
    double_quant: Any = False
    absmax_code: Any = None
    absmax_scale: Any = None
    absmax_offset: Any = None


def _is_nf4(value: Any) -> bool:
    return not isinstance(value, (torch.Tensor, type)) and hasattr(value, "packed") and hasattr(value, "absmax")


def _is_dense(t: torch.Tensor) -> bool:
    """True when the elements fill their storage span without gaps or overlaps (a permuted contiguous tensor)."""
    expected = 1
    for d in sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=lambda d: t.stride(d)):
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def encode_tensor(t: torch.Tensor) -> list:
    """A tensor as ``["tensor", dtype, shape, strides, bytes, requires_grad]``; strides survive when dense."""
    requires_grad = bool(t.requires_grad)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    strides = list(t.stride()) if not t.is_contiguous() and _is_dense(t) else None
    if strides is not None:  # the storage order of a dense non-contiguous tensor: a permutation of a contiguous one
        order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
        data = t.permute(order).contiguous()
    else:
        data = t.contiguous()
    # Out-of-band (pickle protocol 5): ``send`` writes the tensor's own bytes to the pipe, with no copy in between.
    raw = pickle.PickleBuffer(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else b""
    return ["tensor", str(t.dtype).removeprefix("torch."), list(t.shape), strides, raw, requires_grad]


def decode_tensor(item: list) -> torch.Tensor:
    _, dtype_name, shape, strides, raw, _ = item
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise ValueError(f"a tensor of dtype {dtype_name!r} cannot cross processes")
    if not len(memoryview(raw)):
        flat = torch.empty(0, dtype=dtype)
    else:  # a copy of its own: the same message may be decoded twice, and a PickleBuffer is the sender's memory
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
    if strides is None:
        return flat.reshape(shape)
    order = sorted(range(len(shape)), key=lambda d: -strides[d])
    permuted = flat.reshape([shape[d] for d in order])
    return torch.empty_strided(shape, strides, dtype=dtype).copy_(permuted.permute([order.index(d) for d in range(len(shape))]))


def _is_subclass(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def encode(value: Any, tensors: list | None = None, store: ObjectStore | None = None) -> Any:
    """``value`` as a tree of primitives.

    ``tensors``, when given, receives every tensor in the order ``decode`` will meet them; ``store``
    (the child's) keeps what cannot cross and encodes a reference to it instead.
    """
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, ObjectRef):
        return ["ref", value.number, value.type_name, value.text]
    if store is not None and isinstance(value, torch.Tensor) and _is_subclass(value):
        return store.keep(value)  # torchao's NF4Tensor, say: its meaning is its class's, which stays behind
    if isinstance(value, torch.Tensor):
        if tensors is not None:
            tensors.append(value)
        return encode_tensor(value)
    if isinstance(value, torch.dtype):
        return ["dtype", str(value).removeprefix("torch.")]
    if isinstance(value, torch.Size):
        return ["size", [int(v) for v in value]]
    if isinstance(value, (list, tuple)):
        return ["list" if isinstance(value, list) else "tuple", [encode(v, tensors, store) for v in value]]
    if isinstance(value, dict):
        return ["dict", [[encode(k, tensors, store), encode(v, tensors, store)]
                         for k, v in value.items()]]
    if _is_nf4(value):
        fields = {}
        for name in NF4_FIELDS:
            field = getattr(value, name, _MISSING)
            if field is not _MISSING:
                fields[name] = encode(field, tensors, store)
        return ["nf4", type(value).__name__, fields]
    if hasattr(value, "__float__") and type(value).__module__ == "numpy":
        return float(value)
    if store is not None:
        return store.keep(value)
    return ["ref", 0, type(value).__qualname__, _short_repr(value)]  # number 0: nothing kept, only what it was


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not break the encoding
        text = "?"
    return text if len(text) <= 200 else text[:197] + "..."


def decode(item: Any, nf4_class: Any = None, tensors: list | None = None, store: ObjectStore | None = None) -> Any:
    """Rebuild a value from ``encode``'s tree. NF4 fields become ``nf4_class`` (``NF4Tensor``) when they form one.

    ``tensors``, when given, receives every decoded tensor in order (the same order ``encode`` met them); with the
    child's ``store`` a reference is the object it kept, without it an ``ObjectRef``."""
    if not isinstance(item, list):
        return item
    tag = item[0]
    if tag == "tensor":
        tensor = decode_tensor(item)
        if tensors is not None:
            tensors.append(tensor)
        return tensor
    if tag == "dtype":
        dtype = DTYPES.get(item[1])
        if dtype is None:
            raise ValueError(f"unknown dtype {item[1]!r}")
        return dtype
    if tag == "size":
        return torch.Size(item[1])
    if tag in ("list", "tuple"):
        values = [decode(v, nf4_class, tensors, store) for v in item[1]]
        return values if tag == "list" else tuple(values)
    if tag == "dict":
        return {decode(k, nf4_class, tensors, store): decode(v, nf4_class, tensors, store) for k, v in item[1]}
    if tag == "nf4":
        fields = {name: decode(v, nf4_class, tensors, store) for name, v in item[2].items() if name in NF4_FIELDS}
        if nf4_class is not None:
            try:
                return nf4_class(**fields)
            except TypeError:
                pass
        return ReturnedNF4(**fields)
    if tag == "ref":
        if store is not None:
            return store.get(int(item[1]))
        return ObjectRef(int(item[1]), str(item[2]), str(item[3]))
    raise ValueError(f"unknown tag {tag!r} in a message between processes")


class _PrimitivesOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only primitives cross from the target's process")


MAX_BUFFERS = 1 << 16  # tensors in one message; more is not our protocol


def dumps(message: Any) -> tuple[bytes, list[memoryview]]:
    """The pickled tree, and the tensors' bytes beside it (out-of-band: never copied into the pickle)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    return data, [b.raw() for b in buffers]


def loads(data: bytes, buffers: list | tuple = ()) -> Any:
    return _PrimitivesOnly(io.BytesIO(data), buffers=buffers).load()


def send(stream, message: Any) -> None:
    """One message: its lengths, the pickled tree, then each tensor's bytes written straight from the tensor."""
    data, buffers = dumps(message)
    stream.write(struct.pack(f"<QI{len(buffers)}Q", len(data), len(buffers), *(b.nbytes for b in buffers)))
    for view in (memoryview(data), *buffers):
        while view.nbytes:
            view = view[stream.write(view):]
    stream.flush()


def receive(stream) -> Any:
    """One framed message, or EOFError when the other side has gone. Each tensor's bytes are read straight from the
    pipe into a buffer of their own, and only primitives are unpickled (``_PrimitivesOnly``)."""
    length, count = struct.unpack("<QI", _read_exactly(stream, 12))
    if count > MAX_BUFFERS:
        raise ValueError(f"a message of {count} buffers is not the protocol")
    sizes = struct.unpack(f"<{count}Q", _read_exactly(stream, 8 * count))
    data = _read_exactly(stream, length)
    return loads(data, [_read_exactly(stream, size) for size in sizes])


def _read_exactly(stream, n: int) -> bytearray:
    buffer = bytearray(n)
    view = memoryview(buffer)
    while view.nbytes:
        got = stream.readinto(view)
        if not got:
            raise EOFError("the other process closed the connection")
        view = view[got:]
    return buffer
