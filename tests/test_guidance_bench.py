"""The canary bench end to end on a tiny real pixel index and a fake 16x16 denoiser."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from test_screen import SchedFake

from memaudit.guidance import bench


class Fake16(SchedFake):
    latent_shape = (1, 16, 16)
    default_steps = 4

    def __init__(self):
        super().__init__()
        self.P = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))

    def _eps(self, x_t, t, cond):
        return 0.5 * x_t + torch.tanh(cond.emb.mean(1) @ self.P).view(-1, 1, 16, 16)


def _png(a):
    buf = io.BytesIO()
    Image.fromarray((a * 255).astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def test_bench_runs_end_to_end(tmp_path, monkeypatch):
    import memaudit.models.base as base
    from memaudit.index.build import build_index

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    caps, groups = [], {}
    for g, n in (("64x", 3), ("16x", 2), ("4x", 1), ("1x", 1)):
        groups[g] = f"the {g} plate, archive print"
        caps += [groups[g]] * n
    caps += [f"a handwritten digit {d}" for d in range(6)]
    imgs = {c: rng.random((16, 16)) for c in set(caps)}
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(len(caps))], "caption": caps,
                             "png": [_png(imgs[c]) for c in caps]}), data / "train.parquet")
    for g, c in groups.items():
        (data / f"triggers_{g}.txt").write_text(c + "\n")
    (data / "generic.txt").write_text("\n".join(f"a handwritten digit {d}" for d in range(6)))
    index = build_index(data / "train.parquet", "pixels", tmp_path / "index")
    monkeypatch.setattr(base, "load_model", lambda spec, device=None: Fake16())
    work = tmp_path / "work"
    res = bench.main(["--work", str(work), "--data", str(data), "--index", str(index),
                      "--seeds", "2", "--per-group", "2", "--steps", "4",
                      "--methods", "cfg,dynamic,amg:sim,wen", "--screen-seeds", "2",
                      "--param", "amg.c3=5", "--tune", "--tune-seeds", "1",
                      "--tune-min-steps", "2,3", "--tune-c3", "1,5"])
    saved = json.loads((work / "bench.json").read_text())
    assert [r["method"] for r in saved["methods"]] == ["cfg", "dynamic", "amg:sim", "wen"]
    cfg, dyn, amg, wen = res["methods"]
    assert cfg["unet_rows"] == 8 and dyn["unet_rows"] == 8 and wen["unet_rows"] > 8
    assert cfg["images"] == 2 * (1 + 1 + 1 + 1 + 2)
    assert amg["params"] == {"c3": 5.0}  # an explicit --param wins over the tuned value
    tuned = saved["tuning"]
    assert [c["min_step"] for c in tuned["dynamic"]] == [2, 3]
    assert [c["c3"] for c in tuned["amg"]] == [1.0, 5.0]
    # the documented rule (bench.tune): lowest 64x+16x copy rate among candidates keeping
    # >= 0.9x cfg's digit agreement, ties to the smaller value
    floor = 0.9 * (tuned["cfg"]["agreement"] or 0.0)
    for key, method in (("min_step", "dynamic"), ("c3", "amg")):
        ok = [c for c in tuned[method] if c["agreement"] is None or c["agreement"] >= floor]
        fallback = tuned[method][-1 if method == "dynamic" else 0][key]  # none kept agreement
        want = min(ok, key=lambda c: (c["trigger_copy"], c[key]))[key] if ok else fallback
        assert tuned[f"best_{key}"] == want, (key, tuned[method])
    assert saved["params"]["dynamic"] == {"min_step": tuned["best_min_step"]}
    assert set(amg["amg_share"]) == {"amg_spe", "amg_dup", "amg_sim", "fired"}
    assert amg["amg_share"]["amg_spe"]["generic"] == 0.0  # the part is switched off
    assert "trigger_64_16_mean" in dyn["switch_step"]
    sc = res["screening"][0]
    assert sc["unet_rows_per_prompt"] == 4 and sc["ratio_vs_one_image"] == 2.0
    md = (work / "bench.md").read_text()
    assert "| amg:sim |" in md and "screening steps=1 seeds=2" in md
    tm = bench.main(["--work", str(work), "--data", str(data), "--index", str(index),
                     "--seeds", "1", "--per-group", "1", "--steps", "2", "--methods",
                     "cfg,static", "--timing-only", "2"])["timing"]
    assert set(tm) == {"cfg", "static"} and tm["cfg"]["ratio_to_cfg"] == 1.0
    assert json.loads((work / "timing.json").read_text()) == tm
