"""The prepared GPU benchmark in its smoke mode (toy sizes on the CPU): every section runs and
writes its table and JSON (issue 21; the real run: docs/benchmarks.md, "GPU")."""

from __future__ import annotations

import json

from memaudit.bench.gpu import main


def test_gpu_bench_smoke_runs_every_section_on_the_cpu(tmp_path):
    res = main([str(tmp_path), "--smoke", "--device", "cpu", "--repeats", "1"])
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    table = (tmp_path / "gpu_bench.md").read_text()
    assert saved["smoke"] and saved["device"] == "cpu" and not saved["skipped"]
    assert [a["arch"] for a in res["amg"]] == ["sd15", "sdxl", "sd3"]
    # the GPU run's denoiser dtypes (the check in fp32), not fp32 throughout
    assert [a["dtype"] for a in res["amg"]] == ["torch.float16", "torch.float16",
                                                "torch.bfloat16"]
    for a in res["amg"]:
        for key in ("amg", "amg-quiet", "amg[tiny]", "amg-quiet[tiny-desc]"):
            assert a["ratios"][key] > 1.0, (a["arch"], key)
        assert a["ratios"]["cfg"] == 1.0
    s = res["sscd"]
    assert s["bare_fp32_rows_per_s"] > 0 and s["build_mixed_pil_rows_per_s"] > 0
    assert res["tests"]["returncode"] == 0, res["tests"]
    assert table.count("| sd3 64 px, AMG / cfg") == 4 and "SSCD index build, mixed" in table
