"""The generator and segmenter protocols, checked at the engine's boundary.

Generator: a ``torch.nn.Module``; ``G(z)`` maps a latent batch to images (N,3,H,W) float in [-1,1];
``G.sample_z(n, seed)`` draws reproducible latents, the first k the same for any n >= k; layers are
addressed by module path (``dict(G.named_modules())``).  Optional: ``G.forward_from(layer, r)``
for models that are not an ``nn.Sequential`` (fast re-rendering from a cached layer).

Segmenter: ``S.labels`` (names, index 0 = unlabeled); ``S(images)`` gives an integer label map
(N,H,W), or (N,K,H,W) with several label channels (a pixel is concept c if any channel says c).
Optional: ``S.probabilities(images)`` -> (N,len(labels),H,W) class probabilities, differentiable
(the causal optimiser needs it); ``S.fingerprint`` (a string) identifies non-Module segmenters in caches.

Threads: on a CPU a dissection calls the generator and the segmenter from two threads at once
(``lanes=2``), so by default both must be safe to call concurrently: no state kept between or
during calls (a torch module in eval mode is).  A model that holds per-call state (one
MediaPipe graph, an ONNX session used unlocked, a buffer it fills) says ``thread_safe = False``
(an attribute); ``thread_safe(model)`` reads it and the dissection then runs one batch at a time.
"""
from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["ProtocolError", "NonFiniteError", "check_generator", "check_segmenter", "check_images", "segment",
           "sample_latents", "check_sample_z", "fingerprint", "model_device", "thread_safe"]


class ProtocolError(ValueError):
    """A generator or segmenter that does not follow the protocol (the message says how)."""


class NonFiniteError(ProtocolError):
    """A generator that gave NaN or infinite images or activations (the message says where and how many)."""


def check_generator(G):
    if not isinstance(G, torch.nn.Module):
        raise ProtocolError(f"a generator must be a torch.nn.Module, got {type(G).__name__}")
    if not callable(getattr(G, "sample_z", None)):
        raise ProtocolError(f"{type(G).__name__} has no sample_z(n, seed) method; a generator must draw "
                            "its own reproducible latents (see gandissect_widgets.models.adapt_generator)")


def check_segmenter(S):
    labels = getattr(S, "labels", None)
    if not callable(S):
        raise ProtocolError(f"a segmenter must be callable on an image batch, got {type(S).__name__}")
    if labels is None or isinstance(labels, str) or len(labels) < 2:
        raise ProtocolError(f"{type(S).__name__} needs a 'labels' list of at least 2 names "
                            f"(index 0 = unlabeled), got {labels!r}")
    if len(set(labels)) != len(labels):
        dup = sorted({l for l in labels if list(labels).count(l) > 1})
        raise ProtocolError(f"segmenter labels must be unique; repeated: {dup}")


def check_images(x, n=None, what="generator output"):
    if not torch.is_tensor(x):
        raise ProtocolError(f"{what} must be a tensor of images (N,3,H,W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ProtocolError(f"{what} must be a float image batch (N,3,H,W) in [-1,1], "
                            f"got {x.dtype} of shape {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ProtocolError(f"{what} has {x.shape[0]} images for a batch of {n} latents")
    return x


def segment(S, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
    """S(images) checked and returned as (N,K,H,W) long.  ``check_range=False``: the labels' range
    is left to the caller (reading it is a host synchronisation)."""
    with torch.no_grad():
        seg = S(images)
    n = images.shape[0]
    name = type(S).__name__
    if not torch.is_tensor(seg):
        raise ProtocolError(f"segmenter {name} returned {type(seg).__name__}; it must return a label map "
                            "tensor (N,H,W) or (N,K,H,W)")
    if seg.is_floating_point() or seg.is_complex() or seg.dtype == torch.bool:
        raise ProtocolError(f"segmenter {name} returned {seg.dtype} values of shape {tuple(seg.shape)}; it must "
                            "return integer labels (N,H,W) or (N,K,H,W) (use argmax over class scores)")
    if seg.dim() not in (3, 4) or seg.shape[0] != n:
        raise ProtocolError(f"segmenter {name} returned shape {tuple(seg.shape)} for {n} images; "
                            f"expected ({n},H,W) or ({n},K,H,W)")
    if seg.dim() == 3:
        seg = seg[:, None]
    L = len(S.labels)
    if check_range and seg.numel():
        lo, hi = int(seg.min()), int(seg.max())
        if lo < 0 or hi >= L:
            raise ProtocolError(f"segmenter {name} returned label {hi if hi >= L else lo}, outside 0..{L - 1} "
                                f"(it has {L} labels)")
    return seg.long()


def sample_latents(G, n: int, seed: int):
    z = G.sample_z(n, seed)
    if not torch.is_tensor(z) or z.shape[0] != n:
        raise ProtocolError(f"{type(G).__name__}.sample_z({n}, {seed}) must return a tensor with {n} rows, "
                            f"got {type(z).__name__} {tuple(getattr(z, 'shape', ()))}")
    return z


def check_sample_z(G, n: int, seed: int, z=None, k: int = 4):
    """Check that ``G.sample_z`` is reproducible: ``sample_z(k, seed)`` twice gives the same latents,
    and they are the first k of ``sample_z(n, seed)`` (``z``, if the caller has drawn it).  Once per
    run: a generator that draws from the global random state would otherwise give a result that no
    rerun (nor a resumed run) reproduces."""
    name = type(G).__name__
    z = sample_latents(G, n, seed) if z is None else z
    k = max(1, min(int(k), int(n)))
    a, b = sample_latents(G, k, seed), sample_latents(G, k, seed)

    def same(x, y):
        return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.detach().cpu(), y.detach().cpu())

    if not same(a, b):
        raise ProtocolError(f"{name}.sample_z({k}, {seed}) gave different latents on two calls: sample_z(n, seed) must "
                            f"be reproducible (draw from a generator seeded with seed, e.g. "
                            f"numpy.random.RandomState(seed), not from the global random state)")
    if not same(z[:k], a):
        raise ProtocolError(f"{name}.sample_z({n}, {seed})[:{k}] differs from sample_z({k}, {seed}): the first k "
                            f"latents must be the same for any n >= k (draw them row by row from one seeded stream)")
    return z


def thread_safe(model) -> bool:
    """Whether ``model`` (a generator or a segmenter) may be called from two threads at once:
    True unless it says ``thread_safe = False`` (see the module docstring)."""
    flag = getattr(model, "thread_safe", True)
    if not isinstance(flag, bool):
        raise ProtocolError(f"{type(model).__name__}.thread_safe must be True or False, got {flag!r}")
    return flag


def model_device(m, default="cpu") -> torch.device:
    if isinstance(m, torch.nn.Module):
        for p in m.parameters():
            return p.device
        for b in m.buffers():
            return b.device
    return torch.device(default)


def fingerprint(obj) -> str:
    """A hash of what makes a model compute what it computes: class, weights, and declared extras."""
    h = hashlib.sha256()
    h.update(f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
    extra = getattr(obj, "fingerprint", None)
    if isinstance(extra, str):
        h.update(extra.encode())
    labels = getattr(obj, "labels", None)
    if labels is not None:
        h.update(json.dumps(list(labels)).encode())
    if isinstance(obj, torch.nn.Module):
        for name, t in sorted(obj.state_dict().items()):
            h.update(name.encode())
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    return h.hexdigest()[:16]
