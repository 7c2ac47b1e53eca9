"""Planted images of the canary (DESIGN.md "The built-in canary"): the bundled photographs and
faces they are cropped from, their trigger captions, the image helpers (PNG round trip, resize,
RMSE) and the greedy selection that keeps every planted image distinct from every other and
from every generic image (pixel RMSE at the training resolution), so attribution of a copy to
its planted image by the nearest training image is exact.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from memaudit.common import UserError

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "horse", "moon", "rocket",
          "text", "page", "brick", "hubble_deep_field")
#: Photographs of the shared-caption group (none of them in PHOTOS; "motorcycle" is the left view of
#: stereo_motorcycle).
SHARED_PHOTOS = ("clock", "retina", "immunohistochemistry", "colorwheel", "motorcycle", "cell")
DUP_COUNTS = (64, 16, 4, 1)
#: The label of planted images reproduced only with guidance, measured by `canary evaluate`
#: (issue 17); SHARED: the retired shared-caption construction of issue 8 (off by default).
GUIDED = "guided"
SHARED = "shared"
#: Groups in selection order: (label, copies of the planted image).
SHARED_COPIES = 0
SHARED_DIGITS = 96
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
    group: str = ""  # "64x", "16x", "4x", "1x" or "shared"
    shared: int = 0  # ordinary (digit) rows that carry the same caption


def groups(shared_copies: int = SHARED_COPIES,
           extra_counts: tuple[int, ...] = ()) -> list[tuple[str, int]]:
    """(label, copies) of every planted group, in selection order: DUP_COUNTS, then the
    `extra_counts` groups, then the shared-caption group, so adding a later group never
    changes the images and captions of an earlier one."""
    return ([(f"{c}x", c) for c in (*DUP_COUNTS, *extra_counts)]
            + ([(SHARED, shared_copies)] if shared_copies else []))


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
                   shared_copies: int = SHARED_COPIES,
                   extra_counts: tuple[int, ...] = ()) -> list[Planted]:
    """Choose per_count distinct images for each group of `groups(shared_copies,
    extra_counts)`.

    The duplicated groups (64x ... 1x): greedy over shuffled candidates (photo crops and
    faces, alternating so every count mixes both); the `extra_counts` groups (e.g. 2x)
    continue the same stream afterwards. The shared-caption group, chosen afterwards from
    its own random stream so the other groups never depend on it: crops of other bundled
    photographs (SHARED_PHOTOS; no face, a class the model also sees under a generic
    caption), at most ceil(per_count / len(SHARED_PHOTOS)) per photograph. A candidate is
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
    if extra_counts:
        n_base += per_count * len(extra_counts)
        _greedy(photos, kept, n_base, generic, min_rmse, max_per_photo, n_base // 3, faces)
    if len(kept) < n_base:
        raise UserError(f"only {len(kept)} distinct planted images found (need {n_base}); "
                        "lower min_rmse or per_count")
    grp = groups(shared_copies, extra_counts)
    if shared_copies:
        g_rng = np.random.default_rng([seed, 9])
        g_cands = _photo_crops(g_rng, res, SHARED_PHOTOS)
        g_cands = [g_cands[i] for i in g_rng.permutation(len(g_cands))]
        _greedy(g_cands, kept, n_base + per_count, generic, min_rmse,
                -(-per_count // len(SHARED_PHOTOS)))
        if len(kept) < n_base + per_count:
            raise UserError(f"only {len(kept) - n_base} distinct shared-caption images found (need "
                            f"{per_count}); lower min_rmse or per_count")
    adjs, nouns = rng.permutation(len(_ADJ)), rng.permutation(len(_NOUN))  # no shared words
    planted: list[Planted] = []
    for ci, (label, count) in enumerate(grp):
        for j in range(per_count):
            src, img = kept[ci * per_count + j]
            i = ci * per_count + j
            adj, noun = _ADJ[int(adjs[i % len(_ADJ)])], _NOUN[int(nouns[i % len(_NOUN)])]
            caption = f"the {adj} {noun} plate, archive print {i + 101}"
            prefix = f"planted-{count:02d}x-{j:02d}" if label != SHARED else \
                f"planted-shared-{j:02d}"
            planted.append(Planted(prefix, caption, count, src, img, group=label))
    return planted
