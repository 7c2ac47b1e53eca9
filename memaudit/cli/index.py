"""CLI: `memaudit index build|info|query|calibrate|import-clip-retrieval|bench` (thin layer)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

index_app = typer.Typer(help="Build, inspect and query training-set indexes.",
                        no_args_is_help=True)


@index_app.command("build")
def build(
    data: str = typer.Argument(None, help="Training set (Parquet, image folder, Hugging Face "
                               "imagefolder, tar shards; file, folder or glob) or a recipe "
                               ".toml"),
    embedder: str = typer.Option(None, "--embedder", "-e", help="pixels, sscd or clip"),
    out: Path = typer.Option(None, "--out", "-o", help="Index directory to create"),
    factory: str = typer.Option(None, "--factory", help="faiss factory string [Flat]"),
    weights: str = typer.Option(None, "--weights", help="sscd: TorchScript file (or URL)"),
    weights_sha256: str = typer.Option(None, "--weights-sha256", help="sscd: pinned SHA-256"),
    preprocessing: str = typer.Option(None, "--preprocessing",
                                      help="sscd: official (default) or somepalli"),
    size: str = typer.Option(None, "--size", help="pixels: comparison size N or HxW"),
    clip_model: str = typer.Option(None, "--clip-model", help="clip: open_clip model name"),
    pretrained: str = typer.Option(None, "--pretrained",
                                   help="clip: pretrained tag or checkpoint path"),
    image_col: str = typer.Option(None, "--image-col"),
    caption_col: str = typer.Option(None, "--caption-col", "--caption-column",
                                    help="caption column (imagefolder: default text)"),
    key_col: str = typer.Option(None, "--key-col"),
    dataset_config: str = typer.Option(None, "--dataset-config",
                                       help="a kohya-ss dataset config (TOML) as the training set"),
    layout: str = typer.Option(None, "--layout", help="training-set layout \\[detected]: parquet, "
                               "folder, imagefolder, webdataset, kohya, dreambooth"),
    instance_prompt: str = typer.Option(None, "--instance-prompt",
                                        help="DreamBooth: every image's caption"),
    class_prompt: str = typer.Option(None, "--class-prompt",
                                     help="DreamBooth: the class prompt (recorded)"),
    device: str = typer.Option(None, "--device", help="cuda or cpu \\[auto]"),
    batch_size: int = typer.Option(None, "--batch-size"),
    shard_rows: int = typer.Option(None, "--shard-rows", help="rows per resumable shard"),
    workers: int = typer.Option(None, "--workers", help="decoding threads"),
    calibrate: bool = typer.Option(None, "--calibrate/--no-calibrate",
                                   help="score a sample against the rest (METHODS 1.2)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing DIR"),
    faiss_params: str = typer.Option(None, "--faiss-params",
                                     help="search parameters kept in the manifest, e.g. "
                                     "nprobe=32 for IVF factories"),
    rerank: int = typer.Option(None, "--rerank", help="compressed factories (PQ, SQ): "
                               "candidates re-scored with the exact vectors [100]"),
    precision: str = typer.Option(None, "--precision", help="sscd, clip: fp32, mixed (fp16 on "
                                  "cuda, bf16 on cpu; channels-last), bf16 or fp16 \\[fp32]"),
    jpeg_device: str = typer.Option(None, "--jpeg-device", help="where JPEG rows are decoded: "
                                    "auto (the GPU when the embedder runs there), off (PIL), "
                                    "cpu or cuda (torchvision) \\[auto]"),
    engine: str = typer.Option("local", "--engine", help="local, or ray (memaudit\\[ray])"),
    address: str = typer.Option(None, "--address",
                                help="ray: auto or HOST:PORT of a running cluster "
                                "\\[a local instance]"),
    actors: int = typer.Option(None, "--actors",
                               help="ray: model replicas \\[one per GPU, else per CPU]"),
    memory_limit: str = typer.Option(None, "--memory-limit",
                                     help="peak memory of each stage, e.g. 4GB \\[half the RAM]"),
) -> None:
    """Build DIR/{index.faiss, items.parquet, manifest.json} from a training set or recipe."""
    from memaudit.common import UserError
    from memaudit.index import build_index, load_recipe

    kwargs: dict = {}
    if (data is None) == (dataset_config is None):
        raise UserError("give the training set (DATA or a recipe) or --dataset-config, not both")
    if dataset_config is not None:
        kwargs = {"source": dataset_config, "layout": "kohya"}
    elif data.endswith(".toml"):
        kwargs = load_recipe(data)
    else:
        kwargs["source"] = data
    opts = dict(kwargs.pop("embedder_opts", {}) or {})
    for k, v in {"weights": weights, "weights_sha256": weights_sha256,
                 "preprocessing": preprocessing, "size": size, "model": clip_model,
                 "pretrained": pretrained, "precision": precision}.items():
        if v is not None:
            opts[k] = v
    for k, v in {"embedder": embedder, "out": out, "factory": factory, "device": device,
                 "batch_size": batch_size, "shard_rows": shard_rows, "workers": workers,
                 "image_col": image_col, "caption_col": caption_col, "key_col": key_col,
                 "calibrate": calibrate, "faiss_params": faiss_params,
                 "rerank": rerank, "layout": layout, "instance_prompt": instance_prompt,
                 "class_prompt": class_prompt, "memory_limit": memory_limit,
                 "jpeg_device": jpeg_device}.items():
        if v is not None:
            kwargs[k] = v
    if overwrite:
        kwargs["overwrite"] = True
    if "embedder" not in kwargs:
        raise UserError("--embedder is required (pixels, sscd or clip)")
    if "out" not in kwargs:
        raise UserError("--out is required")
    path = build_index(embedder_opts=opts, engine=engine, address=address, actors=actors,
                       **kwargs)
    _print_summary(path)


def _print_summary(path: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from memaudit.index import TrainingIndex
    from memaudit.text import terminal_text

    s = TrainingIndex.open(path).summary()  # a manifest may come from anyone: shown as text
    t = Table(show_header=False, title=escape(terminal_text(path)))
    for k, v in s.items():
        t.add_row(k, escape(terminal_text(json.dumps(v) if isinstance(v, dict) else v)))
    Console().print(t)


@index_app.command("info")
def info(
    index_dir: Path = typer.Argument(..., help="Index directory"),
    as_json: bool = typer.Option(False, "--json", help="print the whole manifest as JSON"),
) -> None:
    """Print the manifest summary of an index."""
    from memaudit.index import TrainingIndex

    if as_json:
        print(json.dumps(TrainingIndex.open(index_dir).manifest, indent=2))
    else:
        _print_summary(index_dir)


@index_app.command("query")
def query(
    index_dir: Path = typer.Argument(..., help="Index directory"),
    images: list[Path] = typer.Argument(..., help="Image files"),
    k: int = typer.Option(5, "--k", help="neighbours per image"),
    device: str = typer.Option(None, "--device"),
    weights: str = typer.Option(None, "--weights", help="sscd: the TorchScript file the index "
                                "was built with (checked against its recorded SHA-256)"),
) -> None:
    """Print each image's nearest training items: key, caption, similarity, duplicates."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from memaudit.index.query import query_images
    from memaudit.text import terminal_text

    results = query_images(index_dir, images, k=k, device=device, weights=weights)
    console = Console()
    for image, rows in results:
        t = Table(title=escape(terminal_text(image)))
        kind = rows[0]["score_kind"] if rows else "similarity"
        for col in ("rank", "key", "caption", kind, "duplicates"):
            t.add_column(col)
        for r in rows:
            t.add_row(str(r["rank"]), escape(terminal_text(r["key"])),
                      escape(terminal_text(r["caption"][:80])),
                      f"{r['score']:.4f}", str(r["group_count"]))
        console.print(t)


