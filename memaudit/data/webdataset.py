"""webdataset tar shards (img2dataset's `webdataset` output: `00000.tar` with `N.jpg`,
`N.txt`, `N.json`), read as a stream of tar members, never unpacked.

A sample is a run of consecutive members sharing a key (the member path up to the first
dot of its file name); its image is the first member with an image extension (`jpg`,
`png`, `webp`...), its caption the `txt` member, else the `json` member's `caption`, else "".
The key is the sample key (img2dataset's are unique across shards); source_row is the
sample's number in its tar. Shards: a `.tar` file, every `*.tar` below a folder (sorted) or
a glob. Rows are counted from the tar headers alone (the data of skipped members is seeked
over, not read). A tar cut short loses the samples after the cut; the sample being read when
the file ends (inside its data, or without the end-of-archive blocks after it) is skipped as
`truncated`. Compressed tars are not read.
"""

from __future__ import annotations

import glob as _glob
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memaudit.common import UserError
from memaudit.data.base import Layout
from memaudit.data.images import IMAGE_SUFFIXES
from memaudit.data.parquet import TrainingRow

IMAGE_EXTS = frozenset(s[1:] for s in IMAGE_SUFFIXES)


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: `a/b/0001.seg.png` -> (`a/b/0001`, `seg.png`)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def samples(path: Path, first: int = 0,
            stop: int | None = None) -> Iterator[tuple[int, str, dict[str, bytes], str | None]]:
    """(sample number, key, {extension: data}, skip reason) for each sample of one tar;
    data is read only for samples in [first, stop) (the others come with {}). The sample
    during which the file ends early comes last, with reason "truncated"."""
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot read tar file {path}: {e}") from e
    n, key, members = -1, None, {}
    with tf:
        try:
            while True:
                m = tf.next()
                if m is None:
                    break
                if not m.isfile():
                    continue
                k, ext = split_name(m.name)
                if k != key:
                    if key is not None:
                        yield n, key, members, None
                    n, key, members = n + 1, k, {}
                    if stop is not None and n >= stop:
                        return
                if first <= n and ext and ext not in members:
                    f = tf.extractfile(m)
                    members[ext] = f.read() if f is not None else b""
            complete = _ended_cleanly(tf)
        except (tarfile.TarError, EOFError, OSError):
            complete = False
        if key is not None:
            yield n, key, members, None if complete else "truncated"


def _ended_cleanly(tf: tarfile.TarFile) -> bool:
    """Whether the archive has its end-of-archive (zero) block after the last member."""
    f = tf.fileobj
    assert f is not None
    f.seek(tf.offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def sample_row(members: dict[str, bytes]) -> tuple[bytes | None, str]:
    """(image bytes, caption) of one sample's members."""
    image = next((v for e, v in members.items() if e in IMAGE_EXTS), None)
    if "txt" in members:
        return image, members["txt"].decode("utf-8", errors="replace").strip()
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict) and meta.get("caption") is not None:
            return image, str(meta["caption"]).strip()
    return image, ""


class WebDatasetLayout(Layout):
    name = "webdataset"

    @classmethod
    def detect(cls, path: Path, opts: dict[str, Any]) -> bool:
        if path.is_file():
            return path.suffix == ".tar"
        return path.is_dir() and any(p.is_file() for p in path.rglob("*.tar"))

    def units(self) -> list[Path]:
        text, p = self.source, Path(self.source)
        if any(ch in text for ch in "*?["):
            found = [Path(f) for f in _glob.glob(text, recursive=True) if f.endswith(".tar")]
        elif p.is_dir():
            found = [f for f in p.rglob("*.tar") if f.is_file()]
        else:
            found = [p] if p.is_file() else []
        if not found:
            raise UserError(f"no tar shards in {text}")
        return sorted(f.resolve() for f in found)

    def unit_rows(self, units: list[Path]) -> list[int]:
        return [sum(1 for _ in samples(u, first=1 << 62)) for u in units]

    def iter_unit(self, i: int, unit: Path, first: int, stop: int,
                  row0: int) -> Iterator[TrainingRow]:
        for n, key, members, reason in samples(unit, first, stop):
            if n < first:
                continue
            image, caption = sample_row(members)
            if reason is None and image is None:
                reason = "no_image"
            yield TrainingRow(key=key, caption=caption,
                              image_bytes=None if reason else image, source_file=str(unit),
                              source_row=n, row=row0 + n, skip=reason)

    @staticmethod
    def read_images(unit: Path, rows: list[int]) -> dict[int, bytes]:
        wanted = {int(r) for r in rows}
        if not wanted:
            return {}
        out = {}
        for n, _, members, reason in samples(Path(unit), min(wanted), max(wanted) + 1):
            image, _ = sample_row(members)
            if n in wanted and image and reason is None:
                out[n] = image
        return out
