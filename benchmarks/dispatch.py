"""Device-independent proxies for GPU step cost: aten ops dispatched per call and host
synchronisations per call, counted with a TorchDispatchMode. On a GPU a host-bound step costs about
one kernel launch per aten op, and each synchronisation stalls the queue until it drains; both
counts are the same on any device, so they can be measured on a CPU."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for the device on CUDA: a scalar read (`.item()`, `bool(t)`, `int(t)`),
# and ops whose output shape depends on the data (the host must know it to allocate the output).
SYNC_OPS = frozenset({
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.item",
    "aten.is_nonzero",
    "aten.equal",
})
# Bookkeeping ops that launch no kernel on any device.
NO_KERNEL = frozenset({"aten.detach", "aten.view", "aten._unsafe_view", "aten.alias", "aten.t",
                       "aten.transpose", "aten.permute", "aten.unsqueeze", "aten.squeeze", "aten.expand",
                       "aten.slice", "aten.select", "aten.split", "aten.unbind", "aten.as_strided"})


@dataclass
class DispatchCount:
    ops: Counter

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """Ops that launch work (views and metadata changes excluded)."""
        return sum(c for name, c in self.ops.items() if name not in NO_KERNEL)

    @property
    def syncs(self) -> int:
        return sum(c for name, c in self.ops.items() if name in SYNC_OPS)

    def top(self, k: int = 10) -> list[tuple[str, int]]:
        return self.ops.most_common(k)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is entered (`with OpCounter() as c:` or enter/exit
    by hand, e.g. from a pipeline's step callbacks)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        # "aten.add.Tensor" -> "aten.add": overloads of one op count together.
        self.ops[f"aten.{func.__name__.split('.')[0]}"] += 1
        return func(*args, **(kwargs or {}))

    def result(self) -> DispatchCount:
        return DispatchCount(Counter(self.ops))


def count_dispatch(fn: Callable[[], object]) -> DispatchCount:
    """Aten ops dispatched by one call of fn (run it once before, so that caches are warm)."""
    counter = OpCounter()
    with counter:
        fn()
    return counter.result()
