"""Eager decoding's matmuls on CPU through oneDNN, with the weights packed once.

A decoding step multiplies a few rows (2 x batch with CFG) by every weight of the generation path. torch's
eager CPU kernel for `x @ W.T` reads the weights at a quarter of the machine's bandwidth at those shapes,
while oneDNN's linear on a weight reordered once into its blocked layout (`mkldnn._reorder_linear_weight`,
what inductor's weight freezing packs with) runs 1.4-3x faster (`benchmarks/bench_skinny_matmul.py`).
Packing costs a copy of the packed weights (kept for later calls until they change) and a per-call overhead
that loses on small weights, so only linears of at least `MIN_PACKED_ELEMENTS` weights are packed.
"""

import contextlib
import itertools

import torch
from torch import nn

# Below this many weights (512 KiB in float32) oneDNN's per-call overhead costs more than its faster reads save
# (measured at 2-8 rows, 2 threads: 0.8x at 65,536 weights, 1.3-1.6x at 196,608, 1.9-2.2x at 589,824).
MIN_PACKED_ELEMENTS = 2**17


def weights_fingerprint(tensors, vectors: dict) -> torch.Tensor:
    """One number per tensor, u^T W v with fixed random u, v (W as rows x columns; `vectors` caches them per
    shape): any change to the content beyond float32 rounding moves it, swapped rows or columns included (a
    plain sum would miss those), at the cost of one read of the tensors."""
    values = []
    for tensor in tensors:
        matrix = tensor.detach().reshape(tensor.shape[0] if tensor.ndim else 1, -1).float()
        if matrix.shape not in vectors:
            generator = torch.Generator().manual_seed(sum(matrix.shape) * 1_000_003 + matrix.shape[0])
            vectors[matrix.shape] = tuple(torch.rand(n, generator=generator) + 0.5 for n in matrix.shape)
        u, v = (x.to(matrix.device) for x in vectors[matrix.shape])
        values.append(u @ matrix @ v)
    return torch.stack(values) if values else torch.zeros(0)


def packable(module: nn.Module) -> bool:
    """A plain float32 `nn.Linear` on the CPU, large enough for packing to pay (see `MIN_PACKED_ELEMENTS`)."""
    return (
        type(module) is nn.Linear  # not a subclass (quantized, LoRA-wrapped ...): its forward may do more
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
        and module.weight.numel() >= MIN_PACKED_ELEMENTS
        and torch.backends.mkldnn.is_available()
    )


def packable_linears(modules) -> list[nn.Linear]:
    """The `packable` linears inside `modules`, in module order."""
    return [m for m in itertools.chain.from_iterable(x.modules() for x in modules) if packable(m)]


class PackedLinears:
    """The large linears of `modules` with their weights packed for oneDNN; `with packed.active():` their forwards
    use the packed copy. `rows` is the number of input rows the layout is tuned for (any number works)."""

    def __init__(self, modules, rows: int):
        self.linears = packable_linears(modules)
        self._vectors = {}
        self.fingerprint = self._fingerprint()
        self.packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows) for m in self.linears]
        # made once, so that a compiled step's guards on the modules' `forward` hold from one call to the next
        self._forwards = [_packed_forward(m, p) for m, p in zip(self.linears, self.packed)]
        self._traceable_forwards = [_traceable_packed_forward(m) for m in self.linears]

    def _fingerprint(self):
        return weights_fingerprint(
            [t for m in self.linears for t in (m.weight, m.bias) if t is not None], self._vectors
        )

    def is_current(self, modules) -> bool:
        """Whether the packed copy still holds the weights of `modules` (the same linears, the same values)."""
        linears = packable_linears(modules)
        return (
            len(linears) == len(self.linears)
            and all(a is b for a, b in zip(linears, self.linears))
            and torch.equal(self._fingerprint(), self.fingerprint)
        )

    @contextlib.contextmanager
    def active(self, traceable: bool = False):
        """Within it, each packed linear's `forward` (an instance attribute over `nn.Linear.forward`) runs
        oneDNN on the packed weight; the class's forward is back on exit, whatever happens inside. `traceable`:
        through the `unifork::packed_linear` op, which `torch.compile` keeps as one call in its graph."""
        _ACTIVE.update({_key(m.weight): p for m, p in zip(self.linears, self.packed)} if traceable else {})
        for linear, forward in zip(self.linears, self._traceable_forwards if traceable else self._forwards):
            linear.forward = forward
        try:
            yield self
        finally:
            for linear in self.linears:
                linear.__dict__.pop("forward", None)
            _ACTIVE.clear()


def _packed_forward(linear, packed):
    def forward(x):
        return torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "none", [], "")

    return forward


def _traceable_packed_forward(linear):
    def forward(x):
        return packed_linear(x, linear.weight, linear.bias)

    return forward


# The packed weights of the `PackedLinears` active for compiled steps, by their weight's storage (the op sees the
# weight a compiled graph passes it, not the module).
_ACTIVE = {}


def _key(weight):
    return weight.data_ptr(), tuple(weight.shape)


# `F.linear(x, weight, bias)`, on the packed copy of `weight` where an active `PackedLinears` holds one: an op that
# `torch.compile` keeps as one call in its graph. Defined with `torch.library.Library`, not `custom_op`, whose Python
# wrapper added ~20 us a call to oneDNN's ~30 (1 thread, small weights), at 84 calls a decoding step at ~100M.
_LIBRARY = torch.library.Library("unifork", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _packed_linear(x, weight, bias):
    packed = _ACTIVE.get(_key(weight))
    if packed is None:
        return nn.functional.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_LIBRARY.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")
packed_linear = torch.ops.unifork.packed_linear.default


@torch.library.register_fake("unifork::packed_linear")
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
