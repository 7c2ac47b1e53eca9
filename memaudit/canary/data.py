"""Canary training data from images bundled with installed packages (DESIGN.md, "The built-in
canary").

Generic items: scikit-learn's 1,797 handwritten digits (8x8, upscaled) under generic captions,
and scikit-image's `lfw_subset` patches (faces and non-faces) under generic captions.
Planted items: distinct crops of scikit-image's twelve bundled photographs and of LFW faces,
each under a unique, specific caption (its trigger prompt), duplicated 1, 4, 16 or 64 times.
The *guided* group is measured, not built (issue 17): `canary evaluate` labels each planted
image by what the model does (memaudit.canary.evaluate.behaviour) and writes labels.json;
given those labels (`labels`, `canary data --labels`, or a labels.json beside a canary's
weights), the images reproduced only with guidance form the `guided` prompt group.
The retired *shared-caption* construction of issue 8 (off by default; docs/canary.md gives
its negative result): planted images shown `shared_copies` times under a caption that
`shared_digits` ordinary digits carry too.
Planted images are checked not to be near-duplicates (pixel RMSE at training resolution) of
each other or of any generic item, so attribution by the nearest training image is exact.

Everything is deterministic for a given seed. Images are stored at the training resolution
(16x16 grey PNG by default), so a pixel index compares at the size the model sees.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from memaudit.canary.planted import (  # noqa: F401 - re-exported
    DIGIT_PHRASINGS,
    DUP_COUNTS,
    FACE_CAPTION,
    GUIDED,
    NONFACE_CAPTION,
    PHOTOS,
    SHARED,
    SHARED_COPIES,
    SHARED_DIGITS,
    SHARED_PHOTOS,
    Planted,
    _quantize,
    _resize,
    digit_images,
    from_png,
    groups,
    rmse_matrix,
    select_planted,
    to_png,
)
from memaudit.common import UserError, sha256_file
from memaudit.paths import atomic_write


def _share_captions(planted: list[Planted], n_digits: int, shared: int,
                    seed: int) -> dict[int, str]:
    """Digit row -> the shared caption it carries instead of its digit caption: `shared`
    distinct digits per shared-caption image, drawn without replacement from their own stream
    (so the other rows do not change with these settings). Sets each Planted's `shared`."""
    guided = [p for p in planted if p.group == SHARED]
    if not guided or shared <= 0:
        return {}
    if shared * len(guided) > n_digits // 2:
        raise UserError(f"--shared-digits {shared} x {len(guided)} images needs more "
                        f"than half of the {n_digits} digits")
    rows = np.random.default_rng([seed, 8]).permutation(n_digits)
    out: dict[int, str] = {}
    for gi, p in enumerate(guided):
        p.shared = shared
        for r in rows[gi * shared:(gi + 1) * shared]:
            out[int(r)] = p.caption
    return out


def generic_prompts() -> list[str]:
    """The canary's generic prompts (generic.txt): two phrasings of each digit, and a face."""
    return [DIGIT_PHRASINGS[k % 2].format(d=d) for k in range(2) for d in range(10)] \
        + [FACE_CAPTION]


def data_files(shared_copies: int = SHARED_COPIES, extra_counts: tuple[int, ...] = ()
               ) -> list[str]:
    """The files `build_canary_data` writes, data.json last (it marks a complete build)."""
    return (["train.parquet", "ground_truth.parquet"]
            + [f"triggers_{label}.txt" for label, _ in groups(shared_copies, extra_counts)]
            + ["generic.txt", "prompts.csv", "data.json"])


def is_canary_data(folder: Path) -> bool:
    """Did `build_canary_data` write this folder? (its data.json records the SHA-256 of the
    train.parquet beside it)."""
    try:
        rec = json.loads((folder / "data.json").read_text(encoding="utf-8"))
        return isinstance(rec, dict) and rec.get("train_sha256") == sha256_file(
            folder / "train.parquet")
    except (OSError, ValueError):
        return False


def check_data_out(out: Path, overwrite: bool = False, shared_copies: int = SHARED_COPIES,
                   extra_counts: tuple[int, ...] = ()) -> None:
    """The rule of every writer (memaudit.paths): files in `out` that memaudit did not write
    (a folder that is not canary data) are replaced only with `overwrite`."""
    from memaudit.paths import writable_location

    names = data_files(shared_copies, extra_counts) + [f"triggers_{GUIDED}.txt",
                                                       f"triggers_{SHARED}.txt"]
    present = [out / n for n in dict.fromkeys(names) if (out / n).exists()]
    for p in present:
        if p.is_dir():
            raise UserError(f"{p} is a folder; canary data writes a file there")
    if present and not overwrite and not is_canary_data(out):
        more = f" (and {len(present) - 1} more)" if len(present) > 1 else ""
        raise UserError(f"{present[0]}{more} exists and is not canary data memaudit wrote; "
                        "use --overwrite to replace it")
    writable_location(out / "data.json", "canary data")


