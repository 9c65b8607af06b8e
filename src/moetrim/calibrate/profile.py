"""The Profile: every calibration statistic as per-layer sums, stored in one safetensors file.

Sums (not means) so that profiles of the same model from shards, ranks or sessions merge by
addition; every criterion is a cheap function of a profile. Statistic names (`profile.get(l, name)`):

per layer         tokens                 tokens that passed the layer's router
per expert [E]    count                  routed-token count (slots: a token counts once per expert)
                  gate_sum               Σ g over routed tokens (g: the weight the model applies)
                  prob_sum               Σ router probability over *all* tokens
                  norm_sum, norm_sq_sum  Σ ‖y‖, Σ ‖y‖² (y: expert output before gating)
                  gated_norm_sum         Σ g·‖y‖
                  moments [E, 3, 3]      Σ g^b·‖y‖^p for b, p in 0..2 (feeds the unified S(a, b, p))
per expert [E, H] out_sum                Σ y (mean output out_sum / count: what experts are grouped by
                                         when replacing; absent from profiles of older moetrim)
                  gated_out_sum          Σ g·y over routed tokens (REAM's output signature; newer profiles)
per layer [E, E]  logit_gram             Σ l lᵀ over every token, l the raw router logits (REAM's router
                                         signature: cosines between experts' logit columns; newer profiles)
per expert        in_gram [E, H, H]      Σ x xᵀ over routed tokens (x: expert input), for whitened SVD
                                         (only with calibrate(..., whiten=True))
                  mid_gram [E, I, I]     Σ h hᵀ over routed tokens (h: down_proj's input), whitening the
                                         down_proj corrections (with whiten=True)
per expert [E, H] dense_out_sum          Σ y over *every* token, routed to the expert or not: each expert
                                         on the same tokens, so routing does not decide how similar two
                                         experts look (HC-SMoE's merge; only with dense_outputs=True)
per dim [E, I]    act_abs_sum            Σ |h|      (h: intermediate activation, act(gate)·up)
                  act_sq_sum             Σ h²
                  act_abs_max            max |h|
                  gated_act_abs_sum      Σ g·|h|
                  gated_act_sq_sum       Σ (g·h)²   (CAMERA-P's energy; absent from older profiles)
                  gated_act_abs_max      max |g·h|  (CAMERA-P's peak; merges by max, as act_abs_max)
                  taylor                 Σ ∂L/∂m    (m: a multiplicative mask on h, at 1)
                  fisher                 Σ_s (∂L_s/∂m)², one gradient per sequence s (or per batch)
                  grad_magnitude         Σ_s Σ |∂L_s/∂W| over the dim's gate row, up row, down column
                                         (only with grad_magnitude=True / --grad-magnitude)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from moetrim.checkpoint.atomic import atomic_file, save_safetensors
from moetrim.errors import UsageError

PROFILE_VERSION = "1"
EXPERT_STATS = ("count", "gate_sum", "prob_sum", "norm_sum", "norm_sq_sum", "gated_norm_sum", "moments")
DIM_STATS = ("act_abs_sum", "act_sq_sum", "act_abs_max", "gated_act_abs_sum", "gated_act_sq_sum", "gated_act_abs_max", "taylor", "fisher",
             "grad_magnitude")
GRADIENT_STATS = ("taylor", "fisher", "grad_magnitude")
HIDDEN_STATS = ("out_sum", "gated_out_sum", "in_gram", "dense_out_sum")  # indexed by expert, then by hidden dimension: [E, H], [E, H, H]
GRAM_STATS = ("in_gram", "mid_gram")  # [E, n, n]: n = H for in_gram, I for mid_gram
EXPERT_PAIR_STATS = ("logit_gram",)  # [E, E]
OPT_IN = {"in_gram": "whiten=True", "mid_gram": "whiten=True", "dense_out_sum": "dense_outputs=True"}
# Named views into the moments tensor [E, b, p].
_MOMENT_ALIASES = {"count": (0, 0), "gate_sum": (1, 0), "norm_sum": (0, 1), "norm_sq_sum": (0, 2), "gated_norm_sum": (1, 1)}
MAX_STATS = ("act_abs_max", "gated_act_abs_max")  # merged by maximum; every other statistic by addition
# Statistics later moetrim versions added (what they are for): an older profile lacks them and must be recalibrated.
_NEWER_STATS = {"out_sum": "expert mean outputs", "gated_act_sq_sum": "CAMERA-P's gated activations",
                "gated_act_abs_max": "CAMERA-P's gated activations", "gated_out_sum": "REAM's signatures", "logit_gram": "REAM's signatures"}


@dataclass
class Profile:
    """Calibration statistics of one model. `stats` keys are 'layers.{l}.{name}'."""

    stats: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in self.stats})

    @property
    def has_gradients(self) -> bool:
        return self.meta.get("fisher", "false") == "true"

    @property
    def tokens(self) -> int:
        return int(self.meta.get("tokens", "0"))

    @property
    def sequences(self) -> int:
        return int(self.meta.get("sequences", "0"))

    @property
    def processes(self) -> int:
        """How many calibration processes took part (data-parallel calibration; 1 for older profiles)."""
        try:
            return max(1, int(self.meta.get("processes", "1")))
        except ValueError:
            return 1

    @property
    def fingerprint(self) -> str:
        return self.meta.get("model_fingerprint", "")

    def names(self) -> list[str]:
        """Statistics a profile can hold; the opt-in ones (in_gram, mid_gram, dense_out_sum) only where this one holds them."""
        held = [n for n in OPT_IN if any(k.endswith(f".{n}") for k in self.stats)]
        return ["tokens", *EXPERT_STATS, *DIM_STATS, "out_sum", "gated_out_sum", "logit_gram", *held]

    def get(self, layer: int, name: str) -> torch.Tensor:
        """Statistic `name` of MoE layer `layer` (decoder-layer index): [E] per expert, [E, I] per dim,
        [E, H] out_sum and dense_out_sum, [E, H, H] in_gram, [E, I, I] mid_gram."""
        if layer not in self.layers:
            raise UsageError(f"profile has no MoE layer {layer}; layers: {self.layers}")
        if name in _MOMENT_ALIASES:
            b, p = _MOMENT_ALIASES[name]
            return self.stats[f"layers.{layer}.moments"][:, b, p]
        key = f"layers.{layer}.{name}"
        if key not in self.stats:
            if name == "grad_magnitude" and self.has_gradients:
                raise UsageError("profile has no 'grad_magnitude': calibrate with --grad-magnitude")
            if name in GRADIENT_STATS:
                raise UsageError(f"profile has no '{name}': it was calibrated with --no-fisher; recalibrate without it")
            if name in _NEWER_STATS:
                raise UsageError(f"profile has no '{name}' ({_NEWER_STATS[name]}): it was written by an older moetrim; recalibrate")
            if name in ("in_gram", "mid_gram"):
                raise UsageError(f"profile has no '{name}' (expert input Grams): calibrate with whiten=True (--whiten)")
            if name == "dense_out_sum":
                raise UsageError("profile has no 'dense_out_sum' (every expert's output on the same tokens): calibrate with "
                                 "dense_outputs=True (--dense-outputs)")
            raise UsageError(f"unknown statistic '{name}'; known: {', '.join(self.names())}")
        return self.stats[key]

    def digest(self) -> str:
        """Content hash of the statistics (recorded in plans made from this profile)."""
        h = hashlib.sha256()
        for key in sorted(self.stats):
            t = self.stats[key].detach().cpu().contiguous()
            h.update(key.encode())
            h.update(str(t.dtype).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def merge(self, other: "Profile") -> "Profile":
        """Sum of two profiles of the same model (max for max statistics)."""
        if self.fingerprint != other.fingerprint:
            raise UsageError("cannot merge profiles of different models (model fingerprints differ)")
        if set(self.stats) != set(other.stats):
            raise UsageError("cannot merge profiles with different statistics (one was calibrated with --no-fisher, --grad-magnitude, "
                             "whiten or dense outputs, or by an older moetrim without out_sum or mid_gram?)")
        for key, value in self.stats.items():
            if value.shape != other.stats[key].shape:
                raise UsageError(f"cannot merge: '{key}' has shape {list(value.shape)} in one profile and {list(other.stats[key].shape)} in the other")
        if self.meta.get("fisher_mode") != other.meta.get("fisher_mode"):
            raise UsageError("cannot merge profiles whose Fisher was summed per sequence and per batch")
        merged = {}
        for key, value in self.stats.items():
            if key.rsplit(".", 1)[-1] in MAX_STATS:
                merged[key] = torch.maximum(value, other.stats[key])
            else:
                merged[key] = value + other.stats[key]
        meta = dict(self.meta)
        meta["tokens"] = str(self.tokens + other.tokens)
        meta["sequences"] = str(self.sequences + other.sequences)
        meta["processes"] = str(self.processes + other.processes)
        digests = sorted(self.meta.get("data_digest", "").split("+") + other.meta.get("data_digest", "").split("+"))
        meta["data_digest"] = "+".join(d for d in digests if d)
        return Profile(merged, meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same folder, then rename); same profile, same bytes."""
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.stats.items()}
        with atomic_file(path) as tmp:
            save_safetensors(tensors, tmp, metadata={**self.meta, "moetrim_profile": PROFILE_VERSION})
        return path

    def validate(self, source: str = "the profile") -> "Profile":
        """Refuse statistics no criterion can rank by: no tokens, non-finite values, or shapes that
        disagree within a layer. Returns self."""
        if self.tokens <= 0 or not self.stats:
            raise UsageError(f"{source} holds no calibration tokens; calibrate on more data")
        shapes: dict[int, tuple[int | None, int | None, int | None]] = {}  # E, I, H
        for key, t in self.stats.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in (*EXPERT_STATS, *DIM_STATS, *HIDDEN_STATS, *GRAM_STATS, *EXPERT_PAIR_STATS, "tokens"):
                raise UsageError(f"{source} has an unknown statistic '{key}'; it was not written by moetrim calibrate")
            layer, name = int(parts[1]), parts[2]
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise UsageError(f"{source} has non-finite values in '{key}' (did the model overflow? calibrate with --dtype float32)")
            E, I, H = shapes.get(layer, (None, None, None))
            want = {"moments": 3, "in_gram": 3, "mid_gram": 3}.get(name, 1 if name in EXPERT_STATS or name == "tokens" else 2)
            square = (name not in GRAM_STATS or (t.ndim == 3 and t.shape[1] == t.shape[2])) and \
                (name not in EXPERT_PAIR_STATS or (t.ndim == 2 and t.shape[0] == t.shape[1]))
            if t.ndim != want or (name == "moments" and tuple(t.shape[1:]) != (3, 3)) or (name == "tokens" and t.numel() != 1) or not square:
                raise UsageError(f"{source}: '{key}' has shape {list(t.shape)}, not what moetrim calibrate writes")
            if name != "tokens":
                E = t.shape[0] if E is None else E
                per_dim = name in DIM_STATS or name == "mid_gram"
                I = t.shape[1] if per_dim and I is None else I
                H = t.shape[1] if name in HIDDEN_STATS and H is None else H
                if t.shape[0] != E or (per_dim and t.shape[1] != I) or (name in HIDDEN_STATS and t.shape[1] != H):
                    raise UsageError(f"{source}: '{key}' has shape {list(t.shape)}, which disagrees with the layer's other statistics")
            shapes[layer] = (E, I, H)
        required = {"tokens", "moments", "prob_sum", "act_abs_sum", "act_sq_sum", "act_abs_max", "gated_act_abs_sum"}
        if self.has_gradients:
            required |= {"taylor", "fisher"}
        for layer in shapes:
            missing = sorted(n for n in required if f"layers.{layer}.{n}" not in self.stats)
            if missing:
                raise UsageError(f"{source} lacks {', '.join(missing)} for layer {layer}; it was not written by moetrim calibrate")
        return self

    def check_model(self, layers) -> None:
        """Refuse a profile whose layers, expert counts or widths are not the model's (`layers`: MoELayer views)."""
        want = {l.index: (l.num_experts, l.widths[0], l.hidden_size) for l in layers}
        if set(self.layers) != set(want):
            raise UsageError(f"the profile covers MoE layers {self.layers} but the model's are {sorted(want)}; calibrate this model")
        for key, t in self.stats.items():
            _, layer, name = key.split(".")
            E, I, H = want[int(layer)]
            per_dim = name in DIM_STATS or name == "mid_gram"
            if (name != "tokens" and t.shape[0] != E) or (per_dim and t.shape[1] != I) or (name in HIDDEN_STATS and t.shape[1] != H):
                raise UsageError(f"the profile's '{key}' has shape {list(t.shape)} but layer {layer} has {E} experts of width {I} "
                                 f"(hidden size {H}); calibrate this model")


def load_profile(path: str | os.PathLike) -> Profile:
    """Read a profile written by `Profile.save` (safetensors only; nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"profile not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            stats = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise UsageError(f"{path} is not a safetensors profile: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if "moetrim_profile" not in meta:
        raise UsageError(f"{path} is a safetensors file but not a moetrim profile (no 'moetrim_profile' metadata)")
    try:
        int(meta.get("tokens", "0")), int(meta.get("sequences", "0"))
    except ValueError:
        raise UsageError(f"{path}: its 'tokens' or 'sequences' metadata is not a number") from None
    return Profile(stats, meta).validate(str(path))


def data_digest(chunks: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
