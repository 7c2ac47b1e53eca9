"""The built-in canary model (DESIGN.md "The built-in canary"; docs/canary.md).

data.build_canary_data (training Parquet + trigger lists), train.train_canary (trainer),
model (network, frozen MiniLM text encoder), digits (alignment classifier), evaluate
(proof of memorization). The adapter is memaudit.models.canary.CanaryDenoiser; the shipped
weights live in weights/.
"""
