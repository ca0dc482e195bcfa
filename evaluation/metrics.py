"""The distribution metrics on Inception features, as small pure functions (NumPy, float64).

- FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", NeurIPS 2017): the Fréchet distance between Gaussians fitted to the two sets,
  ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), with means and covariances (N − 1) as pytorch-fid and
  clean-fid fit them. They take the trace through ``scipy.linalg.sqrtm(Σ1 Σ2)``; we take it
  through square-root factors of the covariances (below), which gives the same value (5e-9
  relative on 2032 × 2048 features, where Σ is singular) several times faster.
- KID (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018): the unbiased estimate of MMD² with
  the kernel k(x, y) = (x·y / d + 1)³, averaged over random subsets, as clean-fid's
  ``kernel_distance`` does (100 subsets of min(n_real, n_fake, 1000) images drawn without
  replacement, the fake subset first). clean-fid draws from NumPy's global generator unseeded; we
  draw from ``np.random.RandomState(seed)``, so our value is clean-fid's after
  ``np.random.seed(seed)``. KID is returned as is; the Leffa authors' tables print it ×1000.
- PSNR, per image pair: 10 log10(255² / MSE) on the uint8 RGB images, the MSE over every pixel and
  channel, averaged over the pairs; what MCLD's ``evaluate.py`` reports (scikit-image's
  ``peak_signal_noise_ratio(gt, pred, data_range=1)`` on the images / 255, per image, then the
  mean; the same up to float32 rounding, ~1e-6 dB). Identical images score +inf, as there.
"""

from __future__ import annotations

import numpy as np


def covariance_factor(features: np.ndarray) -> np.ndarray:
    """B with Bᵀ B = the covariance of ``features`` (N, D), N − 1 normalised: the centred
    features / √(N − 1) (N, D) when N ≤ D, else the symmetric square root of the covariance (D, D)."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ValueError(f"FID needs at least 2 images per set; got {len(f)}")
    centred = (f - f.mean(0)) / np.sqrt(len(f) - 1)
    if len(f) <= f.shape[1]:
        return centred
    w, v = np.linalg.eigh(centred.T @ centred)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets (N1, D) and (N2, D). With Σi = Biᵀ Bi, the eigenvalues of
    Σ1 Σ2 are the squared singular values of B1 B2ᵀ, so Tr (Σ1 Σ2)^½ = ‖B1 B2ᵀ‖_* (nuclear norm)
    and Tr Σi = ‖Bi‖²_F."""
    b1, b2 = covariance_factor(real), covariance_factor(fake)
    diff = np.mean(real, 0, dtype=np.float64) - np.mean(fake, 0, dtype=np.float64)
    tr_covmean = np.linalg.svd(b1 @ b2.T, compute_uv=False).sum()
    return float(diff @ diff + (b1 * b1).sum() + (b2 * b2).sum() - 2 * tr_covmean)


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D) × (M, D) -> (N, M): (a·b / D + 1)³."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Mean over ``subsets`` of the unbiased MMD² between m-subsets (m = min(n_real, n_fake,
    subset_size)): [Σ_{i≠j} k(x_i, x_j) + Σ_{i≠j} k(y_i, y_j)] / (m (m − 1)) − 2 Σ_{i,j} k(x_i, y_j) / m²,
    with x the fake and y the real features. The kernels are computed once for all pairs
    (3 n² float64 values) and indexed per subset."""
    x, y = np.asarray(fake, dtype=np.float64), np.asarray(real, dtype=np.float64)
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set; got {len(y)} real and {len(x)} fake")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(subsets):
        i = rng.choice(len(x), m, replace=False)
        j = rng.choice(len(y), m, replace=False)
        a = k_xx[np.ix_(i, i)] + k_yy[np.ix_(j, j)]
        total += (a.sum() - np.trace(a)) / (m - 1) - 2 * k_xy[np.ix_(i, j)].sum() / m
    return float(total / subsets / m)


def psnr(real: np.ndarray, fake: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of ``fake`` against ``real``, two uint8 arrays of one shape
    (e.g. (H, W, 3)): 10 log10(data_range² / MSE); +inf when they are equal."""
    if real.shape != fake.shape:
        raise ValueError(f"PSNR needs images of one shape; got {real.shape} and {fake.shape}")
    mse = np.mean((real.astype(np.float64) - fake.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))
