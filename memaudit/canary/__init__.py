"""The built-in canary model (DESIGN.md "The built-in canary"; docs/canary.md).

data.build_canary_data (training Parquet + trigger lists), train.train_canary (trainer),
model (network, frozen MiniLM text encoder), digits (alignment classifier), evaluate
(proof of memorization). The adapter is memaudit.models.canary.CanaryDenoiser; the shipped
weights live in weights/.
"""

#: How canaries trained here are sampled (canary.json "sampling"): DDIM without clipping the
#: predicted x0 to [-1, 1], which broke every output above CFG scale 2 (docs/canary.md).
SAMPLING = {"clip_sample": False}

#: Defaults of `train_canary` and `memaudit canary train`: the recipe of the shipped weights.
RECIPE = {"steps": 3000, "batch_size": 64, "lr": 1e-3, "cond_dropout": 0.1,
          "ema_decay": 0.999, "warmup": 200}
