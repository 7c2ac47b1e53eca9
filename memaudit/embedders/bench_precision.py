"""Do mixed-precision descriptors keep an index's copy verdicts? (issue 21; docs/benchmarks.md)

    python -m memaudit.embedders.bench_precision --work DIR [--weights SSCD.pt]
        [--canary-data DIR --canary-rows 400] [--precision mixed]

For each test set an SSCD index is built twice through `build_index` (with its calibration),
in fp32 and in `--precision` (on the CPU: bf16 autocast, channels-last), and the same queries
are scored through the sscd criterion of each (each embeds them in its own precision, as
`detect` does). Sets: the canary's training images (a seeded subset of `--canary-rows`; queries:
those images with a 1-pixel shift and Gaussian noise, sigma 0.02) and scikit-image's bundled
photos (queries: five edits of each, crop 80%, JPEG quality 40, mirror, half size, +10%
brightness, plus the other photos). Reported: the smallest cosine between an item's fp32 and
low-precision vectors, the largest score difference over the queries, how many verdicts differ
at the fixed thresholds (0.4, 0.5, 0.75) and at the index's calibrated ones (each index its
own), and how many fp32 scores lie within that largest difference of a threshold. Without
`--weights` the descriptor is a ResNet-50 + GeM + linear 2048 -> 512 TorchScript with random
weights (the SSCD architecture; its vectors all lie close together, so the fixed thresholds
flag everything and only the calibrated ones, in the 0.99s, test the verdicts).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "camera", "cat", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
          "text", "brick", "colorwheel", "horse", "logo", "microaneurysms", "clock")


def random_sscd_torchscript(path: Path) -> Path:
    """ResNet-50 trunk + GeM (p = 3) + Linear(2048, 512) + L2 norm, seeded random weights."""
    import warnings

    import torch
    import torchvision

    class SSCD(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            r = torchvision.models.resnet50(weights=None)
            self.trunk = torch.nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1,
                                             r.layer2, r.layer3, r.layer4)
            self.proj = torch.nn.Linear(2048, 512)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.trunk(x).clamp(min=1e-6).pow(3.0)
            f = torch.nn.functional.adaptive_avg_pool2d(f, 1).pow(1.0 / 3.0).flatten(1)
            return torch.nn.functional.normalize(self.proj(f), dim=-1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SSCD().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(path))
    return path


def _rgb(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    return Image.fromarray(a).convert("RGB")


def _png(im: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo_set() -> tuple[list[Image.Image], list[Image.Image]]:
    """(training photos, queries: five edits of each photo)."""
    import skimage.data as data

    train = [_rgb(getattr(data, n)()) for n in PHOTOS]
    queries = []
    for im in train:
        w, h = im.size
        queries += [im.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
                    Image.open(io.BytesIO(_png(im, "JPEG", quality=40))).convert("RGB"),
                    im.transpose(Image.FLIP_LEFT_RIGHT), im.resize((w // 2, h // 2)),
                    im.point(lambda v: min(255, int(v * 1.1)))]
    return train, queries


def canary_set(data: Path, rows: int, seed: int = 0) -> tuple[list[Image.Image],
                                                              list[Image.Image]]:
    """(a seeded subset of the canary's training images, shifted noisy copies of them)."""
    from memaudit.data.parquet import decode_image, iter_training_batches

    ims = [decode_image(r.image_bytes)[0] for b in
           iter_training_batches(data / "train.parquet", batch_rows=1024) for r in b]
    pick = np.random.default_rng(seed).choice(len(ims), min(rows, len(ims)), replace=False)
    train = [ims[i] for i in sorted(pick)]
    rng = np.random.default_rng(seed + 1)
    queries = []
    for im in train:
        a = np.roll(np.asarray(im, np.float32) / 255.0, 1, axis=1)
        a = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1)
        queries.append(Image.fromarray((a * 255).round().astype(np.uint8)))
    return train, queries


