"""MCLD (Liu et al., CVPR 2025): multi-focal conditioned latent diffusion for pose transfer.

``weights`` (torch-free): the published files. ``modules``: pose guider and face projector.
``attention``: the reference-feature, multi-focal cross-attention and pose processors on stock
diffusers UNets. ``model``: ``MCLDModel`` and its strict loader. ``configs``: the published and the
tiny architecture. ``memory``: phases and memory estimate. ``pipeline``: ``MCLDPipeline`` and the
published result sizes. ``hub``: ``load_model``, ``tiny_model``. ``inputs``: pictures as the model's
tensors (their dataset's conversions).
"""
