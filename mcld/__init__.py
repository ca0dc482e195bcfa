"""MCLD (Liu et al., CVPR 2025): multi-focal conditioned latent diffusion for pose transfer."""
