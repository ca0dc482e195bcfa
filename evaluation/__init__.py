"""Scoring generated images the way try-on papers do (``leffa eval``): FID and KID on Inception
features as pytorch-fid and clean-fid compute them, SSIM and LPIPS as torchmetrics does, with the
networks in plain PyTorch on the published weight files. A library: imports ``errors`` and
``weightfiles`` only. ``evaluate.evaluate`` is the entry point."""
