"""memaudit.quality: KID and FD against hand computations, feature spaces (a tiny random
Inception-v3 and a tiny open_clip model saved to files and loaded back the way a user names
them), and the reference sample read from a real index's recorded sources only."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from audit_fixtures import make_training_parquet
from scipy import linalg

from memaudit.common import UserError
from memaudit.quality import (
    DigitFeatures,
    EmbedderFeatures,
    fd,
    images_to_tensor,
    kid,
    reference_sample,
    resolve_spaces,
)


def _mmd_cubic(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018, Eq. 4)."""
    d = a.shape[1]

    def k(x, y):
        return (x @ y.T / d + 1) ** 3

    m = len(a)
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_fd_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 5))
    b = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5)) + 0.7
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
    assert fd(a, b) == pytest.approx(want, rel=1e-8)
    assert fd(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="dims differ"):
        fd(a, b[:, :4])


def test_kid_is_the_unbiased_cubic_mmd():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 6)), rng.normal(size=(20, 6)) + 0.5
    # subsets of the whole set are the set itself: the mean is the plain estimate, std 0
    mean, std = kid(a, b, subset_size=20, subsets=5)
    assert mean == pytest.approx(_mmd_cubic(a, b), rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    # default subsets (half the smaller set) are seeded: same seed, same figures
    assert kid(a, b, seed=3) == kid(a, b, seed=3)
    assert kid(a, b, seed=3)[1] > 0
    # same distribution ~0 within its spread; a shifted one far above it
    c, d = rng.normal(size=(300, 6)), rng.normal(size=(300, 6))
    same, same_std = kid(c, d)
    shifted, _ = kid(c, d + 1.0)
    assert abs(same) < 2 * same_std and shifted > 20 * same_std
    with pytest.raises(ValueError, match="subset_size"):
        kid(a, b, subset_size=21)


@pytest.fixture(scope="module")
def pixel_index(tmp_path_factory):
    from memaudit.index import TrainingIndex, build_index

    tmp = tmp_path_factory.mktemp("qidx")
    src = make_training_parquet(tmp / "train.parquet")
    return TrainingIndex.open(build_index(src, "pixels", tmp / "idx"))


def test_reference_sample_reads_the_recorded_rows(pixel_index):
    from memaudit.data.parquet import decode_image, iter_training_rows

    ref = reference_sample(pixel_index, 10, seed=4)
    again = reference_sample(pixel_index, 10, seed=4)
    assert np.array_equal(ref.rows, again.rows) and list(ref.rows) == sorted(ref.rows)
    assert ref.describe() == {"n": 10, "requested": 10, "seed": 4, "skipped": 0}
    assert not np.array_equal(ref.rows, reference_sample(pixel_index, 10, seed=5).rows)
    src = pixel_index.manifest["source"]["paths"][0]
    by_row = {r.source_row: r.image_bytes for r in iter_training_rows(src)}
    items = pixel_index.items.take(pa.array(ref.rows)).to_pylist()
    x = ref.tensor((16, 16))
    for i, item in enumerate(items):
        want = np.asarray(decode_image(by_row[item["source_row"]])[0], np.float32) / 255
        np.testing.assert_array_equal(x[i].permute(1, 2, 0).numpy(), want)
    # asking for more than the index holds draws every item once
    assert reference_sample(pixel_index, 10_000).describe()["n"] == pixel_index.nitems


def test_reference_sample_reads_only_the_index_sources(pixel_index, tmp_path):
    from memaudit.index import TrainingIndex

    other = make_training_parquet(tmp_path / "elsewhere" / "other.parquet")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in ("index.faiss", "manifest.json"):
        (tampered / name).write_bytes((pixel_index.path / name).read_bytes())
    items = pixel_index.items.to_pydict()
    items["source_file"] = [str(other)] * len(items["source_file"])
    pq.write_table(pa.table(items), tampered / "items.parquet")
    with pytest.raises(UserError, match="not one of the index's recorded sources"):
        reference_sample(TrainingIndex.open(tampered), 5)
    # the recorded source itself missing: one clear line
    man = json.loads((pixel_index.path / "manifest.json").read_text())
    man["source"]["paths"] = [str(tmp_path / "gone" / "train.parquet")]
    (tampered / "manifest.json").write_text(json.dumps(man))
    pq.write_table(pixel_index.items, tampered / "items.parquet")
    with pytest.raises(UserError, match="not found"):
        reference_sample(TrainingIndex.open(tampered), 5)


def test_images_to_tensor_resizes_short_side_and_centre_crops():
    from PIL import Image

    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 5:35] = 255  # a white band over the middle 30 of 40 columns
    x = images_to_tensor([Image.fromarray(a)], (10, 10))
    assert x.shape == (1, 3, 10, 10)
    assert x.min() >= 0.99  # the centre crop is all band


def test_index_and_digit_feature_spaces(pixel_index):
    x = torch.rand(5, 3, 16, 16)
    pix = EmbedderFeatures(pixel_index.embedder)
    np.testing.assert_allclose(pix.features(x), x.reshape(5, -1).double().numpy(), atol=1e-6)
    assert pix.name.startswith("pixels:") and pix.dim == 768
    dig = DigitFeatures()
    np.testing.assert_allclose(dig.features(x), dig.clf.logits(x) / dig.scale, rtol=1e-6)
    assert dig.name == "digits-logits-16px" and 1.0 < dig.scale < 10.0


