"""``adapt_generator``: make any torch module a generator of the protocol, keeping its layer names.

What the protocol needs, and what the adapter adds:

- ``sample_z(n, seed)``: reproducible latents whose first k are the same for any n >= k.  Give
  ``zdim`` (an int, or a shape such as (512, 1, 1)) and the adapter draws
  ``numpy.random.RandomState(seed).standard_normal((n, *zdim))``; or give your own
  ``sample_z(n, seed)`` (it is checked for the prefix property).
- ``G(z)`` -> images (N,3,H,W) in [-1,1]: give ``forward(module, z)`` when the module needs other
  arguments (a class, a truncation), and ``output_range=(0, 1)`` (say) when its images are not in [-1,1].
- Layers: the adapted generator has exactly the module's layer names (``dict(G.named_modules())``:
  ``"layer4"``, ``"blocks.3.conv"``, ...); a layer you dissect must output a (N,C,h,w) tensor.
- Re-running from a layer (fast edits): without ``forward=``, the adapter calls the module on z
  as it is and says so (``resume_module``, ``finish``), so the engine re-runs an
  ``nn.Sequential`` (nested ones, or one whose output the module returns) from any child.
- Mode: ``G.training`` is the module's own; ``G.train()``/``G.eval()`` set it.

    G = adapt_generator(my_gan, zdim=128, forward=lambda m, z: m(z, truncation=0.7), output_range=(0, 1))
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["AdaptedGenerator", "adapt_generator"]


class AdaptedGenerator(nn.Module):
    """A view of ``module`` with ``sample_z``; it shares the module's children, parameters and buffers."""

    def __init__(self, module: nn.Module, sample_z: Callable, forward: Callable | None, output_range):
        super().__init__()
        object.__setattr__(self, "wrapped", module)  # not a child: its children are ours, names unchanged
        self._modules = module._modules
        self._parameters = module._parameters
        self._buffers = module._buffers
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        self._sample_z, self._forward = sample_z, forward
        self.output_range = tuple(float(v) for v in output_range)

    # the mode is the wrapped module's: a module put in eval mode before it was adapted stays so
    @property
    def training(self):
        wrapped = self.__dict__.get("wrapped")
        return wrapped.training if wrapped is not None else self.__dict__.get("_training", True)

    @training.setter
    def training(self, mode):
        wrapped = self.__dict__.get("wrapped")
        if wrapped is not None:
            wrapped.training = bool(mode)
        else:  # nn.Module.__init__, before the module is there
            self.__dict__["_training"] = bool(mode)

    @property
    def resume_module(self):
        """The module ``forward`` calls on z as it is (None with a custom ``forward``): the
        engine's ``run_from`` re-runs it from a layer, then applies ``finish``."""
        return self.wrapped if self._forward is None else None

    def finish(self, x):
        """Images in [-1,1] from the module's output (the ``output_range`` map)."""
        lo, hi = self.output_range
        if (lo, hi) != (-1.0, 1.0):
            x = (x - lo) * (2.0 / (hi - lo)) - 1.0
        return x

    def forward(self, z):
        return self.finish(self._forward(self.wrapped, z) if self._forward is not None else self.wrapped(z))

    def sample_z(self, n: int, seed: int = 0) -> torch.Tensor:
        z = self._sample_z(n, seed)
        p = next(iter(self.parameters()), None)
        return z.to(p.device) if p is not None else z


def adapt_generator(module: nn.Module, zdim=None, sample_z: Callable | None = None,
                    forward: Callable | None = None, output_range=(-1, 1)) -> AdaptedGenerator:
    """Wrap ``module`` as a protocol generator (see the module docstring for what each option means)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"adapt_generator needs a torch.nn.Module, got {type(module).__name__}")
    if (zdim is None) == (sample_z is None):
        raise ValueError("give exactly one of zdim= (the latent size or shape) or sample_z=(n, seed) -> tensor")
    if len(output_range) != 2 or not output_range[0] < output_range[1]:
        raise ValueError(f"output_range must be (low, high) with low < high, got {output_range!r}")
    if zdim is not None:
        shape = (int(zdim),) if np.isscalar(zdim) else tuple(int(s) for s in zdim)
        if not shape or min(shape) < 1:
            raise ValueError(f"zdim must be a positive int or shape, got {zdim!r}")

        def sample_z(n, seed=0, _shape=shape):
            return torch.from_numpy(np.random.RandomState(seed).standard_normal((n,) + _shape).astype(np.float32))
    else:
        if not callable(sample_z):
            raise TypeError("sample_z must be callable as sample_z(n, seed) -> tensor with n rows")
        a, b = sample_z(3, 0), sample_z(2, 0)
        if not (torch.is_tensor(a) and torch.is_tensor(b) and a.shape[0] == 3 and b.shape[0] == 2):
            raise ValueError("sample_z(n, seed) must return a tensor with n rows")
        if not torch.equal(a[:2].cpu(), b.cpu()):
            raise ValueError("sample_z(n, seed) must give the same first k latents for any n >= k "
                             "(sample_z(3, 0)[:2] != sample_z(2, 0)); draw them row by row from one seeded stream")
    if forward is not None and not callable(forward):
        raise TypeError("forward must be callable as forward(module, z) -> images")
    return AdaptedGenerator(module, sample_z, forward, output_range)
