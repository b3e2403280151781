"""Frozen TorchScript graphs of a backbone's CPU forward: the same function, run without the GIL.

An eager forward is a few hundred small operators, and the interpreter lock is taken back after
each of them. Beside another busy Python thread (a second extraction stream decoding its images,
the API's event loop parsing requests) every one of those hand-overs waits its turn: measured on
this project's 2-core CPU VM, mobilenetv3_small_100 at batch 16 ran 13 images/s eagerly beside a
spinning Python thread and 420 as a frozen graph, whose whole forward runs in C++ without the
lock. Alone the graph is also a little faster (561 -> 614-650 images/s at 2 threads; two streams
of one thread 796-869 -> 899-957), with the same outputs to the last bit.

`torch.jit.trace` and `torch.jit.freeze` are deprecated in the torch this project pins (they warn,
and still work); a graph that fails to build, or whose outputs differ from the eager module's at
two batch sizes, is not used: the forward stays eager and a warning is logged. CUDA forwards stay
eager (autocast, cuDNN's own choices; not measured as graphs). A graph is built once per loaded
backbone, on its first forward: 0.3 s (mobilenetv3_small_100) to 1.3 s (vit_small_patch16_224)
on that VM, tracing and checks included; its weights are the eager module's tensors, not copies.
Who asks for one: serving, when it loads a backbone (its forwards run beside the API's event
loop). Extraction jobs run eagerly: whole jobs were no faster with a graph (workers.extract).
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from typing import Any

import torch

from workers.backbones import relative_error

log = logging.getLogger("cvxtune.backbones")

# Outputs of the graph and the eager module may differ by at most this, relative to the largest
# entry (they have agreed exactly on every backbone of the catalogue).
TOLERANCE = 1e-5
CHECK_BATCHES = (2, 3)  # traced at the first size, checked at both

_graphs: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class Forward(torch.nn.Module):
    """A timm model's forward as extraction uses it: (features, pooled), the last feature map
    (CNN) or tokens (ViT), and the pre-logits embedding computed from them."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        return feats, self.model.forward_head(feats, pre_logits=True)


def graph(model: Any, input_size: tuple[int, int, int]) -> Any:
    """`Forward(model)` as a frozen graph, built on first use and kept as long as the model
    lives; or `Forward(model)` itself when no faithful graph could be built. Thread-safe."""
    with _lock:
        if model not in _graphs:
            _graphs[model] = _build(model, input_size)
        return _graphs[model]


def built(model: Any) -> Any:
    """What `graph` returns for `model` if it was built already, else None."""
    with _lock:
        return _graphs.get(model)


def is_graph(fn: Any) -> bool:
    return isinstance(fn, torch.jit.ScriptModule)


def _build(model: Any, input_size: tuple[int, int, int]) -> Any:
    module = Forward(model).eval()
    gen = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(n, *input_size, generator=gen).contiguous(memory_format=torch.channels_last)
        for n in CHECK_BATCHES
    ]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Deprecation notices, and the tracer's notes on shape checks it cannot record:
            # the outputs are compared with the eager module's below instead.
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(torch.jit.trace(module, xs[0], check_trace=False))
            for x in xs:
                wants = module(x)
                frozen(x)  # the profiling run; the graph used from the next call on is checked
                for got, want in zip(frozen(x), wants, strict=True):
                    if got.shape != want.shape:
                        raise ValueError(f"shape {tuple(got.shape)} instead of {tuple(want.shape)}")
                    err = relative_error(got, want)
                    if not err <= TOLERANCE:  # NaN included
                        raise ValueError(f"outputs differ by {err:.1e} at batch {len(x)}")
    except Exception as exc:  # any failure: the eager forward is always right
        log.warning("%s: no TorchScript graph (%s); running eagerly", _name(model), exc)
        return module
    return frozen


def _name(model: Any) -> str:
    return str(getattr(model, "default_cfg", {}).get("architecture", type(model).__name__))
