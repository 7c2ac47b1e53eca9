"""Train a canary model on any training set (DESIGN.md, "The built-in canary").

Standard DDPM eps-prediction training (Ho et al. 2020, L_simple) with classifier-free
dropout (Ho & Salimans 2022): with probability `cond_dropout` a row's caption is replaced by
the null caption "". The MiniLM text encoder is frozen, so its token states are computed
once per unique caption and cached; training steps only run the UNet and the projection.
Checkpoints every `checkpoint_every` steps; a restarted run resumes from the last one.
The exported weights are an exponential moving average (EMA) of the trained weights.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from memaudit.canary import RECIPE, SAMPLING
from memaudit.canary.model import CanaryConfig, CanaryNet, TextEncoder, save_canary
from memaudit.common import UserError, package_versions, progress_bar, resolve_device


def read_training_images(data: str | Path, resolution: int) -> tuple[torch.Tensor, list[str], str]:
    """Decode a training set (any layout `index build` reads: Parquet file, folder or glob,
    image folder, tar shards...) into grey images.

    Returns (images [N, 1, res, res] in [-1, 1], captions, sha256 of the data). Rows come
    through the shared reader (`memaudit.data.training_set`, same detection as `index
    build`); unusable rows are skipped (count printed on stderr). Parquet: the hash is over
    the files' bytes, and in a canary data folder ground_truth.parquet is not training data
    and is left out; other layouts: over every row's key, caption and image bytes.
    """
    from PIL import Image

    from memaudit.data.parquet import decode_image
    from memaudit.data.training_set import ParquetLayout, open_training_set

    ts = open_training_set(data)
    h = hashlib.sha256()
    if isinstance(ts, ParquetLayout):
        files = ts.units()
        if len(files) > 1:
            files = [f for f in files if f.name != "ground_truth.parquet"]
        for f in files:
            h.update(f.read_bytes())
        rows = (r for f in files for b in open_training_set(f).iter_batches() for r in b)
    else:
        rows = (r for b in ts.iter_batches() for r in b)
    imgs: list[np.ndarray] = []
    caps: list[str] = []
    skipped = 0
    for row in rows:
        if not isinstance(ts, ParquetLayout):
            h.update(hashlib.sha256(f"{row.key}\0{row.caption}\0".encode()).digest()
                     + hashlib.sha256(row.image_bytes or b"").digest())
        im, _reason = decode_image(row.image_bytes)
        if im is None:
            skipped += 1
            continue
        im = im.convert("L")
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.BILINEAR)
        imgs.append(np.asarray(im, dtype=np.float32) / 255.0)
        caps.append(row.caption or "")
    if skipped:
        print(f"skipped {skipped} unusable rows", file=sys.stderr)
    if not imgs:
        raise UserError(f"no decodable images in {data}")
    x = torch.from_numpy(np.stack(imgs))[:, None] * 2.0 - 1.0
    return x, caps, h.hexdigest()


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("step_*.pt"))
    return found[-1] if found else None


def check_settings(batch_size: int, steps: int, lr: float, cond_dropout: float,
                   checkpoint_every: int, log_every: int, cfg: CanaryConfig) -> None:
    """One-line UserErrors for settings that cannot train (before anything is written)."""
    down = 2 ** (len(cfg.block_out_channels) - 1)
    checks = [
        (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
        (steps >= 1, f"--steps must be at least 1, got {steps}"),
        (lr > 0, f"--lr must be positive, got {lr}"),
        (0 <= cond_dropout < 1, f"--cond-dropout must be in [0, 1), got {cond_dropout}"),
        (checkpoint_every >= 1, f"--checkpoint-every must be at least 1, got {checkpoint_every}"),
        (log_every >= 1, f"log_every must be at least 1, got {log_every}"),
        (cfg.layers_per_block >= 1,
         f"--layers-per-block must be at least 1, got {cfg.layers_per_block}"),
        (1 <= cfg.cross_attention_levels <= len(cfg.block_out_channels),
         f"--cross-attention-levels must be in 1..{len(cfg.block_out_channels)}, "
         f"got {cfg.cross_attention_levels}"),
        (cfg.resolution >= down and cfg.resolution % down == 0,
         f"--resolution must be a positive multiple of {down}, got {cfg.resolution}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _signature(data_hash: str, cfg: CanaryConfig, **settings) -> dict:
    """What must match for a checkpoint to be resumed: the data, the architecture and every
    setting that changes the optimisation (not `steps`: a run may be extended)."""
    return {"data_sha256": data_hash, "config": cfg.to_dict(), **settings}


def _prepare_out(out: Path, ckpt_dir: Path, signature: dict, restart: bool) -> Path | None:
    """The checkpoint to resume from, or None to start fresh. Refuses (one line) to resume
    a run with another signature or to replace a finished canary, unless `restart`, which
    removes the old checkpoints, loss log and exported weights first."""
    from memaudit.canary.model import CONFIG_FILE, WEIGHTS_FILE

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    last = _latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    finished = (out / WEIGHTS_FILE).exists() or (out / CONFIG_FILE).exists()
    if restart:
        for f in sorted(ckpt_dir.glob("step_*.pt")) if ckpt_dir.is_dir() else []:
            f.unlink()
        for name in ("loss.csv", WEIGHTS_FILE, CONFIG_FILE):
            (out / name).unlink(missing_ok=True)
        return None
    if last is None:
        if finished:
            raise UserError(f"{out} already holds a canary and no checkpoint to resume; "
                            "use --restart to replace it, or another --out")
        return None
    old = torch.load(last, map_location="cpu", weights_only=True).get("signature")
    if old != signature:
        diff = sorted(k for k in set(signature) | set(old or {})
                      if (old or {}).get(k) != signature.get(k))
        raise UserError(f"{out} holds a training run with other {', '.join(diff) or 'settings'} "
                        f"({last.name}); use --restart to start over, or another --out")
    return last


def train_canary(data: str | Path, out: str | Path, steps: int = RECIPE["steps"],
                 batch_size: int = RECIPE["batch_size"], lr: float = RECIPE["lr"],
                 seed: int = 0, device: str | None = None, cfg: CanaryConfig | None = None,
                 cond_dropout: float = RECIPE["cond_dropout"], checkpoint_every: int = 500,
                 log_every: int = 50, ema_decay: float = RECIPE["ema_decay"],
                 warmup: int = RECIPE["warmup"], max_minutes: float | None = None,
                 default_guidance_scale: float = 2.0, command: str | None = None,
                 init: str | Path | None = None, restart: bool = False,
                 sampling: dict | None = None) -> dict:
    """Train (or resume) a canary on `data`; write canary.safetensors + canary.json to `out`.

    Also writes out/loss.csv (step, mean loss over the last `log_every` steps, seconds) and
    out/checkpoints/step_N.pt. A run resumes from its last checkpoint only when the data hash,
    the architecture and the optimisation settings match (else a UserError, or `restart`
    starts over). `init`: a canary folder whose (EMA) weights and architecture start the run
    (fine-tuning). `max_minutes` stops early (at a logged step) and exports. `sampling`
    (e.g. {"clip_sample": False}) is stored in canary.json for the sampler. Returns the
    canary.json contents.
    """
    from diffusers import DDPMScheduler

    from memaudit.canary.model import load_canary

    init_net, init_info = (None, {}) if init is None else load_canary(init)
    if init_net is not None:
        cfg = init_net.cfg
    cfg = cfg or CanaryConfig()
    check_settings(batch_size, steps, lr, cond_dropout, checkpoint_every, log_every, cfg)
    device = resolve_device(device)
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    x_all, caps, data_hash = read_training_images(data, cfg.resolution)
    init_hash = None
    if init is not None:
        from memaudit.canary.model import WEIGHTS_FILE
        from memaudit.common import sha256_file

        init_hash = sha256_file(Path(init) / WEIGHTS_FILE)
    signature = _signature(data_hash, cfg, batch_size=batch_size, lr=lr, seed=seed,
                           cond_dropout=cond_dropout, ema_decay=ema_decay, warmup=warmup,
                           init_sha256=init_hash)
    last = _prepare_out(out, ckpt_dir, signature, restart)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    uniq = sorted(set(caps)) + [""]
    pos = {c: i for i, c in enumerate(uniq)}
    cap_idx = torch.tensor([pos[c] for c in caps], dtype=torch.long)
    null_idx = len(uniq) - 1
    text = TextEncoder(cfg.text_len, device="cpu")
    states = text.states(uniq).to(device)  # [U, L, 384], computed once (frozen encoder)
    del text

    torch.manual_seed(seed)
    net = CanaryNet(cfg)
    if init_net is not None:
        net.load_state_dict(init_net.state_dict())
    net = net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                          beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
                          beta_end=cfg.beta_end)
    acp = sched.alphas_cumprod.to(device, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    elapsed0 = 0.0
    if last is not None:
        ck = torch.load(last, map_location=device, weights_only=True)
        net.load_state_dict(ck["net"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step = int(ck["step"])
        elapsed0 = float(ck["elapsed"])
        print(f"resumed from {last.name} (step {step})", file=sys.stderr)
    loss_path = out / "loss.csv"
    if step == 0 or not loss_path.exists():
        loss_path.write_text("step,loss,seconds\n")
    else:  # drop rows logged after the checkpoint we resumed from
        rows = list(csv.reader(loss_path.open()))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
        with loss_path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)

    n = len(x_all)
    t_start = time.time() - elapsed0
    running: list[float] = []
    net.train()
    with progress_bar("training canary", total=steps - step, unit="steps") as advance:
        while step < steps:
            idx = torch.randint(0, n, (batch_size,), generator=gen)
            x0 = x_all[idx].to(device)
            ci = cap_idx[idx].clone()
            drop = torch.rand(batch_size, generator=gen) < cond_dropout
            ci[drop] = null_idx
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, cfg.num_train_timesteps, (batch_size,), generator=gen).to(device)
            a = acp[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = net(x_t, t, states[ci.to(device)])
            loss = torch.nn.functional.mse_loss(pred, noise)
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            d = ema_decay if init_net is not None else min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                    pe.lerp_(p, 1 - d)
            running.append(loss.item())
            advance(1)
            if step % log_every == 0 or step == steps:
                secs = time.time() - t_start
                mean = sum(running) / len(running)
                running = []
                with loss_path.open("a") as f:
                    f.write(f"{step},{mean:.6f},{secs:.1f}\n")
                print(f"step {step} loss {mean:.5f} {secs:.0f}s", file=sys.stderr, flush=True)
                over = max_minutes is not None and secs > 60 * max_minutes
                if step % checkpoint_every == 0 or step == steps or over:
                    path = ckpt_dir / f"step_{step:07d}.pt"
                    torch.save({"net": net.state_dict(), "ema": ema.state_dict(),
                                "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                                "elapsed": secs, "signature": signature},
                               path.with_suffix(".tmp"))
                    path.with_suffix(".tmp").replace(path)
                    for old in sorted(ckpt_dir.glob("step_*.pt"))[:-2]:
                        old.unlink()
                if over:
                    print(f"stopping at step {step}: --max-minutes {max_minutes} reached",
                          file=sys.stderr)
                    break
    secs = time.time() - t_start
    losses = [float(r[1]) for r in list(csv.reader(loss_path.open()))[1:]]
    meta = {
        "format": "memaudit-canary/1",
        "data_sha256": data_hash,
        "data_rows": n,
        "unique_captions": len(uniq) - 1,
        "steps": step,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "cond_dropout": cond_dropout,
        "ema_decay": ema_decay,
        "train_seconds": round(secs, 1),
        "final_loss": losses[-1] if losses else None,
        "default_guidance_scale": default_guidance_scale,
        "default_steps": 50,
        "warmup": warmup,
        "train_command": command,
        "device": device,
        "versions": package_versions(("memaudit", "torch", "diffusers", "transformers")),
        "weights": "ema",
        "sampling": {**SAMPLING, **(sampling or {})},
    }
    record = _data_record(data)
    if record is not None and record.get("train_sha256") == data_hash:
        meta["data"] = record  # how the data were built: the demo rebuilds the same data
    if init is not None:
        meta["init"] = {"path": str(init), "sha256": init_hash,
                        "data_sha256": init_info.get("data_sha256"),
                        "steps": init_info.get("steps")}
    save_canary(ema, out, meta)
    return json.loads((out / "canary.json").read_text())


def _data_record(data: str | Path) -> dict | None:
    """data.json written by `canary data` beside the training Parquet (None if absent)."""
    p = Path(data)
    p = p if p.is_dir() else p.parent
    try:
        rec = json.loads((p / "data.json").read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def export_checkpoint(checkpoint: str | Path, out: str | Path, cfg: CanaryConfig | None = None,
                      meta: dict | None = None) -> Path:
    """Write a canary folder from a training checkpoint's EMA weights (to look at a run
    before it ends). `cfg` must match the run's architecture."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net = CanaryNet(cfg or CanaryConfig())
    net.load_state_dict(ck["ema"])
    info = {"format": "memaudit-canary/1", "steps": int(ck["step"]), "weights": "ema",
            "default_guidance_scale": 2.0, "default_steps": 50, "sampling": dict(SAMPLING),
            "checkpoint": str(checkpoint), **(meta or {})}
    return save_canary(net, out, info)
