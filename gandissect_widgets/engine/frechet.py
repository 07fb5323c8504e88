"""Fréchet distance between two sets of feature vectors, and the feature spaces it is taken in.

The default feature space is the segmenter's: its class probabilities pooled over a 2x2 grid
(or ``S.features(images)`` when the segmenter defines it).  Call the figure a Fréchet distance in
that space, not FID: FID means Inception-v3 pool features (``inception_features``, from a local
weights file: no download, no torchvision).
"""
from __future__ import annotations

import os
import warnings
import zipfile

import numpy as np
import torch

__all__ = ["frechet_distance", "feature_stats", "sqrtm_psd", "frechet_resampled", "bootstrap_indices",
           "segmenter_features", "inception_features", "InceptionWeightsError"]


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N,D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def sqrtm_psd(a):
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """||mu1-mu2||^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)), with Tr (s1 s2)^(1/2) computed as
    Tr (s1^(1/2) s2 s1^(1/2))^(1/2) (symmetric, stable)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    r1 = sqrtm_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def bootstrap_indices(n: int, rounds: int, seed: int = 0) -> np.ndarray:
    """(rounds, n) resampled indices, drawn as ``engine.ace.bootstrap_ci`` draws them (same seed, same sets)."""
    rng = np.random.RandomState(seed)
    return np.stack([rng.randint(0, n, n) for _ in range(rounds)]) if rounds else np.zeros((0, n), np.int64)


def frechet_resampled(features, mu_r, s_r, idx, chunk: int = 64, route: str = "auto", ref_sqrt=None) -> np.ndarray:
    """(R,) Fréchet distances of ``features[idx[j]]`` to the reference (mu_r, s_r), for each row of
    ``idx`` (R, n): what ``frechet_distance(*feature_stats(features[idx[j]]), mu_r, s_r)`` gives, batched.

    Bootstrap intervals need a distance per resample; looping over them is slow in any dimension,
    and hopeless for 2048-d Inception features.  ``route``: "cov" works with (D,D) matrices (fast
    when D <= N), "gram" with (N,N) ones (when D > N); "auto" picks the smaller.  ``ref_sqrt``:
    s_r^(1/2), when the caller has it (it is the same for every unit scored against one reference)."""
    F = np.asarray(features, dtype=np.float64)
    idx = np.atleast_2d(np.asarray(idx, dtype=np.int64))
    N, D = F.shape
    R, n = idx.shape
    if n < 2:
        raise ValueError(f"each resample needs at least 2 feature vectors, got {n}")
    shift = F.mean(0)                       # the distance is shift invariant: centre for precision
    F, mu_r = F - shift, np.asarray(mu_r, dtype=np.float64) - shift
    s_r = np.atleast_2d(np.asarray(s_r, dtype=np.float64))
    counts = np.zeros((R, N))
    np.add.at(counts, (np.repeat(np.arange(R), n), idx.ravel()), 1.0)
    route = ("cov" if D <= N else "gram") if route == "auto" else route
    out = np.empty(R)
    if route == "cov":
        r_half = sqrtm_psd(s_r) if ref_sqrt is None else np.asarray(ref_sqrt, dtype=np.float64)
        # one GEMM gives every resample's scatter matrix, while (N, D*D) fits in 400 MB; else one at a time
        outer = (F[:, :, None] * F[:, None, :]).reshape(N, D * D) if N * D * D <= 5e7 else None
    else:
        P = F @ s_r @ F.T
        chunk = max(1, min(chunk, int(2e8 // (8 * N * N))))             # (chunk, N, N) float64 stays < 200 MB
    sq = (F ** 2).sum(1)
    for a in range(0, R, chunk):
        c = counts[a:a + chunk]
        r = len(c)
        mu = c @ F / n                                                    # (r, D)
        trace = (c @ sq - n * (mu ** 2).sum(1)) / (n - 1)
        if route == "cov":
            scatter = (c @ outer).reshape(r, D, D) if outer is not None else np.stack(
                [(F.T * cj) @ F for cj in c])
            cov = (scatter - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)
            half = (cov.reshape(r * D, D) @ r_half).reshape(r, D, D)      # cov_j r^(1/2)
            ev = np.linalg.eigvalsh((np.ascontiguousarray(half.transpose(0, 2, 1)).reshape(r * D, D)
                                     @ r_half).reshape(r, D, D))          # r^(1/2) cov_j r^(1/2)
        else:
            w = c / n
            Pw = w @ P                                                    # (r, N): (P w)^T
            wPw = (Pw * w).sum(1)
            sc = np.sqrt(c)
            M = (P[None] - Pw[:, None, :] - Pw[:, :, None] + wPw[:, None, None]) * sc[:, :, None] * sc[:, None, :]
            ev = np.linalg.eigvalsh(M / (n - 1))                          # same non-zero spectrum, (N, N)
        cross = np.sqrt(np.clip(ev, 0, None)).sum(1)
        out[a:a + r] = ((mu - mu_r) ** 2).sum(1) + trace + np.trace(s_r) - 2 * cross
    return out


def segmenter_features(S, grid: int = 2):
    """images -> (N,D) features in the segmenter's space."""
    if callable(getattr(S, "features", None)):
        def f(images):
            with torch.no_grad():
                out = S.features(images)
            return out.flatten(1).float().cpu() if out.dim() == 2 else out.float().mean((2, 3)).cpu()
        return f
    if not callable(getattr(S, "probabilities", None)):
        raise ValueError(f"{type(S).__name__} has neither features() nor probabilities(); give feature_fn=")

    def f(images):
        with torch.no_grad():
            p = S.probabilities(images)
        return torch.nn.functional.adaptive_avg_pool2d(p.float(), grid).flatten(1).cpu()
    return f


