"""The canary adapter: the built-in pixel-space model as a `Denoiser` (DESIGN.md, "The built-in
canary"; memaudit/canary/model.py for the network).

x_t lives in pixel space, [1, 16, 16] grey in [-1, 1] for the shipped model; `decode` maps
to [0, 1] and repeats the grey channel to RGB. Conditions are frozen all-MiniLM-L6-v2 token
states through the trained projection; the null embedding is that of "".
"""

from __future__ import annotations

from pathlib import Path

import torch

from memaudit.common import UserError, sha256_file
from memaudit.models.base import Denoiser
from memaudit.models.cond import Cond
from memaudit.models.prediction import EpsPrediction

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "canary" / "weights"

#: Screening parameters of a canary whose canary.json has no `screen_params` entry: those
#: tuned on the previous shipped canary (`python -m memaudit.screen.bench`: t_low and g2 on
#: seeds 1000-1003 of its labelled prompts). The shipped canary records its own in canary.json
#: (docs/mitigations.md "Screening scores").
CANARY_SCREEN_PARAMS = {"anisotropy": {"g2": 0.5, "low_index": -10}}


class CanaryDenoiser(Denoiser):
    """The canary model. Use `CanaryDenoiser.load(path_or_None, device)`."""

    is_latent = False
    default_steps = 50
    family = "canary"

    def __init__(self, net, info: dict, name: str, model_hash: str,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        from memaudit.canary.model import TextEncoder

        self.net = net.requires_grad_(False).eval()
        self.info = info
        self.cfg = net.cfg
        self.name = name
        self.model_hash = model_hash
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.net.to(self.dtype)
        self.latent_shape = (self.cfg.channels, self.cfg.resolution, self.cfg.resolution)
        self.default_guidance_scale = float(info.get("default_guidance_scale", 2.0))
        self.default_steps = int(info.get("default_steps", 50))
        self.screen_params = dict(info.get("screen_params", CANARY_SCREEN_PARAMS))
        from memaudit.canary.data import generic_prompts

        self.generic_prompts = tuple(generic_prompts())  # calibrates reanchor's trigger
        self.text = TextEncoder(self.cfg.text_len, device=self.device)
        self._states: dict[str, torch.Tensor] = {}
        self.prediction = EpsPrediction(self.make_scheduler("ddim").alphas_cumprod)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> CanaryDenoiser:
        """Load a canary folder (canary.json + canary.safetensors); None = the shipped model.
        dtype: the network's (default float32; the text encoder stays float32)."""
        from memaudit.canary.model import WEIGHTS_FILE, load_canary

        folder = SHIPPED_DIR if path is None else Path(path)
        if path is None and not (folder / WEIGHTS_FILE).exists():
            raise UserError(f"the shipped canary weights are missing from {folder}")
        net, info = load_canary(folder, device=device)
        name = "canary" if path is None else str(folder)
        return cls(net, info, name=name, model_hash=sha256_file(folder / WEIGHTS_FILE),
                   device=device, dtype=dtype)

    @torch.no_grad()
    def _text_states(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._states]
        if missing:
            for p, s in zip(missing, self.text.states(missing), strict=True):
                self._states[p] = s
        return torch.stack([self._states[p] for p in prompts]).to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """MiniLM token states (pads zeroed) -> trained projection: emb [B, text_len, 64]."""
        states = self._text_states(list(prompts)).to(self.dtype)
        return Cond(emb=self.net.embed(states))

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.net.eps(x_t.to(self.dtype), t, cond.emb.to(self.dtype)).float()

    def attention_model(self) -> torch.nn.Module:
        return self.net.unet

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """[-1, 1] grey -> [0, 1] RGB (grey repeated); differentiable."""
        img = (x0.float() / 2 + 0.5).clamp(0, 1)
        return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img

    def make_scheduler(self, kind: str = "ddim"):
        """DDIM or DPM-Solver++ multistep over the training schedule (linear betas, 1000)."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        common = dict(num_train_timesteps=self.cfg.num_train_timesteps,
                      beta_schedule=self.cfg.beta_schedule, beta_start=self.cfg.beta_start,
                      beta_end=self.cfg.beta_end, prediction_type="epsilon")
        if kind == "ddim":  # canary.json "sampling": clip_sample (older canaries: True)
            clip = bool((self.info.get("sampling") or {}).get("clip_sample", True))
            return DDIMScheduler(**common, clip_sample=clip)
        if kind == "dpm":
            return DPMSolverMultistepScheduler(**common)
        raise UserError(f"unknown scheduler {kind!r}; known: ddim, dpm")

    def random_tokens(self, n: int, generator: torch.Generator) -> list[str]:
        """n whole-word MiniLM vocabulary tokens drawn uniformly (no specials, no ## pieces)."""
        if not hasattr(self, "_vocab"):
            tok = self.text.tokenizer
            special = set(tok.all_special_ids)
            self._vocab = [w for w, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
                           if i not in special and not w.startswith(("##", "[")) and w.isalpha()]
        idx = torch.randint(len(self._vocab), (n,), generator=generator)
        return [self._vocab[int(i)] for i in idx]
