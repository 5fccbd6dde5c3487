"""ablate: cost and quality of Diffusion Transformer design choices, measured on a grid."""
__version__ = "0.1.0"