class InceptionWeightsError(ValueError):
    """A missing or unusable Inception weights file (the message names the file and what would do)."""


_KINDS = ("a TorchScript Inception (inception-2015-12-05.pt, the StyleGAN2-ADA / clean-fid file), or torch-fidelity's "
          "state_dict (weights-inception-2015-12-05-6726825d.pth, needs torch-fidelity installed)")


def _torchscript_inception(path, device):
    try:
        with warnings.catch_warnings():      # torch deprecates TorchScript; the Inception file is one all the same
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(path, map_location=device).eval()
    except Exception as e:  # noqa: BLE001 (torch raises RuntimeError and more for a bad archive)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InceptionWeightsError(f"cannot load Inception weights {path}: not a TorchScript archive ({msg}); "
                                    f"give {_KINDS}") from None

    def run(x):
        return net(x, return_features=True)
    return run


def _fidelity_inception(path, device):
    from gandissect_widgets.checkpoint import CheckpointError, torch_load
    try:
        state = torch_load(path, what="Inception weights")    # weights only: a pickle with code is refused here
    except CheckpointError as e:
        raise InceptionWeightsError(f"{e}; give {_KINDS}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()) or "fc.weight" not in state:
        raise InceptionWeightsError(f"Inception weights {path} are not an Inception-v3 state_dict (no fc.weight); "
                                    f"give {_KINDS}")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise InceptionWeightsError(f"Inception weights {path} are a state_dict, which needs torch-fidelity "
                                    "(pip install 'gandissect-widgets[fidelity]', which needs torchvision); or give "
                                    "the TorchScript inception-2015-12-05.pt, which needs nothing more") from None
    # torch-fidelity reads the file itself (weights_only=False); it was just checked to hold tensors only
    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path).to(device)

    def run(x):
        return fe(x)[0]
    return run


def inception_features(weights, device="cpu", batch_size: int = 64):
    """images (N,3,H,W) in [-1,1] -> (N,2048) Inception-v3 pool features, from the local file ``weights``.

    The file is read, never downloaded: a TorchScript archive called as StyleGAN2-ADA and clean-fid
    call it (``net(uint8 images, return_features=True)``; it resizes to 299 itself), or torch-fidelity's
    state_dict (with torch-fidelity installed).  A missing or wrong file is an ``InceptionWeightsError``."""
    path = os.fspath(weights) if weights is not None else None
    if not path:
        raise InceptionWeightsError("Inception features need a local weights file: give " + _KINDS)
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise InceptionWeightsError(f"Inception weights {path} {what}; give {_KINDS}")
    scripted = zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") or "/code/" in n
                                                for n in zipfile.ZipFile(path).namelist())
    run = _torchscript_inception(path, device) if scripted else _fidelity_inception(path, device)
    checked = []

    def f(images):
        out = []
        for i in range(0, len(images), batch_size):
            x = ((images[i:i + batch_size].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            with torch.no_grad():
                if checked:
                    y = run(x.to(device))
                else:
                    try:
                        y = run(x.to(device))
                    except Exception as e:  # noqa: BLE001 (TorchScript raises RuntimeError for a wrong call)
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                        raise InceptionWeightsError(
                            f"Inception weights {path}: the network does not take (uint8 images, "
                            f"return_features=True) ({first}); give {_KINDS}") from None
            if not checked:
                if not torch.is_tensor(y) or y.dim() < 2 or y.shape[0] != len(x):
                    raise InceptionWeightsError(
                        f"Inception weights {path}: the network returned {type(y).__name__} "
                        f"{tuple(getattr(y, 'shape', ()))} for {len(x)} images, not (N, features); give {_KINDS}")
                checked.append(True)
            out.append(y.flatten(1).float().cpu())
        return torch.cat(out)
    f.__qualname__ = "inception_features"
    return f
