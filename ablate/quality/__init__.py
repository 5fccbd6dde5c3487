"""Sample quality: FID, KID and precision/recall through torch-fidelity.

``extractors`` names the feature networks (``inception``, the standard one, offline;
``domain``, a CNN trained on the dataset), ``sources`` turns a folder, a dataset or a tensor
of samples into uint8 images, and ``metrics.quality`` computes the numbers, with the
reference statistics cached. The ``fid`` measurement (``ablate/measure/fid.py``) and
``ablate fid`` are built on these.
"""
