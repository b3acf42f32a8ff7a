"""Configuration of a LoRA language expert: which Whisper linear layers it adapts, and how."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
FFN = ("fc1", "fc2")


def resolve_encoder_start(start: int, layers: int, what: str = "encoder_start") -> int:
    """The lowest encoder layer an adapter covers on an encoder of ``layers`` layers: a negative ``start`` counts
    from the top (``layers + start``, at least 0; -3: the top three layers); a start at or past the top is refused.
    Shared by LoRA experts and CLSR layouts."""
    if start < 0:
        return max(0, layers + start)
    if start >= layers:
        raise ValueError(f"{what} {start}: the encoder has layers 0..{layers - 1}; pick a start below {layers}, a "
                         "negative start (-3: the top three layers), or side decoder")
    return start


@dataclass(frozen=True)
class LoraExpertConfig:
    """A LoRA expert's shape. Frozen: derive variants with ``dataclasses.replace``."""

    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # scaling numerator: the update is (alpha / r) * B A
    dropout: float = 0.05  # dropout on the LoRA path's input during training
    target_modules: tuple[str, ...] = ATTENTION + FFN  # linear layer names to adapt (attention q/k/v/out, fc1/fc2)
    side: str = "decoder"  # "decoder", "encoder" or "both"; a decoder-only expert lets training cache encoder outputs
    cross_attention: bool = True  # in the decoder, also adapt cross-attention (encoder_attn) q_proj / out_proj
    # Cross-attention k/v act on all 1500 encoder frames: adapting them costs ~2x per training step (keys and
    # values recomputed with gradients every step), so it is opt-in.
    cross_attention_kv: bool = False
    # With side "encoder" or "both": adapt only encoder layers with index >= encoder_start. The frozen layers
    # below compute the same thing every epoch, so training caches their output and runs only the top.
    # Negative counts from the top, as a Python index does (-3: the top three layers; 0 when the encoder has fewer):
    # :meth:`for_encoder` turns it into a layer index once the base is known, and only that index is ever stored.
    encoder_start: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.side not in ("decoder", "encoder", "both"):
            raise ValueError(f"side must be decoder, encoder or both, got {self.side!r}")
        unknown = set(self.target_modules) - set(ATTENTION + FFN)
        if unknown or not self.target_modules:
            raise ValueError(f"unknown target module(s) {sorted(unknown)}; choose from {', '.join(ATTENTION + FFN)}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def touches_encoder(self) -> bool:
        return self.side in ("encoder", "both")

    def for_encoder(self, layers: int) -> "LoraExpertConfig":
        """This config on an encoder of ``layers`` layers: a negative ``encoder_start`` becomes the index of the
        lowest adapted layer (``layers + encoder_start``, at least 0); a start at or past the top is refused. An
        expert that leaves the encoder alone records 0."""
        if not self.touches_encoder:
            return replace(self, encoder_start=0) if self.encoder_start else self
        start = resolve_encoder_start(self.encoder_start, layers)
        return self if start == self.encoder_start else replace(self, encoder_start=start)

    def target_regex(self) -> str:
        """A regex peft full-matches against module paths of ``WhisperForConditionalGeneration``."""
        if self.encoder_start < 0:
            raise ValueError(f"encoder_start {self.encoder_start} counts from the top: resolve it with for_encoder()")
        attn = [m for m in self.target_modules if m in ATTENTION]
        ffn = [m for m in self.target_modules if m in FFN]
        parts = []
        if attn:
            parts.append(rf"self_attn\.({'|'.join(attn)})")
            cross = [m for m in attn if m in ("q_proj", "out_proj") or self.cross_attention_kv]
            if self.cross_attention and cross and self.side != "encoder":
                parts.append(rf"encoder_attn\.({'|'.join(cross)})")
        if ffn:
            parts.append(rf"({'|'.join(ffn)})")
        block = rf"\.layers\.\d+\.({'|'.join(parts)})"
        decoder = rf"model\.decoder{block}"
        # Encoder layers below encoder_start are excluded by a lookahead on the layer index.
        low = "|".join(str(i) for i in range(self.encoder_start))
        encoder = (rf"model\.encoder\.layers\.(?!({low})\.)\d+\.({'|'.join(parts)})" if low
                   else rf"model\.encoder{block}")
        return {"decoder": decoder, "encoder": encoder, "both": f"{encoder}|{decoder}"}[self.side]

    def hyperparameters(self) -> dict:
        """The manifest's ``hyperparameters`` for this config."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d
