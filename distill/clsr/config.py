"""Configuration of CLSR gated experts, and the schedule of the gate noise."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from lora_experts.config import resolve_encoder_start

PATH_KINDS = ("full", "lowrank")
SIDES = ("both", "decoder", "encoder")
DROPOUT_TARGETS = ("output", "delta")
GATE_MODES = ("hard", "soft")


@dataclass(frozen=True)
class ClsrConfig:
    """How a Whisper's feed-forward blocks become CLSR blocks. Frozen: derive variants with ``dataclasses.replace``.

    The gate is DistilWhisper's: ``G(x) = w2 . ReLU(W1 dropout(x) + b1)`` with ``w2 = 0`` at init, so ``G = 0``
    and a new language starts out computing exactly what the base computes.
    """

    # Language path: "full" = a trainable copy of the pretrained FFN (the paper); "lowrank" = a rank-r delta on it.
    kind: str = "full"
    rank: int = 16  # lowrank only: rank r of the deltas on fc1 and fc2
    alpha: float = 32.0  # lowrank only: the delta is (alpha / rank) * B A, as in LoRA
    gate_hidden: int = 64  # hidden size of the gate's ReLU layer
    gate_dropout: float = 0.1  # dropout on the gate's input x in training (DistilWhisper's code uses 0.1)
    path_dropout: float = 0.3  # dropout on the language path's output in training
    # What the path dropout drops: "output" = the language path's whole output (the paper's, where a path is a full
    # FFN copy); "delta" (lowrank only) = the low-rank delta alone, as LoRA's dropout leaves the frozen weights' part
    # clean. With "output" a low-rank path is the shared layer plus a delta, all of it under dropout: a noisier copy
    # of the shared one. On real speech "delta" opened the decoder gates that "output" shut (docs/results.md, item 1).
    path_dropout_on: str = "output"
    shared_only_prob: float = 0.2  # in training, each layer call runs the shared path only with this probability
    # Which FFN blocks become CLSR blocks: "both" = every encoder and decoder FFN (the paper); "decoder" leaves the
    # encoder untouched, so training can cache its output (as a decoder-only LoRA expert does); "encoder".
    side: str = "both"
    # With side "both" or "encoder": only encoder layers with index >= encoder_start get CLSR blocks (the frozen
    # layers below compute the same thing every epoch, so training caches the input of layer encoder_start).
    # Negative counts from the top, as a LoRA expert's does (-3: the top three layers); a model resolves it
    # (``for_encoder``) and experts record the resolved index.
    encoder_start: int = 0
    # Also gate the attention projections of the same layers (beyond the paper, where LoRA experts adapt too):
    # self-attention q/k/v/out in the encoder and decoder, cross-attention q/out in the decoder, each with its own
    # per-token gate and a path of the same kind (low-rank: a gated LoRA delta).
    attention: bool = False
    # How inference (eval mode) uses a language's gates: "hard" = each token takes the path its gate picks,
    # 1[G >= 0] (the paper); "soft" = every token mixes both paths by sigmoid(G), as training does without the noise.
    # Training ignores it; validation (best epoch), the expert file and every loader use it. On real speech the
    # gates stayed near G = 0, where hard gates applied whole paths that training had mixed in by half: soft was 4%
    # better (docs/results.md, item 1).
    gate_inference: str = "hard"

    def __post_init__(self) -> None:
        if self.kind not in PATH_KINDS:
            raise ValueError(f"CLSR path kind must be one of {', '.join(PATH_KINDS)}, got {self.kind!r}")
        if self.rank < 1:
            raise ValueError(f"CLSR low-rank rank must be >= 1, got {self.rank}")
        if self.side not in SIDES:
            raise ValueError(f"CLSR side must be one of {', '.join(SIDES)}, got {self.side!r}")
        if self.path_dropout_on not in DROPOUT_TARGETS:
            raise ValueError(f"CLSR path_dropout_on must be one of {', '.join(DROPOUT_TARGETS)}, got "
                             f"{self.path_dropout_on!r}")
        if self.path_dropout_on == "delta" and self.kind != "lowrank":
            raise ValueError("CLSR path_dropout_on 'delta' needs low-rank paths (kind 'lowrank', distill --path "
                             "lowrank); a full path has no delta to drop: use path_dropout_on 'output'")
        check_gate_mode(self.gate_inference)
        if self.gate_hidden < 1:
            raise ValueError(f"CLSR gate_hidden must be >= 1, got {self.gate_hidden}")
        for name in ("gate_dropout", "path_dropout", "shared_only_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"CLSR {name} must lie in [0, 1), got {value}")

    def for_encoder(self, layers: int) -> "ClsrConfig":
        """This config on an encoder of ``layers`` layers: a negative ``encoder_start`` becomes the index of the
        lowest converted layer (``layers + encoder_start``, at least 0); a start at or past the top is refused."""
        if not self.touches_encoder:
            return self
        start = resolve_encoder_start(self.encoder_start, layers, what="CLSR encoder_start")
        return self if start == self.encoder_start else replace(self, encoder_start=start)

    @property
    def lowrank_scale(self) -> float:
        return self.alpha / self.rank

    @property
    def touches_encoder(self) -> bool:
        return self.side in ("encoder", "both")

    @property
    def layout(self) -> dict:
        """Where the CLSR blocks are: ``{"side", "encoder_start", "attention"}`` (what a ``clsr`` expert records
        and checks)."""
        return {"side": self.side, "encoder_start": self.encoder_start if self.touches_encoder else 0,
                "attention": bool(self.attention)}

    def covers(self, stack: str, index: int) -> bool:
        """Whether layer ``index`` of the ``stack`` ("encoder" or "decoder") gets a CLSR block."""
        if stack == "encoder":
            return self.touches_encoder and index >= self.encoder_start
        return self.side in ("decoder", "both")

    def hyperparameters(self) -> dict:
        """The manifest's ``hyperparameters`` (``kind`` is stored as ``path``: the expert file's kind is clsr)."""
        d = asdict(self)
        d["path"] = d.pop("kind")
        d.update(self.layout)
        if self.kind == "full":
            del d["rank"], d["alpha"]
        return d


def recorded_layout(hyperparameters: dict) -> dict:
    """The layout (``{"side", "encoder_start", "attention"}``) a ``clsr`` expert's manifest records; experts written
    before those options existed cover every encoder and decoder FFN (``side`` "both", ``encoder_start`` 0) and no
    attention projection."""
    return ClsrConfig(side=hyperparameters.get("side", "both"),
                      encoder_start=int(hyperparameters.get("encoder_start", 0)),
                      attention=bool(hyperparameters.get("attention", False))).layout


def check_gate_mode(mode: str, where: str = "") -> str:
    """``mode`` if it is a CLSR inference gate mode (:data:`GATE_MODES`), else a ``ValueError`` naming it."""
    if mode not in GATE_MODES:
        raise ValueError(f"{where}unknown CLSR gate mode {mode!r}; use one of {', '.join(GATE_MODES)}")
    return mode


def recorded_gate_inference(hyperparameters: dict) -> str:
    """How a ``clsr`` expert's manifest says inference should use its gates (``gate_inference``: hard or soft);
    experts written before the option existed were validated with hard gates."""
    return check_gate_mode(hyperparameters.get("gate_inference", "hard"),
                           "the expert's manifest (written by a newer version, or edited) records an ")


def check_fraction(name: str, value: float) -> None:
    """Refuse a warm-up fraction, gate floor or dropout scale outside [0, 1], naming it."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def ramp_at(step: int, total_steps: int, fraction: float) -> float:
    """How far a warm-up spanning the first ``fraction`` of ``total_steps`` has come at ``step``: a linear ramp
    from 0 to 1, then 1; always 1 when ``fraction`` is 0 (no warm-up).

    Used for the gate warm-up (the gate floor is ``1 - ramp``: gates start held open and are released) and the
    path-dropout ramp (the dropout rate is ``ramp * path_dropout``).
    """
    check_fraction("a warm-up fraction", fraction)
    span = fraction * total_steps
    if span <= 0:
        return 1.0
    return min(max(step, 0) / span, 1.0)


def noise_scale_at(step: int, total_steps: int, max_scale: float = 5.0) -> float:
    """The gate noise scale ``a`` at a training step: a linear ramp from 0 at step 0 to ``max_scale`` at the end.

    Training gates are ``sigmoid(G + a * noise)`` with standard normal noise; as ``a`` grows, only gates far from
    0 keep their value under the noise, which pushes them towards 0 or 1 (hard gates at inference).

    Args:
        step: the current optimizer step (>= 0).
        total_steps: the step at which the ramp reaches ``max_scale`` (stays there afterwards).
        max_scale: the final noise scale (5 in DistilWhisper).
    """
    if total_steps <= 0:
        return float(max_scale)
    return float(max_scale) * min(max(step, 0) / total_steps, 1.0)
