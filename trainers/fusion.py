"""Fusing experts for a target language, with the fusion weights searched on the target's validation WER.

The base is loaded once. Each candidate weighting is merged (``lora_experts.merge``) and applied to that one
model without reloading it: an exactly low-rank result (``linear``, ``svd``, ``task_arithmetic`` over LoRA
experts) is a LoRA adapter whose matrices are overwritten in place; any other result (``ties``, ``dare``,
``lors``, ...) is added to the touched weights, which are restored from a copy before the next candidate.
The encoder layers below the lowest one any expert changes are run once on the dev set: every trial starts
from the input of that layer (the encoder output itself when no expert touches the encoder; the log-mel
features when one changes the convolutions).

Search strategies (:func:`candidate_weights`):

- ``grid``: the task-arithmetic paper's lambda in [0, 1]: weights ``[1, lambda/n, ..., lambda/n]`` for the target
  and its n supports (the pooled support scaled by lambda).
- ``interpolate``: weight interpolation (model soups): ``[1 - lambda, lambda/n, ..., lambda/n]`` for lambda in
  [0, 1], so the weights always sum to 1. For supports as strong as the target and pointing the same way (an
  expert of the same language trained on other clips), where adding them at full weight overshoots.
- ``bayes``: Optuna's TPE sampler over every weight in [-1.5, 1.5] (LoraHub's range), minimizing
  ``WER + l1 * sum |w|`` (LoraHub's L1 penalty).

Every search tries the target-only point ``[1, 0, ..., 0]`` first, and the result is the trial with the lowest dev
WER, so the fused expert is never worse on dev than the target expert alone. That point is the target expert
itself whatever the method (TIES at a density below 1 would otherwise trim it, DARE drop part of it).

A control for shrinkage (``scaled_target=True``, ``fuse --scaled-target``): the target alone scaled by each of
the grid's lambdas in (0, 1) (weights ``[s, 0, ..., 0]``), scored on the same dev set with the same number of
trials. A fusion whose disjoint mean (TIES) or interpolation takes a smaller step than the target's own can gain
from that shrinkage alone: on real Czech the 100-clip target scaled to 0.6 was as good on test as TIES with three
supports (docs/results.md, issue 16 item 3). The control is reported beside the search, not chosen from.

Method options can be searched too: an option given a list of values (``{"density": [0.2, 0.5, 1.0]}``, from
``fuse --option density=0.2,0.5,1.0``) runs the weight search once per combination of values
(:func:`option_candidates`), and the best trial over all of them wins; every trial records its options.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from inference.decoding import duration_bound, log_mel, transcribe_batch
from inference.evaluation import Utterance, error_rates
from lora_experts.merge import MergeResult, fused_expert, merge
from lora_experts.model import attach_expert, remove_experts
from lora_experts.task_vectors import dense, lora_tensors, task_vector
from registry.expert_file import Expert
from trainers.data import encode_from, encode_until

FUSION_ADAPTER = "fusion"
SEARCHES = ("fixed", "grid", "interpolate", "bayes")


@dataclass
class Trial:
    """One scored candidate: its weights, dev WER/CER (fractions), the search objective and decode time."""

    weights: list[float] | None  # None: the merge method's default weights (no search)
    wer: float
    cer: float
    objective: float
    seconds: float
    options: dict | None = None  # the merge method's options this trial used (None: the method's defaults)


def best_trial(trials: Sequence[Trial]) -> Trial:
    """The chosen trial: lowest dev WER; ties go to the smallest L1 norm of the weights, then the earliest."""
    return min(trials, key=lambda t: (t.wer, sum(abs(x) for x in t.weights)))


@dataclass
class SearchResult:
    """All trials in the order they ran, and the chosen one (lowest dev WER; ties: smallest L1 norm)."""

    trials: list[Trial]
    best: Trial
    merge: MergeResult | None = field(default=None, repr=False)
    control: list[Trial] = field(default_factory=list)  # the target alone scaled (``scaled_target``), scale 1 last

    def trace(self) -> list[dict]:
        return [asdict(t) for t in self.trials]

    def control_trace(self) -> list[dict]:
        return [asdict(t) for t in self.control]

    @property
    def control_best(self) -> Trial | None:
        """The best scaled target on dev (lowest WER; ties go to the larger scale: the less shrunk), or None."""
        if not self.control:
            return None
        return min(self.control, key=lambda t: (t.wer, -t.weights[0]))


def first_changed_encoder_layer(task_vectors: Sequence[dict], num_layers: int) -> int:
    """The lowest encoder layer any of ``task_vectors`` changes: 0 when one changes the convolutions or positions,
    ``num_layers`` when none touches the encoder (or only its final norm)."""
    first = num_layers
    for tv in task_vectors:
        for key in tv:
            if not key.startswith("model.encoder."):
                continue
            match = re.match(r"model\.encoder\.layers\.(\d+)\.", key)
            if match:
                first = min(first, int(match.group(1)))
            elif not key.startswith("model.encoder.layer_norm."):
                return 0
    return first


class DevScorer:
    """Greedy dev-set WER of whatever model state is current; the frozen part of the encoder run once.

    Args:
        model, processor: the loaded base (experts come and go on it).
        utterances: the dev set (one or more languages; each decoded with its own language token).
        encoder_start: the lowest encoder layer a candidate may change (:func:`first_changed_encoder_layer`):
            the input of that layer is kept and each call runs only the layers from there (0 keeps the log-mel
            features and runs the whole encoder; the number of layers keeps the encoder output).
        batch_size: decoding batch size.
    """

    def __init__(self, model, processor, utterances: Sequence[Utterance], encoder_start: int, batch_size: int = 16):
        if not utterances:
            raise ValueError("the dev set is empty; pass --dev with a corpus that has a validation split")
        self.model, self.processor, self.encoder_start = model, processor, encoder_start
        order = sorted(range(len(utterances)), key=lambda i: utterances[i].seconds)
        self.batches = []
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                items = [utterances[i] for i in order[start:start + batch_size]]
                feats = log_mel(processor, [u.audio for u in items], model)
                hidden = encode_until(model.model.encoder, feats, encoder_start) if encoder_start else None
                # the audio-duration bound of eval: decoding never sees the references
                bound = duration_bound(max(u.seconds for u in items), model.config.max_target_positions - 4)
                self.batches.append({"features": None if encoder_start else feats, "hidden": hidden, "bound": bound,
                                     "languages": [u.language for u in items], "texts": [u.text for u in items]})

    def __call__(self) -> dict:
        refs, hyps = [], []
        self.model.eval()
        with torch.inference_mode():
            for b in self.batches:
                states = None if b["hidden"] is None else encode_from(self.model.model.encoder, b["hidden"],
                                                                      self.encoder_start)
                out = transcribe_batch(self.model, self.processor, b["features"], b["languages"],
                                       max_new_tokens=b["bound"], encoder_hidden_states=states)
                refs += b["texts"]
                hyps += out.texts
        rates = error_rates(refs, hyps)
        return {"wer": rates["wer"], "cer": rates["cer"], "hypotheses": hyps}


class FusionApplier:
    """Applies candidate fusions of fixed experts to one model, each replacing the last (see the module doc).

    Args:
        model: the base model; nothing else may attach experts to it while this is in use.
        task_vectors: one per expert, in the order weights are given.
        method, options, seed: as :func:`lora_experts.merge.merge`.
    """

    def __init__(self, model, task_vectors: Sequence[dict], method: str, options: dict | None = None, seed: int = 0):
        self.model, self.task_vectors = model, list(task_vectors)
        self.method, self.options, self.seed = method, dict(options or {}), seed
        self._saved: dict[str, torch.Tensor] = {}  # parameter name -> original value (dense path)
        self._adapter_layout: tuple | None = None  # (tensor shapes, scales) of the attached adapter (low-rank path)

    def apply(self, weights: Sequence[float], options: dict | None = None) -> MergeResult:
        """Apply the fusion at ``weights`` (with ``options`` instead of the applier's own, when given)."""
        result = merge_candidate(self.task_vectors, weights, self.method,
                                 self.options if options is None else options, self.seed)
        if result.low_rank:
            self._restore_weights()
            tensors, hyper = lora_tensors(result.task_vector)
            layout = (sorted((k, tuple(v.shape)) for k, v in tensors.items()), hyper["alpha"],
                      sorted(hyper.get("alpha_pattern", {}).items()))
            if layout == self._adapter_layout:  # same ranks and scales: overwrite the matrices in place
                modules = dict(self.model.named_modules())
                with torch.no_grad():
                    for key, value in tensors.items():
                        module, _, part = key.rpartition(".")
                        getattr(modules[module], part)[FUSION_ADAPTER].weight.copy_(value)
            else:
                self._detach()
                attach_expert(self.model, tensors, hyper, FUSION_ADAPTER)
                self._adapter_layout = layout
        else:
            self._detach()
            self._restore_weights()
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, delta in result.task_vector.items():
                    p = params[name]
                    self._saved[name] = p.detach().clone()
                    p.add_(dense(delta).to(p.device, p.dtype))
        return result

    def clear(self) -> None:
        """Back to the plain base (bit-exact)."""
        self._detach()
        self._restore_weights()

    def _detach(self) -> None:
        if self._adapter_layout is not None:
            remove_experts(self.model)
            self._adapter_layout = None

    def _restore_weights(self) -> None:
        if self._saved:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in self._saved.items():
                    params[name].copy_(value)
            self._saved = {}


def target_alone(weights: Sequence[float] | None) -> bool:
    """Whether ``weights`` are ``[1, 0, ..., 0]``: the target expert alone, supports left out."""
    return weights is not None and len(weights) > 0 and weights[0] == 1.0 and not any(weights[1:])


def target_scaled(weights: Sequence[float] | None) -> bool:
    """Whether ``weights`` are ``[s, 0, ..., 0]`` with ``s != 0``: the target alone, scaled by ``s``."""
    return weights is not None and len(weights) > 0 and weights[0] != 0 and not any(weights[1:])


def scale_candidates(trials: int) -> list[float]:
    """The scales of the shrinkage control: the grid's lambdas strictly between 0 and 1, then 1 (the target
    itself); ``trials`` 6 -> ``[0.2, 0.4, 0.6, 0.8, 1.0]``."""
    steps = max(3, trials)
    return [round(i / (steps - 1), 6) for i in range(1, steps - 1)] + [1.0]


def merge_candidate(task_vectors: Sequence[dict], weights: Sequence[float] | None, method: str,
                    options: dict | None, seed: int = 0) -> MergeResult:
    """``merge`` on the CPU, except that the target alone, scaled or not (:func:`target_scaled`), is the
    target's own delta times its weight exactly (a ``linear`` merge), never trimmed or dropped by the method."""
    if target_scaled(weights):
        return merge(task_vectors, weights, "linear", seed=seed, device="cpu")
    return merge(task_vectors, weights, method, seed=seed, device="cpu", **(options or {}))


def option_candidates(options: dict | None) -> list[dict]:
    """Every combination of a merge method's option values: an option given a list is searched.

    ``{"density": [0.2, 0.5], "lam": 1.0}`` -> ``[{"density": 0.2, "lam": 1.0}, {"density": 0.5, "lam": 1.0}]``;
    without lists, ``[options]``.
    """
    options = dict(options or {})
    for key, value in options.items():
        if isinstance(value, list) and not value:
            raise ValueError(f"option {key}: an empty list of values to search; give at least one")
    keys = list(options)
    values = [v if isinstance(v, list) else [v] for v in options.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def option_label(options: dict | None) -> str:
    """``{"density": 0.5}`` -> ``density=0.5`` (empty for no options)."""
    return " ".join(f"{k}={v}" for k, v in (options or {}).items())


def candidate_weights(search: str, n: int, trials: int, *,
                      bounds: tuple[float, float] = (-1.5, 1.5)) -> list[list[float]]:
    """The weight vectors a non-adaptive search tries (``grid``, ``interpolate``), the target alone first; ``bayes``
    proposes its own."""
    if search not in ("grid", "interpolate"):
        raise ValueError(f"candidate_weights is for the grid and interpolate searches, not {search!r}")
    if n == 1:
        return [[1.0]]
    steps = max(2, trials)
    lams = [i / (steps - 1) for i in range(steps)]
    return [[1.0 if search == "grid" else round(1.0 - lam, 6)] + [lam / (n - 1)] * (n - 1) for lam in lams]


def search_weights(score: Callable[[list[float]], dict], n: int, search: str = "grid", trials: int = 11, *,
                   weights: Sequence[float] | None = None, l1: float = 0.05, bounds: tuple[float, float] = (-1.5, 1.5),
                   seed: int = 0, progress: bool = True, desc: str = "") -> SearchResult:
    """Search fusion weights for ``n`` experts (the target first) by dev WER.

    Args:
        score: weights -> ``{"wer", "cer"}`` on the dev set (applies the fusion, decodes, scores).
        search: ``fixed`` (just ``weights``), ``grid``, ``interpolate`` or ``bayes`` (see the module docstring).
        trials: candidates to score, the target-only point included.
        l1: ``bayes``: penalty on ``sum |w|`` added to the WER in the search objective (not in the choice).
        bounds: ``bayes``: range of every weight.
        desc: added to the progress bar's label (e.g. the method options being tried).
    """
    from tqdm.auto import tqdm

    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
    done: list[Trial] = []
    bar = tqdm(total=1 if search == "fixed" else trials, desc=f"fusion search ({search}{desc})", unit="trial",
               disable=not progress)

    def run(w: list[float]) -> Trial:
        for t in done:  # a point already scored (TPE can repeat one) costs nothing
            if t.weights == w:
                return t
        t0 = time.perf_counter()
        s = score(w)
        trial = Trial(w, s["wer"], s["cer"], s["wer"] + l1 * sum(abs(x) for x in w), time.perf_counter() - t0)
        done.append(trial)
        best = best_trial(done)
        bar.set_postfix(best_wer=f"{100 * best.wer:.1f}%", weights=",".join(f"{x:.2f}" for x in best.weights))
        bar.update(1)
        return trial

    if search == "fixed":
        if weights is None or len(weights) != n:
            raise ValueError(f"fixed weights need one weight per expert ({n}), e.g. --weights 0.7,0.3")
        run([float(x) for x in weights])
    elif search in ("grid", "interpolate"):
        for w in candidate_weights(search, n, trials):
            run(w)
    else:
        try:
            import optuna
        except ImportError as e:
            raise ImportError("--search bayes needs optuna: pip install 'whisper-experts[fusion]' "
                              "(or use --search grid)") from e
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        study.enqueue_trial({f"w{i}": 1.0 if i == 0 else 0.0 for i in range(n)})  # the target alone
        if n > 1:
            study.enqueue_trial({f"w{i}": 1.0 if i == 0 else 0.5 / (n - 1) for i in range(n)})
        study.optimize(lambda t: run([round(t.suggest_float(f"w{i}", *bounds), 3) for i in range(n)]).objective,
                       n_trials=trials)
    bar.close()
    return SearchResult(done, best_trial(done))


SUPPORT_SCOPES = ("all", "decoder")


def scoped(tv: dict, scope: str, what: str) -> dict:
    """The part of task vector ``tv`` that ``scope`` keeps (``all``; ``decoder``: no ``model.encoder.`` key).

    Raises:
        ValueError: an unknown scope, or nothing left (``what`` changes only what the scope drops).
    """
    if scope not in SUPPORT_SCOPES:
        raise ValueError(f"support scope {scope!r}: expected one of {', '.join(SUPPORT_SCOPES)}")
    if scope == "all":
        return tv
    kept = {k: v for k, v in tv.items() if not k.startswith("model.encoder.")}
    if not kept:
        raise ValueError(f"{what} changes only the encoder, so its decoder part (support scope {scope!r}) is "
                         "empty; fuse it with the support scope 'all', or leave it out")
    return kept


def fuse_for_target(base, experts: Sequence[Expert], names: Sequence[str], target: str | None,
                    dev: Sequence[Utterance] | None, *, method: str = "linear", options: dict | None = None,
                    search: str = "grid", trials: int = 11, weights: Sequence[float] | None = None,
                    seed: int = 0, batch_size: int = 16, progress: bool = True,
                    support_scope: str = "all", scaled_target: bool = False) -> tuple[Expert, SearchResult]:
    """Fuse ``experts`` (the target language's first) with weights searched on the dev WER.

    Args:
        base: the loaded ``registry.bases.Base`` all experts were made for (checked by the caller).
        target: the target language (None: a multi-language merge with fixed ``weights`` and no dev set).
        dev: the target's dev utterances (None only with ``search="fixed"``).
        support_scope: ``"all"``, or ``"decoder"``: only the supports' decoder deltas take part, so the
            encoder (the acoustics) is the target expert's alone; for supports trained on other speech
            (a synthesizer, other recording conditions) whose encoder deltas learned that speech.
        scaled_target: also score the shrinkage control (the target alone scaled by
            :func:`scale_candidates` of ``trials``) into ``SearchResult.control``; needs a dev set.

    Returns:
        (the fused expert, with the search trace in its lineage and the dev WER in its metrics; the search).
    """
    tvs = [task_vector(e) for e in experts]
    tvs[1:] = [scoped(tv, support_scope, f"support {n}") for tv, n in zip(tvs[1:], names[1:])]
    combos = option_candidates(options)
    applier = FusionApplier(base.model, tvs, method, combos[0], seed)
    if dev is None:
        if scaled_target:
            raise ValueError("the scaled-target control is scored on the target's dev set; give one (--dev DIR)")
        if search != "fixed":
            raise ValueError(f"--search {search} needs a dev set (--dev DIR) to score candidates")
        if len(combos) > 1:
            raise ValueError(f"options {option_label(options)}: a list of values is searched on the target's dev "
                             "set; give a dev set (--dev DIR) or one value per option")
        # No dev set: fixed weights, or the method's defaults (None) for a multi-language merge.
        only = Trial([float(x) for x in weights] if weights else None, math.nan, math.nan, math.nan, 0.0, combos[0])
        result = SearchResult([only], only)
    else:
        start = first_changed_encoder_layer(tvs, base.model.config.encoder_layers)
        scorer = DevScorer(base.model, base.processor, dev, encoder_start=start, batch_size=batch_size)
        alone: dict = {}  # the target alone is the same expert under every option: scored once

        def score(w, combo):
            if target_alone(w) and alone:
                return alone
            applier.apply(w, combo)
            scores = scorer()
            if target_alone(w):
                alone.update(scores)
            return scores

        trials_all = []
        try:
            for combo in combos:
                label = f", {option_label(combo)}" if len(combos) > 1 else ""
                part = search_weights(lambda w, c=combo: score(w, c), len(experts), search, trials, weights=weights,
                                      seed=seed, progress=progress, desc=label)
                for t in part.trials:
                    t.options = dict(combo)
                trials_all.extend(part.trials)
            control = _scaled_control(lambda w: score(w, combos[0]), len(experts), trials, progress) \
                if scaled_target else []
        finally:
            applier.clear()
        # the best over every option combination; the control is reported, never chosen
        result = SearchResult(trials_all, best_trial(trials_all), control=control)
    if target is not None:  # the target alone stays the target's own delta, whatever the method
        merged = merge_candidate(tvs, result.best.weights, method, result.best.options, seed)
    else:
        merged = merge(tvs, result.best.weights, method, seed=seed, device="cpu", **(result.best.options or {}))
    result.merge = merged
    metrics = {}
    if target is not None and not math.isnan(result.best.wer):
        metrics[target] = {"validation": {"wer": result.best.wer, "cer": result.best.cer, "n": len(dev or [])}}
    languages = [target] if target else None
    expert = fused_expert(merged, experts, names, languages=languages, metrics=metrics)
    expert.manifest["lineage"].update(search=search, trials=result.trace(), target=target)
    if merged.method != method:  # the search kept the target alone: stored as its exact (linear) delta
        expert.manifest["lineage"]["searched_method"] = method
    if support_scope != "all":
        expert.manifest["lineage"]["support_scope"] = support_scope
    if result.control:
        expert.manifest["lineage"]["scaled_target_control"] = result.control_trace()
    return expert, result


def _scaled_control(score: Callable[[list[float]], dict], n: int, trials: int, progress: bool) -> list[Trial]:
    """The target alone at each of :func:`scale_candidates` (the last, 1, is the target expert itself: scored
    once per search)."""
    from tqdm.auto import tqdm

    out = []
    for s in tqdm(scale_candidates(trials), desc="shrinkage control (target alone, scaled)", unit="trial",
                  disable=not progress):
        w = [s] + [0.0] * (n - 1)
        t0 = time.perf_counter()
        r = score(w)
        out.append(Trial(w, r["wer"], r["cer"], r["wer"], time.perf_counter() - t0))
    return out
