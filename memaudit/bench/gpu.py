"""Every GPU figure memaudit reports, in one run (issue 21; docs/benchmarks.md, "GPU"):

    python -m memaudit.bench.gpu OUTDIR            # one GPU, within 8 minutes on an H100
    python -m memaudit.bench.gpu OUTDIR --smoke    # toy sizes on the CPU (CI runs this), the
                                                   # same dtypes: a dtype mix-up fails here

1. AMG against cfg per family at real size (SD 1.5 at 512, SDXL and SD3-medium at 1024;
   architecture-true, random weights, memaudit/models/bench_archs.py), the denoiser in the
   family's CUDA dtype (fp16; bf16 for SD3), the VAE and AMG's check in fp32: the components
   of memaudit/models/bench.py for AMG's check with the full VAE and with a TAESD-architecture
   tiny decoder, at full and at the descriptor's size, projected to AMG / cfg per image when
   AMG fires every step and when it never fires; peak GPU memory.
2. SSCD index builds (ResNet-50 SSCD architecture, random weights, 288 short edge) of
   synthetic JPEGs: the whole `build_index` in fp32 and in mixed precision (fp16 autocast,
   channels-last), with PIL and with GPU JPEG decoding, against the bare forward of the same
   precision on pre-decoded tensors (rows/s).
3. The family tests on the device (`MEMAUDIT_TEST_DEVICE`; test_families_dtype covers fp16
   and bf16): passed / failed and seconds.
Writes OUTDIR/gpu_bench.md (one Markdown table, to paste into docs/benchmarks.md) and
OUTDIR/gpu_bench.json (everything, with the device's name and the versions).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

FAMILIES = {"sd15": (512, 50, torch.float16), "sdxl": (1024, 50, torch.float16),
            "sd3": (1024, 28, torch.bfloat16)}
VARIANT_LABELS = {"vae": "full VAE", "vae-desc": "full VAE at the descriptor's size",
                  "tiny": "tiny decoder", "tiny-desc": "tiny decoder at the descriptor's size"}
TEST_FILES = ("tests/test_families.py", "tests/test_families_dtype.py", "tests/test_amg_check.py")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def amg_costs(arch: str, device: str, smoke: bool, repeats: int) -> dict[str, Any]:
    """Section 1 for one family: components (wall s, median) and the projections."""
    from memaudit.models.bench import components, project
    from memaudit.models.bench_archs import ARCHS, DescriptorCriterion

    res, steps, dtype = FAMILIES[arch]
    if smoke:  # toy sizes, the family's dtype all the same (fp16 and bf16 run on the CPU)
        res = 64
    build = ARCHS[arch][0]
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = build(res, device=device, dtype=dtype, tiny=smoke)
    crit = DescriptorCriterion(size=32 if smoke else 288, device=device)
    built = time.perf_counter() - t0
    parts = ["step_s", "decode_s"]
    variants = ("vae", "vae-desc", "tiny", "tiny-desc")
    from memaudit.models.bench import part_names

    for v in variants:
        parts += list(part_names(v))
    if not smoke:
        components(model, crit, 1, parts, None, variants)  # warm-up (cuDNN, allocator)
    comp = components(model, crit, repeats, parts, None, variants)["wall"]
    proj = project(comp, steps, 10)
    out = {"arch": arch, "resolution": res, "steps": steps, "dtype": str(dtype),
           "build_s": round(built, 1), "components_s": comp,
           "ratios": {k: round(v["ratio"], 3) for k, v in proj.items()}}
    if device.startswith("cuda"):
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    del model, crit
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def sscd_throughput(work: Path, device: str, smoke: bool) -> dict[str, Any]:
    """Section 2: rows/s of whole builds and bare forwards, fp32 and mixed precision."""
    from memaudit.data.parquet import decode_image, iter_training_rows
    from memaudit.embedders import make_embedder
    from memaudit.embedders.bench_precision import random_sscd_torchscript
    from memaudit.index import build_index
    from memaudit.index.bench import synthetic_parquet

    rows, size, batch = (64, 64, 16) if smoke else (4096, 384, 128)
    src = synthetic_parquet(work / "jpegs.parquet", rows, size=size, fmt="JPEG")
    weights = random_sscd_torchscript(work / "sscd_random.torchscript.pt")
    opts = {"weights": str(weights), **({"short_edge": 32} if smoke else {})}
    out: dict[str, Any] = {"rows": rows, "image_px": size, "batch_size": batch}
    batches = None
    for prec in ("fp32", "mixed"):
        emb = make_embedder("sscd", device=device, precision=prec, **opts)
        if batches is None:  # the same preprocessed tensors for both precisions
            tensors = [emb.preprocess(decode_image(r.image_bytes)[0])
                       for r in iter_training_rows(src)]
            batches = [torch.stack(tensors[i:i + batch]) for i in range(0, rows, batch)]
            del tensors
        emb.embed_batch(batches[0])  # warm-up
        _sync()
        t0 = time.perf_counter()
        for b in batches:
            emb.embed_batch(b)
        _sync()
        out[f"bare_{prec}_rows_per_s"] = round(rows / (time.perf_counter() - t0), 1)
        for jpeg in ("off", "auto"):
            if jpeg == "auto" and not device.startswith("cuda"):
                continue  # auto decodes with PIL on the CPU: the same as off
            t0 = time.perf_counter()
            build_index(src, "sscd", work / f"idx-{prec}-{jpeg}", device=device,
                        batch_size=batch, embedder_opts={**opts, "precision": prec},
                        calibrate=False, overwrite=True, jpeg_device=jpeg)
            _sync()
            key = f"build_{prec}_{'pil' if jpeg == 'off' else 'gpu_jpeg'}_rows_per_s"
            out[key] = round(rows / (time.perf_counter() - t0), 1)
    return out


def family_tests(device: str, smoke: bool, timeout: int) -> dict[str, Any]:
    """Section 3: the family tests in a subprocess on `device`."""
    root = Path(__file__).resolve().parents[2]
    files = [f for f in TEST_FILES if (root / f).is_file()]
    if not files:
        return {"skipped": "no tests/ folder beside memaudit/"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    if smoke:
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", files[-1],
                "-k", "schedule_gaps"]
    env = {**os.environ, "MEMAUDIT_TEST_DEVICE": device,
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True,
                           timeout=timeout)
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
        rc = p.returncode
    except subprocess.TimeoutExpired:
        tail, rc = [f"timed out after {timeout} s"], -1
    return {"device": device, "files": files if not smoke else [files[-1]], "returncode": rc,
            "summary": tail[0], "seconds": round(time.perf_counter() - t0, 1)}


def markdown(res: dict[str, Any]) -> str:
    """The one table: measurement | figure | detail."""
    lines = [f"Device: {res['device_name']} ({res['device']}), torch {res['torch']}, "
             f"{res['date']}{' (smoke: toy sizes, no figure)' if res['smoke'] else ''}",
             "", "| measurement | figure | detail |", "|---|---|---|"]
    for a in res.get("amg", []):
        r = a["ratios"]
        for v, label in VARIANT_LABELS.items():
            tag = "" if v == "vae" else f"[{v}]"
            if "amg" + tag in r:
                lines.append(f"| {a['arch']} {a['resolution']} px, AMG / cfg, {label} | "
                             f"{r['amg' + tag]:.2f}x fires every step, "
                             f"{r['amg-quiet' + tag]:.2f}x never fires | "
                             f"{a['steps']} steps, denoiser {a['dtype'].split('.')[-1]}, "
                             f"cfg step {a['components_s']['step_s'] * 1000:.0f} ms, peak "
                             f"{a.get('peak_gpu_gib', '-')} GiB |")
    s = res.get("sscd")
    if s:
        for prec in ("fp32", "mixed"):
            for dec in ("pil", "gpu_jpeg"):
                key = f"build_{prec}_{dec}_rows_per_s"
                if key in s:
                    bare = s[f"bare_{prec}_rows_per_s"]
                    lines.append(f"| SSCD index build, {prec}, {dec.replace('_', ' ')} decode | "
                                 f"{s[key]:.0f} rows/s ({s[key] / bare:.2f} of the bare "
                                 f"forward, {bare:.0f} rows/s) | {s['rows']} JPEGs of "
                                 f"{s['image_px']} px, batch {s['batch_size']} |")
    t = res.get("tests")
    if t:
        lines.append(f"| family tests on {t.get('device')} | {t.get('summary', '')} | "
                     f"{', '.join(t.get('files', []))}, {t.get('seconds')} s |")
    for name, why in res.get("skipped", {}).items():
        lines.append(f"| {name} | not run | {why} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for gpu_bench.md and gpu_bench.json")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (runs on the CPU too)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--families", default="sd15,sdxl,sd3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="sections not started after this many seconds are skipped")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    from memaudit.common import resolve_device

    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    res: dict[str, Any] = {"device": device, "device_name": name, "torch": torch.__version__,
                           "smoke": args.smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                      time.gmtime()),
                           "amg": [], "skipped": {}}

    def over(what: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            res["skipped"][what] = f"over the {args.budget_s:.0f} s budget"
            return True
        return False

    for arch in [a for a in args.families.split(",") if a]:
        if not over(f"AMG {arch}"):
            try:
                res["amg"].append(amg_costs(arch, device, args.smoke, args.repeats))
                print(json.dumps(res["amg"][-1]), flush=True)
            except torch.cuda.OutOfMemoryError as e:
                res["skipped"][f"AMG {arch}"] = f"out of GPU memory: {str(e).splitlines()[0]}"
                torch.cuda.empty_cache()
    if not over("SSCD build throughput"):
        res["sscd"] = sscd_throughput(args.out, device, args.smoke)
        print(json.dumps(res["sscd"]), flush=True)
    if not args.skip_tests and not over("family tests"):
        left = max(60, int(args.budget_s + 30 - (time.perf_counter() - t_start)))
        res["tests"] = family_tests(device, args.smoke, left)
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    from memaudit.common import package_versions

    res["versions"] = package_versions()
    (args.out / "gpu_bench.json").write_text(json.dumps(res, indent=2, default=str))
    (args.out / "gpu_bench.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