class _Emb:
    def __init__(self, name):
        self.name, self.dim, self.preprocessing = name, 4, "p"


class _Idx:
    def __init__(self, name):
        self.manifest = {"embedder": {"name": name}}
        self.embedder = _Emb(name)


def test_auto_feature_space_order():
    names = [s.name for s in resolve_spaces(["auto"], index=_Idx("sscd"), is_canary=True)]
    assert names == ["sscd:p"]  # the index's semantic descriptor beats the digit classifier
    assert [s.name for s in resolve_spaces(["auto"], index=_Idx("pixels"), is_canary=True)
            ] == ["digits-logits-16px"]
    assert [s.name for s in resolve_spaces(["auto", "index"], index=_Idx("pixels"))
            ] == ["pixels:p"]  # no repeats
    with pytest.raises(UserError, match="needs the weights file"):
        resolve_spaces(["inception"], index=_Idx("sscd"))
    with pytest.raises(UserError, match="not found"):
        resolve_spaces(["auto"], index=_Idx("sscd"), inception="/nonexistent/incep.pth")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised FID Inception-v3 (torch-fidelity's class) saved as a state
    dict, as a user's downloaded weights file would be."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    cls = fe.FeatureExtractorInceptionV3
    orig_url, orig_load = fe.load_state_dict_from_url, cls.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: {}
    cls.load_state_dict = lambda self, sd, *a, **k: None
    try:
        torch.manual_seed(0)
        net = cls("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url, cls.load_state_dict = orig_url, orig_load
    for m in net.modules():  # running stats that keep activations in range
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(1.0)
    path = tmp_path_factory.mktemp("incep") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_inception_features_from_a_named_file(inception_file, tmp_path, monkeypatch):
    from memaudit.common import sha256_file
    from memaudit.quality import InceptionFeatures, features

    path, net = inception_file
    sp = InceptionFeatures(path)
    x = torch.rand(3, 3, 16, 16)
    got = sp.features(x)
    with torch.no_grad():
        want = net((x * 255).round().to(torch.uint8))[0].double().numpy()
    assert got.shape == (3, 2048)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    sha = sha256_file(path)
    assert sp.name == f"inception-v3@{sha[:12]}" and sp.describe()["sha256"] == sha
    assert not sp.describe()["fid_reference_weights"]
    monkeypatch.setattr(features, "FID_INCEPTION_SHA256", sha)
    assert InceptionFeatures(path, sha256=sha).name == "fid-inception-v3"
    with pytest.raises(UserError, match="expected"):
        InceptionFeatures(path, sha256="0" * 64)
    # a pickle that would run code is refused before anything unpickles it fully
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UserError, match="as plain tensors"):
        InceptionFeatures(evil)
    torch.save({"w": torch.zeros(2)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not an FID Inception"):
        InceptionFeatures(tmp_path / "wrong.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    """A tiny random open_clip model (JSON config) saved as a local checkpoint file."""
    import open_clip
    from test_criteria_clip import TINY

    tmp = tmp_path_factory.mktemp("qclip")
    cfg = tmp / "memaudit-quality-tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(1)
    model = open_clip.create_model("memaudit-quality-tiny-clip")
    torch.save(model.state_dict(), tmp / "tiny-clip.pt")
    return tmp / "tiny-clip.pt", cfg


def test_clip_score_from_a_local_checkpoint(clip_checkpoint):
    from memaudit.quality.clipscore import ClipScorer

    ckpt, cfg = clip_checkpoint
    sc = ClipScorer("memaudit-quality-tiny-clip", ckpt, cfg)
    x = torch.rand(3, 3, 16, 16)
    prompts = ["a digit 3", "a grey photo", "a face"]
    got = sc.score(x, prompts)
    emb = sc.embedder
    state = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in emb.model.state_dict().items())
    with torch.no_grad():
        f_img = emb.embed_tensor(x).double()
        f_txt = torch.from_numpy(emb.embed_text(prompts)).double()
    want = 100 * torch.nn.functional.cosine_similarity(f_img, f_txt).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert sc.name.startswith("clip-score:memaudit-quality-tiny-clip@")
    with pytest.raises(UserError, match="local checkpoint"):
        ClipScorer("ViT-B-32", "openai")  # a tag would download: refused


def test_plan_quality_table(tmp_path):
    from memaudit.audit.quality import QualitySpec, quality_from_plan

    assert quality_from_plan(None, tmp_path) == QualitySpec()  # on by default
    assert quality_from_plan(False, tmp_path) is None
    q = quality_from_plan({"features": "index", "reference": 50, "seed": 3,
                           "inception": "w/incep.pth", "clip_model": "ViT-B-32",
                           "clip_pretrained": "c.bin"}, tmp_path)
    assert q.features == ["index"] and q.reference == 50 and q.seed == 3
    assert q.inception == str(tmp_path / "w" / "incep.pth")
    assert q.clip_pretrained == str(tmp_path / "c.bin")
    for bad, msg in (({"feature": "auto"}, "unknown .quality. key"),
                     ({"features": ["auto", "fid"]}, "features must be"),
                     ({"reference": 1}, "reference must be an integer >= 2"),
                     ({"reference": "500"}, "reference must be"),
                     ({"kid_subset_size": 1}, "kid_subset_size"),
                     ({"inception_sha256": "abc"}, "64 hex"),
                     ({"clip_model": "ViT-B-32"}, "go together"),
                     ("yes", "must be a .quality. table")):
        with pytest.raises(UserError, match=msg):
            quality_from_plan(bad, tmp_path)


def test_audit_records_quality_and_clip_score(tmp_path, clip_checkpoint):
    """A real index and the real quality stage over the copying stand-in sampler: quality rows
    in two feature spaces per method, a CLIP score on every generation."""
    from audit_fixtures import copying_sample, make_tiny_canary, write_plan

    from memaudit.audit import default_components, load_plan, run_audit
    from memaudit.quality.clipscore import ClipScorer
    from memaudit.quality.reference import load_pngs
    from memaudit.store import AuditStore

    ckpt, cfg = clip_checkpoint
    src = make_training_parquet(tmp_path / "train.parquet")
    canary = make_tiny_canary(tmp_path / "canary")
    extra = (f'[quality]\nfeatures = ["digits", "index"]\nreference = 12\nseed = 1\n'
             f'clip_model = "memaudit-quality-tiny-clip"\nclip_pretrained = "{ckpt}"\n'
             f'clip_model_config = "{cfg}"\n')
    plan = load_plan(write_plan(tmp_path, src, str(canary), criteria=("nl2",), screen=False,
                                extra=extra))
    comp = default_components()
    comp.sample = copying_sample
    res = run_audit(plan, components=comp, device="cpu")
    with AuditStore(res.db_path, read_only=True) as s:
        q = s.query("SELECT * FROM method_quality ORDER BY method, features")
        gens = s.query("SELECT g.method, g.image_path, g.clip_score, p.text FROM generations g "
                       "JOIN prompts p ON p.id = g.prompt_id ORDER BY g.id")
        cost = {r["method"]: r for r in s.query("SELECT * FROM method_cost")}
        settings = json.loads(s.run()["settings_json"])["quality"]
    assert [(r["method"], r["features"]) for r in q] == [
        ("cfg", "digits-logits-16px"), ("cfg", "pixels:resize-bicubic-16x16-rgb01"),
        ("static", "digits-logits-16px"), ("static", "pixels:resize-bicubic-16x16-rgb01")]
    assert all(r["n"] == 8 and r["n_reference"] == 12 and r["reference_seed"] == 1 for r in q)
    # the stored figures are those of the stored images against the recorded sample
    ref = reference_sample(plan_index(res.db_path), 12, seed=1)
    assert settings["reference"]["n"] == 12
    pix = EmbedderFeatures(plan_index(res.db_path).embedder)
    gen = pix.features(load_pngs([res.db_path.parent / g["image_path"] for g in gens
                                  if g["method"] == "static"]))
    want_fd = fd(gen, pix.features(ref.tensor((16, 16))))
    got = next(r for r in q if r["method"] == "static" and r["features"].startswith("pixels"))
    assert got["fd"] == pytest.approx(want_fd, rel=1e-9)
    assert got["fd_ratio_to_cfg"] == pytest.approx(got["fd"] / got["cfg_fd"])
    # CLIP score on every generation, of the image against the prompt as written
    assert all(g["clip_score"] is not None for g in gens)
    sc = ClipScorer("memaudit-quality-tiny-clip", ckpt, cfg)
    first = [g for g in gens if g["method"] == "cfg"][:2]
    x = load_pngs([res.db_path.parent / g["image_path"] for g in first])
    np.testing.assert_allclose([g["clip_score"] for g in first],
                               sc.score(x, [g["text"] for g in first]), atol=0.5)
    assert cost["static"]["clip_score"] == pytest.approx(
        np.mean([g["clip_score"] for g in gens if g["method"] == "static"]))
    assert settings["clip_score"]["sha256"] == sc.sha256


def plan_index(db):
    from memaudit.index import TrainingIndex

    return TrainingIndex.open(db.parent / "index")


def test_audit_cli_quality_options_are_checked_before_any_work(tmp_path):
    import subprocess
    import sys

    from audit_fixtures import make_training_parquet, write_plan

    src = make_training_parquet(tmp_path / "train.parquet")  # a valid plan: only the options fail
    plan = write_plan(tmp_path, src, "canary")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "memaudit", "audit", str(plan), *args],
                              capture_output=True, text=True)

    p = cli("--clip-model", "ViT-B-32")
    assert p.returncode == 2 and "go together" in p.stderr and "Traceback" not in p.stderr
    plan.write_text(plan.read_text().replace('alignment = "none"',
                                             'alignment = "none"\nquality = false'))
    p = cli("--inception", "incep.pth")
    assert p.returncode == 2 and "quality = false" in p.stderr
    assert not (tmp_path / "out").exists()
