"""Reading the pickles that few-shot data sets ship in, without running their code and, for a pickled
list of images, without holding the whole list.

Pickles can name any callable; these data sets only need numpy arrays, dicts, lists, bytes and
strings, so every other global is refused (`ArrayUnpickler`). `stream_list` reads a pickle whose
top-level object is a list and hands its items to a callback as they are read: pickle writes a list
as APPENDS of up to 1,000 items, so memory holds one such batch, not the whole list (the
tieredImageNet training pickle is several GB of PNG bytes). An unpickler also keeps every object it
memoized, items included, in case a later opcode refers back to it; after each batch those that
cannot be shared between items (arrays, their payloads, the tuples holding them) are dropped, and
only what items share (classes, functions, dtypes, short strings) stays. A pickle that does refer
back to a dropped object fails with "Memo value not found", never with a wrong object.
"""
from __future__ import annotations

import pickle
import types
from typing import BinaryIO, Callable

import numpy as np


def _allowed(module: str, name: str) -> bool:
    numpy = module == "numpy" or module.startswith(("numpy.core.", "numpy._core."))
    return (numpy and name in {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}) \
        or (module, name) in {("_codecs", "encode"), ("builtins", "bytearray"), ("collections", "OrderedDict"),
                              ("builtins", "bytes"), ("__builtin__", "bytes")}  # protocol < 3: b"" is bytes()


class ArrayUnpickler(pickle.Unpickler):
    """Pickles can run arbitrary code; these only need numpy arrays, dicts, lists and strings."""

    def find_class(self, module, name):
        if _allowed(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class _Sink:
    """Stands in for the top-level list: items go to the callback instead of into a list."""

    def __init__(self, callback: Callable[[list], None]):
        self.callback, self.count, self.after = callback, 0, None

    def append(self, item) -> None:
        self.extend([item])

    def extend(self, items) -> None:
        items = list(items)
        self.count += len(items)
        self.callback(items)
        if self.after is not None:
            self.after()


class _Memo(dict):
    """The unpickler's memo, pruned as items are handed over. Protocol 4's MEMOIZE keys a new entry
    by len(memo), the number of objects memoized so far: pruning must not change that number."""

    def __init__(self):
        super().__init__()
        self.next = 0

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.next = max(self.next, key + 1)

    def __len__(self):
        return self.next


_SHARED = (type, types.BuiltinFunctionType, types.FunctionType, np.dtype, int, float, bool, type(None))


def _shared(value) -> bool:
    """What a later item may refer back to: classes, functions, dtypes, numbers, short strings."""
    return isinstance(value, _SHARED) or (isinstance(value, (str, bytes)) and len(value) <= 16)


class _StreamingUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be overridden
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, sink: _Sink, **kwargs):
        super().__init__(file, **kwargs)
        self.sink, self.started = sink, False
        self.memo, self.pruned = _Memo(), 0
        sink.after = self.prune

    def prune(self) -> None:
        """Drop what was memoized since the last prune and cannot be shared between items."""
        for key in range(self.pruned, self.memo.next):
            if key in self.memo and not _shared(dict.__getitem__(self.memo, key)):
                del self.memo[key]
        self.pruned = self.memo.next

    def find_class(self, module, name):
        if _allowed(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def _top_level(self) -> bool:
        return not self.started and not self.stack and not self.metastack

    def _load_empty_list(self):  # protocol 1+: EMPTY_LIST, then APPENDS batches
        if self._top_level():
            self.started = True
            self.append(self.sink)
        else:
            self.append([])

    def _load_list(self):  # protocol 0: MARK ... LIST, then one APPEND per item
        items = self.pop_mark()
        if self._top_level():
            self.started = True
            self.append(self.sink)
            if items:
                self.sink.extend(items)
        else:
            self.append(items)

    dispatch[pickle.EMPTY_LIST[0]] = _load_empty_list
    dispatch[pickle.LIST[0]] = _load_list


def stream_list(file: BinaryIO, callback: Callable[[list], None], encoding: str = "latin1") -> int:
    """Unpickle a list from `file`, calling callback(items) for each batch of items in order;
    returns the number of items. Raises pickle.UnpicklingError when the top-level object is not a
    list (or names a global other than numpy's array machinery), and whatever a damaged pickle
    raises (EOFError, ValueError, ...)."""
    sink = _Sink(callback)
    result = _StreamingUnpickler(file, sink, encoding=encoding).load()
    if result is not sink:
        raise pickle.UnpicklingError(f"expected a list at the top level, found {type(result).__name__}")
    return sink.count
