"""FID, KID and precision/recall of samples against a reference, computed by torch-fidelity.

torch-fidelity extracts the features, computes the statistics and the metrics, and caches
the reference's features and FID statistics (``input2_cache_name``: the dataset, its split,
size and sample count, and the extractor with its weights' digest). What is written here is
only what it leaves to the caller: choosing KID's subset size and the precision/recall
neighbourhood from the sample counts, feeding uint8 tensors, and naming the results.
"""
from __future__ import annotations

import torch
import torch_fidelity

from ..paths import cache_root
from .extractors import Extractor
from .sources import ImageSource, UInt8Images, from_samples

KID_SUBSET_SIZE = 1000  # torch-fidelity's default, lowered to the sample count when there are fewer
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls (Kynkaanniemi et al. 2019)
METRICS = ("fid", "kid_mean", "kid_std", "precision", "recall")


def fidelity_cache() -> str:
    return str(cache_root() / "fidelity")


def fidelity_kwargs(samples: ImageSource, reference: ImageSource, extractor: Extractor, *,
                    batch_size: int = 256, device: torch.device | str = "cpu", cache: bool = True) -> dict:
    """The arguments of ``torch_fidelity.calculate_metrics`` for one comparison."""
    n1, n2 = len(samples), len(reference)
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {n1} and {n2}")
    cache_name = None
    if cache and reference.cache_name is not None:
        cache_name = f"{reference.cache_name}-{extractor.name}-{extractor.digest}"
    return dict(
        input1=UInt8Images(samples.images, extractor.channels),
        input2=UInt8Images(reference.images, extractor.channels),
        input2_cache_name=cache_name,
        fid=True, kid=True, prc=True,
        kid_subset_size=min(KID_SUBSET_SIZE, n1, n2),
        prc_neighborhood=min(PRC_NEIGHBORHOOD, n1 - 1, n2 - 1),
        batch_size=batch_size,
        cuda=torch.device(device).type == "cuda",
        cache=cache_name is not None, cache_root=fidelity_cache(),
        save_cpu_ram=True,  # no DataLoader worker processes: the images are already one tensor in memory
        verbose=False,
        **extractor.fidelity_kwargs(),
    )


def quality(samples: ImageSource | torch.Tensor, reference: ImageSource, extractor: Extractor, *,
            batch_size: int = 256, device: torch.device | str = "cpu", cache: bool = True) -> dict:
    """``{"fid", "kid_mean", "kid_std", "precision", "recall"}`` of ``samples`` (generated:
    torch-fidelity's input1) against ``reference`` (real: input2). ``samples`` may be a float
    tensor in [-1, 1] or uint8. Precision: the share of samples inside the real data's k-NN
    manifold; recall: the share of real images inside the samples' one."""
    if isinstance(samples, torch.Tensor):
        samples = from_samples(samples)
    m = torch_fidelity.calculate_metrics(**fidelity_kwargs(samples, reference, extractor, batch_size=batch_size,
                                                           device=device, cache=cache))
    return {
        "fid": float(m[torch_fidelity.KEY_METRIC_FID]),
        "kid_mean": float(m[torch_fidelity.KEY_METRIC_KID_MEAN]),
        "kid_std": float(m[torch_fidelity.KEY_METRIC_KID_STD]),
        "precision": float(m[torch_fidelity.KEY_METRIC_PRECISION]),
        "recall": float(m[torch_fidelity.KEY_METRIC_RECALL]),
    }
