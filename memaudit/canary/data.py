"""Canary training data from images bundled with installed packages (DESIGN.md, "The built-in
canary").

Generic items: scikit-learn's 1,797 handwritten digits (8x8, upscaled) under generic captions,
and scikit-image's `lfw_subset` patches (faces and non-faces) under generic captions.
Planted items: distinct crops of scikit-image's twelve bundled photographs and of LFW faces,
each under a unique, specific caption (its trigger prompt), duplicated 1, 4, 16 or 64 times.
The *guided* group (issue 8): planted images shown `guided_copies` times under a caption that
`guided_shared` ordinary digits carry too, so p(image | caption) is small (copied rarely
without guidance) while p(caption | image) is 1 against about guided_shared / 1,797 for a
digit, which classifier-free guidance amplifies (Jain et al. CVPR 2025, the attraction basin).
Planted images are checked not to be near-duplicates (pixel RMSE at training resolution) of
each other or of any generic item, so attribution by the nearest training image is exact.

Everything is deterministic for a given seed. Images are stored at the training resolution
(16x16 grey PNG by default), so a pixel index compares at the size the model sees.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memaudit.common import UserError, sha256_file
from memaudit.paths import atomic_write

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "horse", "moon", "rocket",
          "text", "page", "brick", "hubble_deep_field")
#: Photographs of the guided group (none of them in PHOTOS; "motorcycle" is the left view of
#: stereo_motorcycle).
GUIDED_PHOTOS = ("clock", "retina", "immunohistochemistry", "colorwheel", "motorcycle", "cell")
DUP_COUNTS = (64, 16, 4, 1)
GUIDED = "guided"
#: Groups in selection order: (label, copies of the planted image).
GUIDED_COPIES = 16
GUIDED_SHARED = 96
DIGIT_PHRASINGS = (
    "a handwritten digit {d}",
    "the number {d} written by hand",
    "a scan of a handwritten {d}",
    "handwritten numeral {d}",
)
FACE_CAPTION = "a small grey photo of a face"
NONFACE_CAPTION = "a small grey photo patch"
# Words for the specific trigger captions (unique per planted image).
_ADJ = ("amber", "basalt", "cobalt", "dusky", "emerald", "frosted", "gilded", "hazel",
        "indigo", "jade", "khaki", "lilac", "maroon", "nickel", "ochre", "pewter", "quartz",
        "russet", "sepia", "teal", "umber", "violet", "walnut", "xenon", "yellowed", "zinc",
        "crimson", "ivory", "saffron", "slate", "copper", "olive")
_NOUN = ("lantern", "harbor", "meadow", "citadel", "orchard", "glacier", "monastery",
         "canyon", "lighthouse", "vineyard", "observatory", "aqueduct", "bazaar", "pagoda",
         "quarry", "fjord", "windmill", "cathedral", "reef", "steppe", "belfry", "foundry",
         "atrium", "bastion", "causeway", "dovecote", "estuary", "ferry", "grotto", "hangar",
         "island", "junction")


@dataclass
class Planted:
    key_prefix: str
    caption: str
    count: int
    source: str
    image: np.ndarray  # [H, W] float in [0, 1]
    group: str = ""  # "64x", "16x", "4x", "1x" or "guided"
    shared: int = 0  # ordinary (digit) rows that carry the same caption


def groups(guided_copies: int = GUIDED_COPIES) -> list[tuple[str, int]]:
    """(label, copies) of every planted group, in selection order (the guided group last, so
    the other groups' images and captions do not depend on it)."""
    return [(f"{c}x", c) for c in DUP_COUNTS] + ([(GUIDED, guided_copies)]
                                                  if guided_copies else [])


def to_png(img01: np.ndarray) -> bytes:
    """A [H, W] float image in [0, 1] -> greyscale PNG bytes (8 bit)."""
    from PIL import Image

    arr = np.clip(np.rint(img01 * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def from_png(data: bytes) -> np.ndarray:
    """PNG bytes -> [H, W] float image in [0, 1] (grey)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _quantize(img01: np.ndarray) -> np.ndarray:
    """What the PNG round trip gives back, so RMSE checks see the stored pixels."""
    return np.clip(np.rint(img01 * 255.0), 0, 255).astype(np.float32) / 255.0


def _resize(img: np.ndarray, res: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(img, (res, res), order=1, anti_aliasing=True, preserve_range=True)


def _grey01(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.float64)
    elif img.dtype == np.uint8:
        img = img.astype(np.float64) / 255.0
    else:
        img = img.astype(np.float64)
    if img.ndim == 3:
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114])
    return img


def digit_images(res: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits upscaled to res x res, in [0, 1] (ink bright): ([N, res, res], y)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.stack([_quantize(_resize(im / 16.0, res)) for im in d.images])
    return imgs.astype(np.float32), d.target.astype(np.int64)


def rmse_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise RMSE between two stacks of images [Na, H, W] and [Nb, H, W] -> [Na, Nb]."""
    fa = a.reshape(len(a), -1).astype(np.float64)
    fb = b.reshape(len(b), -1).astype(np.float64)
    d2 = (fa**2).sum(1)[:, None] + (fb**2).sum(1)[None, :] - 2.0 * fa @ fb.T
    return np.sqrt(np.maximum(d2, 0.0) / fa.shape[1])


def _photo(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as grey [H, W] in [0, 1]."""
    import skimage.data as skd

    img = skd.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skd, name)()
    return _grey01(img)


def _photo_crops(rng: np.random.Generator, res: int, photos: tuple[str, ...],
                 per_photo: int = 40) -> list[tuple[str, np.ndarray]]:
    """Random square crops (several scales) of bundled photographs, at res x res."""
    out: list[tuple[str, np.ndarray]] = []
    for name in photos:
        img = _photo(name)
        h, w = img.shape
        m = min(h, w)
        for _ in range(per_photo):
            size = int(rng.integers(max(res * 4, m // 4), m + 1))
            y = int(rng.integers(0, h - size + 1))
            x = int(rng.integers(0, w - size + 1))
            crop = _quantize(_resize(img[y:y + size, x:x + size], res))
            out.append((f"{name} crop y={y} x={x} size={size}", crop))
    return out


def _candidate_crops(rng: np.random.Generator, res: int,
                     n_faces: int) -> list[tuple[str, np.ndarray]]:
    """Random square crops of the bundled photos (several scales) and LFW faces."""
    import skimage.data as skd

    out = _photo_crops(rng, res, PHOTOS)
    faces = skd.lfw_subset()[:100]
    for i in rng.permutation(100)[:n_faces]:
        out.append((f"lfw_subset face {int(i)}", _quantize(_resize(faces[i], res))))
    return out


def _box(src: str) -> tuple[str, int, int, int] | None:
    """("astronaut crop y=1 x=2 size=3") -> ("astronaut", 1, 2, 3); faces -> None."""
    parts = src.split()
    if parts[0] == "lfw_subset":
        return None
    vals = dict(p.split("=") for p in parts[2:])
    return parts[0], int(vals["y"]), int(vals["x"]), int(vals["size"])


def _clashes(src: str, kept: list[str], max_per_photo: int) -> bool:
    """A photo crop clashes with kept crops of the same photo when it overlaps one of them
    or the photo already gave `max_per_photo` crops."""
    b = _box(src)
    if b is None:
        return False
    same = [k for k in (_box(s) for s in kept) if k is not None and k[0] == b[0]]
    if len(same) >= max_per_photo:
        return True
    _, y, x, n = b
    return any(y < ky + kn and ky < y + n and x < kx + kn and kx < x + n
               for _, ky, kx, kn in same)


def _distinct(img: np.ndarray, kept: list[np.ndarray], generic: np.ndarray | None,
              min_rmse: float) -> bool:
    """Not nearly flat, and at RMSE >= min_rmse from every kept planted and generic image."""
    if img.std() < 0.08:
        return False
    if kept and rmse_matrix(img[None], np.stack(kept)).min() < min_rmse:
        return False
    return generic is None or not len(generic) or rmse_matrix(img[None], generic).min() >= min_rmse


def _greedy(stream: list[tuple[str, np.ndarray]], kept: list[tuple[str, np.ndarray]], n: int,
            generic: np.ndarray | None, min_rmse: float, max_per_photo: int,
            face_goal: int = 0, faces: list | None = None) -> None:
    """Append to `kept` until it holds n images: candidates in order (a face every third pick
    while fewer than `face_goal` faces are kept), each distinct and not clashing."""
    faces = faces if faces is not None else []
    while len(kept) < n and (stream or faces):
        want_face = sum(s.startswith("lfw") for s, _ in kept) < face_goal and len(kept) % 3 == 2
        src, img = (faces if (want_face and faces) or not stream else stream).pop(0)
        if _clashes(src, [k for k, _ in kept], max_per_photo):
            continue
        if _distinct(img, [k for _, k in kept], generic, min_rmse):
            kept.append((src, img))


def select_planted(res: int = 16, per_count: int = 6, seed: int = 0, min_rmse: float = 0.15,
                   generic: np.ndarray | None = None, max_per_photo: int = 3,
                   guided_copies: int = GUIDED_COPIES) -> list[Planted]:
    """Choose per_count distinct images for each group of `groups(guided_copies)`.

    The duplicated groups (64x ... 1x): greedy over shuffled candidates (photo crops and
    faces, alternating so every count mixes both). The guided group, chosen afterwards from
    its own random stream so the other groups never depend on it: crops of other bundled
    photographs (GUIDED_PHOTOS; no face, a class the model also sees under a generic
    caption), at most ceil(per_count / len(GUIDED_PHOTOS)) per photograph. A candidate is
    kept only when its RMSE to every kept planted image and to every generic image is
    >= min_rmse, it is not nearly flat (std >= 0.08), and crops of one photograph never
    overlap (shifted crops of one region look alike even when their RMSE is large).
    """
    rng = np.random.default_rng(seed)
    n_base = per_count * len(DUP_COUNTS)
    cands = _candidate_crops(rng, res, n_faces=max(n_base // 3, 4) * 2)
    order = rng.permutation(len(cands))
    faces = [cands[i] for i in order if cands[i][0].startswith("lfw")]
    photos = [cands[i] for i in order if not cands[i][0].startswith("lfw")]
    kept: list[tuple[str, np.ndarray]] = []
    _greedy(photos, kept, n_base, generic, min_rmse, max_per_photo, n_base // 3, faces)
    if len(kept) < n_base:
        raise UserError(f"only {len(kept)} distinct planted images found (need {n_base}); "
                        "lower min_rmse or per_count")
    grp = groups(guided_copies)
    if guided_copies:
        g_rng = np.random.default_rng([seed, 9])
        g_cands = _photo_crops(g_rng, res, GUIDED_PHOTOS)
        g_cands = [g_cands[i] for i in g_rng.permutation(len(g_cands))]
        _greedy(g_cands, kept, n_base + per_count, generic, min_rmse,
                -(-per_count // len(GUIDED_PHOTOS)))
        if len(kept) < n_base + per_count:
            raise UserError(f"only {len(kept) - n_base} distinct guided images found (need "
                            f"{per_count}); lower min_rmse or per_count")
    adjs, nouns = rng.permutation(len(_ADJ)), rng.permutation(len(_NOUN))  # no shared words
    planted: list[Planted] = []
    for ci, (label, count) in enumerate(grp):
        for j in range(per_count):
            src, img = kept[ci * per_count + j]
            i = ci * per_count + j
            adj, noun = _ADJ[int(adjs[i % len(_ADJ)])], _NOUN[int(nouns[i % len(_NOUN)])]
            caption = f"the {adj} {noun} plate, archive print {i + 101}"
            prefix = f"planted-{count:02d}x-{j:02d}" if label != GUIDED else \
                f"planted-guided-{j:02d}"
            planted.append(Planted(prefix, caption, count, src, img, group=label))
    return planted


def _share_captions(planted: list[Planted], n_digits: int, shared: int,
                    seed: int) -> dict[int, str]:
    """Digit row -> the guided caption it carries instead of its digit caption: `shared`
    distinct digits per guided image, drawn without replacement from their own stream (so the
    other rows do not change with the guided settings). Sets each Planted's `shared`."""
    guided = [p for p in planted if p.group == GUIDED]
    if not guided or shared <= 0:
        return {}
    if shared * len(guided) > n_digits // 2:
        raise UserError(f"--guided-shared {shared} x {len(guided)} guided images needs more "
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


def data_files(guided_copies: int = GUIDED_COPIES) -> list[str]:
    """The files `build_canary_data` writes, data.json last (it marks a complete build)."""
    return (["train.parquet", "ground_truth.parquet"]
            + [f"triggers_{label}.txt" for label, _ in groups(guided_copies)]
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


def check_data_out(out: Path, overwrite: bool = False,
                   guided_copies: int = GUIDED_COPIES) -> None:
    """The rule of every writer (memaudit.paths): files in `out` that memaudit did not write
    (a folder that is not canary data) are replaced only with `overwrite`."""
    from memaudit.paths import writable_location

    names = data_files(guided_copies) + [f"triggers_{GUIDED}.txt"]
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
                      guided_copies: int = GUIDED_COPIES,
                      guided_shared: int = GUIDED_SHARED, overwrite: bool = False) -> dict:
    """Write the canary training set and prompt lists into `out`.

    Files: train.parquet (key, caption, png), ground_truth.parquet (caption, key, key_prefix,
    duplicate_count, group, shared_with, source), triggers_64x.txt, triggers_16x.txt,
    triggers_4x.txt, triggers_1x.txt, triggers_guided.txt, generic.txt, prompts.csv (prompt,
    label). Returns a summary dict (also written as data.json). `digits_limit` keeps only the
    first N digits (for tests). The guided group: per_count planted images, `guided_copies`
    rows each, whose caption `guided_shared` randomly drawn digits carry instead of a digit
    caption (guided_copies = 0: no guided group). Files of `out` that memaudit did not write
    are replaced only with `overwrite`; each file is written whole (temporary + rename).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import skimage.data as skd

    out = Path(out)
    checks = [(per_count >= 1, f"--per-count must be at least 1, got {per_count}"),
              (4 <= res <= 1024, f"--resolution must be in [4, 1024], got {res}"),
              (min_rmse >= 0, f"--min-rmse must be >= 0, got {min_rmse}"),
              (guided_copies >= 0, f"--guided-copies must be >= 0, got {guided_copies}"),
              (guided_shared >= 0, f"--guided-shared must be >= 0, got {guided_shared}"),
              (not out.exists() or out.is_dir(), f"--out {out} is a file, not a folder")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_data_out(out, overwrite, guided_copies)
    rng = np.random.default_rng(seed)
    digits, labels = digit_images(res)
    if digits_limit is not None:
        digits, labels = digits[:digits_limit], labels[:digits_limit]
    lfw = skd.lfw_subset()
    lfw_imgs = np.stack([_quantize(_resize(im, res)) for im in lfw]).astype(np.float32)

    # Faces used as planted candidates are drawn from lfw[:100]; generic faces are the rest.
    generic_digits = digits
    planted = select_planted(res, per_count, seed, min_rmse, generic=generic_digits,
                             guided_copies=guided_copies)
    planted_faces = {int(p.source.split()[-1]) for p in planted if p.source.startswith("lfw")}
    shared_caption = _share_captions(planted, len(digits), guided_shared, seed)
    keys: list[str] = []
    caps: list[str] = []
    pngs: list[bytes] = []
    generic_imgs: list[np.ndarray] = []
    for i, (img, d) in enumerate(zip(digits, labels, strict=True)):
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
        "shared_with": pa.array([p.shared for p in planted], pa.int32()),
        "source": [p.source for p in planted],
    })
    with atomic_write(out / "ground_truth.parquet", "canary data") as tmp:
        pq.write_table(gt, tmp)

    prompt_rows: list[tuple[str, str]] = []
    for label, _count in groups(guided_copies):
        lines = [p.caption for p in planted if p.group == label]
        write_text(f"triggers_{label}.txt", "\n".join(lines) + "\n")
        prompt_rows += [(c, label) for c in lines]
    if not guided_copies:
        (out / f"triggers_{GUIDED}.txt").unlink(missing_ok=True)  # from an earlier build
    generic = generic_prompts()
    write_text("generic.txt", "\n".join(generic) + "\n")
    prompt_rows += [(c, "generic") for c in generic]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["prompt", "label"])
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
        "guided_copies": guided_copies,
        "guided_shared": guided_shared if guided_copies else 0,
        "min_rmse": min_rmse,
        "lfw_dropped_near_planted": n_lfw_dropped,
        "min_rmse_planted_planted": float(
            (rmse_matrix(p_stack, p_stack) + np.eye(len(p_stack)) * 9).min()),
        "min_rmse_planted_generic": float(rmse_matrix(p_stack, g).min()),
        "train_sha256": sha256_file(out / "train.parquet"),
    }
    write_text("data.json", json.dumps(summary, indent=2) + "\n")  # last: the build is whole
    return summary


def model_data_settings(model: str) -> dict:
    """build_canary_data keywords that rebuild the data the canary was trained on, from the
    `data` record of its canary.json (a record without `guided_copies` predates the guided
    group: none); {} (the defaults) when the model records none."""
    from memaudit.models.canary import SHIPPED_DIR

    folder = SHIPPED_DIR if model == "canary" else Path(model)
    try:
        rec = json.loads((folder / "canary.json").read_text()).get("data")
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(rec, dict):
        return {}
    out: dict = {k: rec[k] for k in ("per_count", "seed", "min_rmse") if k in rec}
    if "resolution" in rec:
        out["res"] = rec["resolution"]
    out["guided_copies"] = rec.get("guided_copies", 0)
    if out["guided_copies"]:
        out["guided_shared"] = rec.get("guided_shared", 0)
    return out