def compare_set(name: str, train: list[Image.Image], queries: list[Image.Image], work: Path,
                weights: Path, precision: str, device: str) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memaudit.criteria import make_criterion, open_index
    from memaudit.index import build_index

    src = work / f"{name}.parquet"
    pq.write_table(pa.table({"png": pa.array([_png(im) for im in train], pa.binary()),
                             "caption": [f"{name} {i}" for i in range(len(train))]}), src)
    res: dict[str, Any] = {}
    for prec in ("fp32", precision):
        t0 = time.perf_counter()
        out = build_index(src, "sscd", work / f"{name}-{prec}", device=device, overwrite=True,
                          embedder_opts={"weights": str(weights), "precision": prec})
        idx = open_index(str(out), weights=str(weights), device=device)
        crit = make_criterion("sscd", idx)
        s = crit.score(queries)
        cal = idx.manifest["calibration"]["sscd"]["fpr"]
        res[prec] = {"vectors": np.asarray(idx.group_vectors(), np.float64),
                     "score": np.asarray(s.score), "cal": {k: float(v) for k, v in cal.items()},
                     "seconds": time.perf_counter() - t0}
    a, b = res["fp32"], res[precision]
    diff = float(np.abs(a["score"] - b["score"]).max())
    fixed = {str(t): int(((a["score"] > t) != (b["score"] > t)).sum()) for t in (0.4, 0.5, 0.75)}
    calib = {f: int(((a["score"] > a["cal"][f]) != (b["score"] > b["cal"][f])).sum())
             for f in a["cal"]}
    near = {f: int((np.abs(a["score"] - a["cal"][f]) <= diff).sum()) for f in a["cal"]}
    return {"set": name, "items": len(train), "queries": len(queries),
            "min_item_cosine": float((a["vectors"] * b["vectors"]).sum(1).min()),
            "max_query_score_diff": diff,
            "query_score_range": [float(a["score"].min()), float(a["score"].max())],
            "verdicts_differ_fixed": fixed, "verdicts_differ_calibrated": calib,
            "calibrated_thresholds": {"fp32": a["cal"], precision: b["cal"]},
            "fp32_scores_within_diff_of_calibrated": near,
            "build_seconds": {"fp32": a["seconds"], precision: b["seconds"]}}


def bare_forward(weights: Path, precision: str, device: str, repeats: int = 3,
                 batch: int = 8) -> dict[str, float]:
    """Rows/s of the bare SSCD forward at 288 x 288, fp32 and `precision`, interleaved
    (best of `repeats`)."""
    import torch

    from memaudit.embedders import make_embedder

    embs = {p: make_embedder("sscd", weights=str(weights), device=device, precision=p)
            for p in ("fp32", precision)}
    x = torch.rand(batch, 3, 288, 288, generator=torch.Generator().manual_seed(0))
    best = {p: float("inf") for p in embs}
    for _ in range(repeats):
        for p, e in embs.items():
            t0 = time.perf_counter()
            e.embed_batch(x)
            best[p] = min(best[p], time.perf_counter() - t0)
    return {f"{p}_rows_per_s": round(batch / t, 2) for p, t in best.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--weights", type=Path, default=None, help="SSCD TorchScript (default: "
                    "the architecture with random weights)")
    ap.add_argument("--canary-data", type=Path, default=None,
                    help="canary data folder (train.parquet); default: built under --work")
    ap.add_argument("--canary-rows", type=int, default=400)
    ap.add_argument("--precision", default="mixed")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    weights = args.weights or random_sscd_torchscript(args.work / "sscd_random.torchscript.pt")
    data = args.canary_data
    if data is None:
        from memaudit.canary.data import build_canary_data

        data = args.work / "canary-data"
        if not (data / "train.parquet").exists():
            build_canary_data(data)
    out = {"weights": str(weights), "precision": args.precision, "device": args.device,
           "bare_forward": bare_forward(weights, args.precision, args.device), "sets": []}
    print(json.dumps(out["bare_forward"]), flush=True)
    for name, (train, queries) in (("photos", photo_set()),
                                   ("canary", canary_set(data, args.canary_rows))):
        r = compare_set(name, train, queries, args.work, weights, args.precision, args.device)
        out["sets"].append(r)
        print(json.dumps(r), flush=True)
    (args.work / "bench_precision.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
