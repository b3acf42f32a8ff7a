"""CLSR gated experts (DistilWhisper): config, layer, conversion of a Whisper, and the ``clsr`` expert file.

* :mod:`~distill.clsr.config`: :class:`ClsrConfig` the gate-noise ramp :func:`noise_scale_at` and the
  warm-up ramp :func:`ramp_at`.
* :mod:`~distill.clsr.layer`: the gate, the language paths (full copy or low-rank delta), the fc1/fc2 pair and the
  gated attention projection.
* :mod:`~distill.clsr.routing`: the routing state the layers share, and the gate recorder.
* :mod:`~distill.clsr.model`: :func:`convert_to_clsr` / :func:`convert_from_clsr`, languages, routing controls.
* :mod:`~distill.clsr.expert`: one language as a ``clsr`` expert file, with base fingerprint checks.
* :mod:`~distill.clsr.kind`: the ``clsr`` entry of the table of expert kinds (``lora_experts.kinds``), registered
  when this package is imported.
"""

from distill.clsr.config import (GATE_MODES, ClsrConfig, check_fraction, check_gate_mode, noise_scale_at, ramp_at,
                                recorded_gate_inference, recorded_layout)
from distill.clsr.expert import (attach_clsr_expert, clsr_expert_tensors, language_config, load_clsr_expert,
                                 make_clsr_expert, parameters_active_per_token, parameters_per_language,
                                 save_clsr_expert)
from distill.clsr.kind import CLSR
from distill.clsr.model import (add_language, clsr_languages, clsr_layers, clsr_module_paths, clsr_projections,
                                clsr_routing, collect_gates, convert_from_clsr, convert_to_clsr, is_clsr,
                                language_parameters, remove_language, set_gate_mode, set_language, set_noise_scale,
                                set_warmup)
from distill.clsr.routing import GateRecorder

__all__ = [
    "CLSR", "GATE_MODES", "ClsrConfig", "GateRecorder", "add_language", "attach_clsr_expert", "check_fraction",
    "check_gate_mode", "clsr_expert_tensors", "clsr_languages", "clsr_layers", "clsr_module_paths",
    "clsr_projections", "clsr_routing", "collect_gates", "convert_from_clsr", "convert_to_clsr", "is_clsr",
    "language_config", "language_parameters", "load_clsr_expert", "make_clsr_expert", "noise_scale_at",
    "parameters_active_per_token", "parameters_per_language", "ramp_at", "recorded_gate_inference",
    "recorded_layout", "remove_language", "save_clsr_expert", "set_gate_mode", "set_language", "set_noise_scale",
    "set_warmup",
]