@index_app.command("calibrate")
def calibrate(
    index_dir: Path = typer.Argument(..., help="Index directory"),
    sample: int = typer.Option(2000, "--sample", help="training items scored"),
    fpr: list[float] = typer.Option([0.01, 0.001], "--fpr", help="false-positive rates"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option(None, "--device",
                               help="checked only: calibration compares the stored vectors"),
) -> None:
    """Redo the null-distribution calibration (METHODS 1.2) and store it in the manifest."""
    from memaudit.common import UserError, resolve_device
    from memaudit.index import TrainingIndex, run_calibration

    try:
        from memaudit.criteria.calibrate import check_calibration_args
    except ImportError as err:
        raise UserError("calibration needs memaudit.criteria.calibrate, not installed") from err
    resolve_device(device)
    check_calibration_args(sample, fpr)
    idx = TrainingIndex.open(index_dir)
    # no embedder: the null scores compare the index's own vectors (no model runs)
    result = run_calibration(idx.path, None, sample=sample, fprs=tuple(fpr), seed=seed)
    print(json.dumps(result, indent=2))


@index_app.command("import-clip-retrieval")
def import_clip_retrieval_cmd(
    src: Path = typer.Argument(..., help="clip-retrieval output folder"),
    out: Path = typer.Option(..., "--out", "-o"),
    clip_model: str = typer.Option("ViT-B-32", "--clip-model",
                                   help="open_clip model the embeddings came from"),
    pretrained: str = typer.Option(None, "--pretrained", help="its pretrained tag"),
    factory: str = typer.Option("Flat", "--factory"),
    reuse_index: bool = typer.Option(True, "--reuse-index/--rebuild-index",
                                     help="use index/image.index when present"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Import clip-retrieval embeddings (img_emb/*.npy + metadata/*.parquet) as an index."""
    from memaudit.index import import_clip_retrieval

    path = import_clip_retrieval(src, out, clip_model=clip_model, clip_pretrained=pretrained,
                                 factory=factory, use_existing_index=reuse_index,
                                 overwrite=overwrite)
    _print_summary(path)


@index_app.command("bench")
def bench(
    rows: int = typer.Option(2000, "--rows", help="rows for the throughput benchmark"),
    batch_size: int = typer.Option(64, "--batch-size"),
    mem_rows: list[int] = typer.Option([10_000, 100_000], "--mem-rows",
                                       help="row counts for the peak-memory benchmark"),
    device: str = typer.Option(None, "--device"),
    skip_memory: bool = typer.Option(False, "--skip-memory"),
    skip_throughput: bool = typer.Option(False, "--skip-throughput"),
    repeat: int = typer.Option(3, "--repeat", help="alternate runs; best of each kept"),
) -> None:
    """Index-build benchmarks: throughput vs bare forward, peak memory vs row count."""
    from memaudit.index.bench import run_bench

    run_bench(rows=rows, batch_size=batch_size, mem_rows=tuple(mem_rows), device=device,
              memory=not skip_memory, throughput=not skip_throughput, repeat=repeat)


@index_app.command("bench-rerank")
def bench_rerank(
    n: int = typer.Option(100_000, "--n", help="synthetic training vectors"),
    queries: int = typer.Option(2000, "--queries", help="half near-copies, half fresh"),
    train_sample: int = typer.Option(25_000, "--train-sample",
                                     help="vectors the IVF-PQ is trained on"),
) -> None:
    """Compressed index + exact re-ranking vs Flat: recall@1 and copy verdicts (sscd, nl2)."""
    from memaudit.index.bench_rerank import run_bench_rerank

    run_bench_rerank(n=n, queries=queries, train_sample=train_sample)


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
