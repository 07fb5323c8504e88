"""Fréchet distance between two sets of feature vectors, and the feature spaces it is taken in.

The default feature space is the segmenter's: its class probabilities pooled over a 2x2 grid
(or ``S.features(images)`` when the segmenter defines it).  Call the figure a Fréchet distance in
that space, not FID: FID means Inception-v3 features (``inception_features``, optional extra).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["frechet_distance", "feature_stats", "segmenter_features", "inception_features"]


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N,D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrtm_psd(a):
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """||mu1-mu2||^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)), with Tr (s1 s2)^(1/2) computed as
    Tr (s1^(1/2) s2 s1^(1/2))^(1/2) (symmetric, stable)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    r1 = _sqrtm_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


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


def inception_features(device="cpu"):
    """Inception-v3 pool features through torch-fidelity (optional extra; its weights must be present)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("Inception features need the optional extra: pip install 'gandissect-widgets[fidelity]'") from e
    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).to(device).eval()

    def f(images):
        x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        with torch.no_grad():
            return fe(x.to(device))[0].float().cpu()
    return f
