"""Where the time of one FID evaluation goes, for a quick-grid cell (DiT-XS/4, adaLN-Zero,
digits 16x16): sampling, features, statistics (FID, KID, precision/recall), and FID-1K
images per second end to end.

    python benchmarks/fid_speed.py [--samples 1000] [--sampler ddim] [--sample-steps 10]
                                   [--extractor domain|inception] [--batch-size 100] [--device cpu]

The defaults are the quick grid's ``fid:`` section, with 1000 samples.

The stages are those the ``fid`` measurement runs (``ablate.sampling.sample_images``, then
torch-fidelity's extractor and metric functions, which ``ablate.quality.quality`` calls through
``calculate_metrics``), timed separately. The reference's features are computed once and
cached, so they are reported apart (``reference, once``). The weights are the untrained
initialisation with a live output layer: sampling costs the same for any weights.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from tabulate import tabulate

from ablate.cell import Cell, resolve
from ablate.precision import resolve_precision, synchronize
from ablate.quality.extractors import get_extractor
from ablate.quality.metrics import fidelity_kwargs
from ablate.quality.sources import from_dataset, from_samples
from ablate.sampling import SamplingOptions, sample_images

CELL = {"model": "DiT-XS/4", "block": "adaln-zero", "data": {"name": "digits", "image_size": 16},
        "measure": ["fid"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--extractor", default="domain")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    device = torch.device(args.device)
    cell = Cell(resolve({**CELL, "device": args.device}), workdir=os.devnull)
    model = cell.build_model().eval()
    with torch.no_grad():  # adaLN-Zero starts with a zero output layer: every sample would be equal
        for q in model.final_layer.parameters():
            q.normal_(0, 0.02)
    precision = resolve_precision(device, "auto")
    extractor = get_extractor(args.extractor, CELL["data"], progress=True)
    reference = from_dataset(CELL["data"])

    def timed(fn):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        return out, time.perf_counter() - t0

    # Warm-up: one small batch through the sampler and the extractor (allocator, oneDNN kernels).
    sample_images(model, 8, SamplingOptions(sample_steps=2), image_size=16, precision=precision, device=device)
    samples, t_sample = timed(lambda: sample_images(
        model, args.samples, SamplingOptions(args.sample_steps, args.sampler), image_size=16, precision=precision,
        seed=0, batch_size=args.batch_size, device=device)[0])
    kw = fidelity_kwargs(from_samples(samples), reference, extractor, batch_size=args.batch_size, device=device)
    fe = create_feature_extractor(kw["feature_extractor"], ["features" if args.extractor == "domain" else "2048"],
                                  **{k: v for k, v in kw.items() if k != "feature_extractor"})
    layer = fe.get_requested_features_list()[0]
    extract = lambda inp: get_featuresdict_from_dataset(inp, fe, args.batch_size, kw["cuda"], True, False)  # noqa: E731
    ref_features, t_ref = timed(lambda: extract(kw["input2"]))
    features, t_features = timed(lambda: extract(kw["input1"]))

    def statistics():
        s1 = fid_featuresdict_to_statistics(features, layer)
        s2 = fid_featuresdict_to_statistics(ref_features, layer)
        out = fid_statistics_to_metric(s1, s2, False)
        out.update(kid_featuresdict_to_metric(features, ref_features, layer, **kw))
        out.update(prc_featuresdict_to_metric(features, ref_features, layer, **kw))
        return out

    scores, t_stats = timed(statistics)
    total = t_sample + t_features + t_stats
    rows = [["sampling", f"{args.samples} x {args.sample_steps} {args.sampler} steps, {precision}", t_sample],
            ["features", f"{extractor.label}", t_features],
            ["statistics", "FID + KID (100 subsets) + precision/recall", t_stats],
            ["total", "", total],
            ["reference, once", f"{reference.label} (cached afterwards)", t_ref]]
    for r in rows:
        r.append(f"{100 * r[2] / total:.0f}%" if r[0] != "reference, once" else "")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, device {device}; FID = {scores['frechet_inception_distance']:.1f} (untrained)")
    print(tabulate(rows, headers=["stage", "what", "seconds", "share"], floatfmt=".2f", tablefmt="github"))
    print(f"\nFID-{args.samples // 1000 if args.samples % 1000 == 0 else args.samples}"
          f"{'K' if args.samples % 1000 == 0 else ''}: {args.samples / total:.1f} images/s end to end "
          f"(sampling {args.samples / t_sample:.1f}, features {args.samples / t_features:.0f} images/s)")


if __name__ == "__main__":
    main()