def build_canary_data(out: str | Path, res: int = 16, per_count: int = 6, seed: int = 0,
                      min_rmse: float = 0.15, digits_limit: int | None = None,
                      shared_copies: int = SHARED_COPIES,
                      shared_digits: int = SHARED_DIGITS,
                      labels: dict[str, str] | None = None,
                      extra_counts: tuple[int, ...] = (), overwrite: bool = False) -> dict:
    """Write the canary training set and prompt lists into `out`.

    Files: train.parquet (key, caption, png), ground_truth.parquet (caption, key, key_prefix,
    duplicate_count, group, behaviour, shared_with, source), triggers_64x.txt,
    triggers_16x.txt, triggers_4x.txt, triggers_1x.txt, generic.txt, prompts.csv (prompt,
    label, target_key: the planted image's first key, so an audit can count reproductions),
    and with `labels` triggers_guided.txt. Returns a summary dict (also written as data.json).
    `digits_limit` keeps only the first N digits (for tests). `labels`: caption -> behaviour
    measured by `canary evaluate` ("guided", "memorized" or ""); a guided image's prompt is
    labelled `guided` and listed in triggers_guided.txt instead of its count's list; the
    training rows do not depend on it. The shared-caption group: per_count planted images,
    `shared_copies` rows each, whose caption `shared_digits` randomly drawn digits carry
    instead of a digit caption (0: none, the default). `extra_counts`: more duplicated
    groups (e.g. (2,): per_count images shown twice), chosen after the default ones, which
    they leave unchanged. Files of `out` that memaudit did not write are replaced only with
    `overwrite`; each file is written whole (temporary + rename).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import skimage.data as skd

    out = Path(out)
    checks = [(per_count >= 1, f"--per-count must be at least 1, got {per_count}"),
              (4 <= res <= 1024, f"--resolution must be in [4, 1024], got {res}"),
              (min_rmse >= 0, f"--min-rmse must be >= 0, got {min_rmse}"),
              (shared_copies >= 0, f"--shared-copies must be >= 0, got {shared_copies}"),
              (all(c >= 1 for c in extra_counts) and not set(extra_counts) & set(DUP_COUNTS)
               and len(set(extra_counts)) == len(extra_counts),
               f"--extra-counts must be distinct counts >= 1 other than "
               f"{', '.join(map(str, DUP_COUNTS))}, got {list(extra_counts)}"),
              (shared_digits >= 0, f"--shared-digits must be >= 0, got {shared_digits}"),
              (not out.exists() or out.is_dir(), f"--out {out} is a file, not a folder")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_data_out(out, overwrite, shared_copies, tuple(extra_counts))
    rng = np.random.default_rng(seed)
    digits, digit_labels = digit_images(res)
    if digits_limit is not None:
        digits, digit_labels = digits[:digits_limit], digit_labels[:digits_limit]
    lfw = skd.lfw_subset()
    lfw_imgs = np.stack([_quantize(_resize(im, res)) for im in lfw]).astype(np.float32)

    # Faces used as planted candidates are drawn from lfw[:100]; generic faces are the rest.
    generic_digits = digits
    planted = select_planted(res, per_count, seed, min_rmse, generic=generic_digits,
                             shared_copies=shared_copies, extra_counts=tuple(extra_counts))
    planted_faces = {int(p.source.split()[-1]) for p in planted if p.source.startswith("lfw")}
    shared_caption = _share_captions(planted, len(digits), shared_digits, seed)
    labels = labels or {}
    behaviour = [labels.get(p.caption) or "" for p in planted]
    prompt_group = [GUIDED if b == GUIDED else p.group for p, b in zip(planted, behaviour,
                                                                       strict=True)]
    keys: list[str] = []
    caps: list[str] = []
    pngs: list[bytes] = []
    generic_imgs: list[np.ndarray] = []
    for i, (img, d) in enumerate(zip(digits, digit_labels, strict=True)):
        phr = DIGIT_PHRASINGS[int(rng.integers(len(DIGIT_PHRASINGS)))]
        keys.append(f"digit-{i:05d}")
        caps.append(shared_caption.get(i, phr.format(d=int(d))))
        pngs.append(to_png(img))
        generic_imgs.append(img)
    p_stack = np.stack([p.image for p in planted])
    n_lfw_dropped = 0
    for i, img in enumerate(lfw_imgs):
        if i in planted_faces:
            continue
        if rmse_matrix(img[None], p_stack).min() < min_rmse:  # keep attribution exact
            n_lfw_dropped += 1
            continue
        keys.append(f"lfw-{i:03d}")
        caps.append(FACE_CAPTION if i < 100 else NONFACE_CAPTION)
        pngs.append(to_png(img))
        generic_imgs.append(img)
    for p in planted:
        data = to_png(p.image)
        for r in range(p.count):
            keys.append(f"{p.key_prefix}-{r:02d}")
            caps.append(p.caption)
            pngs.append(data)
    out.mkdir(parents=True, exist_ok=True)  # everything above can fail; nothing written yet

    def write_text(name: str, text: str) -> None:
        with atomic_write(out / name, "canary data") as tmp:
            tmp.write_text(text, encoding="utf-8")

    # Shuffle rows deterministically (so shards/prefixes are mixed).
    perm = rng.permutation(len(keys))
    table = pa.table({
        "key": pa.array([keys[i] for i in perm], pa.string()),
        "caption": pa.array([caps[i] for i in perm], pa.string()),
        "png": pa.array([pngs[i] for i in perm], pa.binary()),
    })
    with atomic_write(out / "train.parquet", "canary data") as tmp:
        pq.write_table(table, tmp)
    gt = pa.table({
        "caption": [p.caption for p in planted],
        "key": [f"{p.key_prefix}-00" for p in planted],
        "key_prefix": [p.key_prefix for p in planted],
        "duplicate_count": pa.array([p.count for p in planted], pa.int32()),
        "group": [p.group for p in planted],
        "behaviour": behaviour,
        "shared_with": pa.array([p.shared for p in planted], pa.int32()),
        "source": [p.source for p in planted],
    })
    with atomic_write(out / "ground_truth.parquet", "canary data") as tmp:
        pq.write_table(gt, tmp)

    prompt_rows: list[tuple[str, str, str]] = []
    names = [lab for lab, _ in groups(shared_copies, tuple(extra_counts))] + (
        [GUIDED] if GUIDED in prompt_group else [])
    for label in names:
        mine = [p for p, g in zip(planted, prompt_group, strict=True) if g == label]
        write_text(f"triggers_{label}.txt", "".join(p.caption + "\n" for p in mine))
        prompt_rows += [(p.caption, label, f"{p.key_prefix}-00") for p in mine]
    for stale in {GUIDED, SHARED} - set(names):  # from an earlier build into the same folder
        (out / f"triggers_{stale}.txt").unlink(missing_ok=True)
    generic = generic_prompts()
    write_text("generic.txt", "\n".join(generic) + "\n")
    prompt_rows += [(c, "generic", "") for c in generic]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["prompt", "label", "target_key"])
    w.writerows(prompt_rows)
    write_text("prompts.csv", buf.getvalue())

    g = np.stack(generic_imgs)
    summary = {
        "rows": len(keys),
        "resolution": res,
        "seed": seed,
        "generic_rows": len(generic_imgs),
        "planted_images": len(planted),
        "planted_rows": int(sum(p.count for p in planted)),
        "per_count": per_count,
        "extra_counts": list(extra_counts),
        "shared_copies": shared_copies,
        "shared_digits": shared_digits if shared_copies else 0,
        "guided": sorted(p.caption for p, g in zip(planted, prompt_group, strict=True)
                         if g == GUIDED),
        "min_rmse": min_rmse,
        "lfw_dropped_near_planted": n_lfw_dropped,
        "min_rmse_planted_planted": float(
            (rmse_matrix(p_stack, p_stack) + np.eye(len(p_stack)) * 9).min()),
        "min_rmse_planted_generic": float(rmse_matrix(p_stack, g).min()),
        "train_sha256": sha256_file(out / "train.parquet"),
    }
    write_text("data.json", json.dumps(summary, indent=2) + "\n")  # last: the build is whole
    return summary


def read_labels(path: str | Path) -> dict[str, str]:
    """caption -> behaviour from a labels.json written by `canary evaluate` (one-line
    UserError for a file of another shape)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return {str(im["caption"]): str(im.get("behaviour") or "") for im in doc["images"]}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a labels.json written by `memaudit canary evaluate` "
                        f"({type(e).__name__}: {e})") from e


def model_data_settings(model: str) -> dict:
    """build_canary_data keywords that rebuild the data the canary was trained on, from the
    `data` record of its canary.json (`shared_copies`, or issue 8's `guided_copies`, for the
    shared-caption group), plus the behaviour labels of a labels.json beside its weights;
    {} (the defaults) when the model records none."""
    from memaudit.models.canary import SHIPPED_DIR

    folder = SHIPPED_DIR if model == "canary" else Path(model)
    out: dict = {}
    if (folder / "labels.json").is_file():
        out["labels"] = read_labels(folder / "labels.json")
    try:
        rec = json.loads((folder / "canary.json").read_text()).get("data")
    except (OSError, json.JSONDecodeError):
        return out
    if not isinstance(rec, dict):
        return out
    out.update({k: rec[k] for k in ("per_count", "seed", "min_rmse") if k in rec})
    if rec.get("extra_counts"):
        out["extra_counts"] = tuple(rec["extra_counts"])
    if "resolution" in rec:
        out["res"] = rec["resolution"]
    out["shared_copies"] = rec.get("shared_copies", rec.get("guided_copies", 0))
    if out["shared_copies"]:
        out["shared_digits"] = rec.get("shared_digits", rec.get("guided_shared", 0))
    return out
