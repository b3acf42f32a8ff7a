"""Recipe: train a learned router (``inference.router``) over a pack of frozen experts on a language mix.

Per step, each utterance of a batch runs through every slot of the router at once, weighted by the router's
softmax (the batched LoRA layer applies weights that require grad in rank space), and the loss is the
decoder's cross-entropy on the transcript (prompt: the utterance's own language, as ``trainers/data.py``
builds labels) plus ``aux_weight`` times the cross-entropy of the router's output against the utterance's
own slot (its language's expert, or the base-model slot of a language without one). Only the router trains.
The language term matters: the decoder's loss is computed with each utterance's own language token in the
prompt, so it tells the router which expert transcribes best *given* the right language, but not which
language to decode in, which the router also decides at inference (and a wrong language token costs more
than an expert gains). On whisper-base with trained uk, pt, nl experts and German (base slot), 20 utterances
per language, 4 epochs: ``aux_weight`` 0 reached 65% validation routing accuracy and never sent German to the
base model; 0.1 made the same decisions; 1 reached 80%. Hence the default 1.
Experts that route hard (CLSR: one per sample) cannot be mixed, so with them the router learns from the
language loss alone.

The router's input is the base model's encoder output: it is computed once per utterance and cached
(``trainers.data.EncoderCache``), and the decoder reuses it. When an expert of the pack adapts the encoder
(from layer k up), the cache holds the input of layer k instead, and each step runs layers k.. twice: on the
base (the router's input) and under the step's routing (what the decoder attends to; gradients flow through it).

Each epoch ends with validation: routing accuracy (top slot == the utterance's own slot) and the WER of greedy
decoding with hard top-1 routing, in the top slot's language. The router with the lowest validation WER (ties:
higher accuracy) is kept; the oracle WER (every utterance with its own expert and language) is reported
beside it. :class:`RouterModule` is the LightningModule (the router is its only child, so Lightning's
train/eval switching never touches the frozen Whisper); :func:`train_router` wires data, model and trainer.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from transformers import get_scheduler
from transformers.modeling_outputs import BaseModelOutput

from inference.bank import expert_bank
from inference.router import LearnedRouter, audio_frames, router_slots
from trainers.configs import RouterTrainConfig, progress_bar_callbacks
from trainers.data import IGNORE, encode_from

log = logging.getLogger(__name__)


def _base_spec(cfg: RouterTrainConfig) -> str:
    from registry.packs import base_of_packs

    return base_of_packs(cfg.base, cfg.pack)


def encoder_start(bank) -> int | None:
    """The lowest encoder layer any expert of ``bank`` adapts (None: the experts leave the encoder alone)."""
    layers = [int(m.split(".")[3]) if m.startswith("model.encoder.layers.") else 0
              for e in bank.experts for m in e.modules if m.startswith("model.encoder.")]
    return min(layers, default=None)


def _frames(split, batch) -> list[int]:
    return audio_frames([split.seconds[i] for i in batch["index"].tolist()])


class _Split:
    """One split of the data module, with what the loop needs beside its batches."""

    def __init__(self, data, name: str):
        ds = data.datasets[name]  # with an encoder cache, batches never read the log-mel features (ExpertDataset)
        self.dataset = ds
        self.seconds = list(ds.rows["seconds"])
        self.loader = data.train_dataloader() if name == "train" else data.val_dataloader()


def train_router(cfg: RouterTrainConfig, base=None) -> tuple[LearnedRouter, dict]:
    """Train a router over the experts of ``cfg.pack`` (see the module docstring).

    Args:
        cfg: the run's options.
        base: a loaded ``registry.bases.Base`` to use instead of loading ``cfg.base``; experts already attached
            to its model (an ``ExpertBank``) are routed too. Its model is left frozen, in eval mode, with the pack.

    Returns:
        (the best router, in eval mode on CPU, its manifest filled; a report with the per-epoch history).
    """
    from inference.packs import load_pack
    from registry.bases import load_base
    from trainers.data import ExpertDataModule

    t0 = time.time()
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be at least 1")
    if base is None:
        base = load_base(_base_spec(cfg), device=cfg.device)
    model = base.model.eval().requires_grad_(False)
    for path in cfg.pack:
        load_pack(base, path, force=cfg.force)
    bank = expert_bank(model, create=False)
    if bank is None or not len(bank):
        raise ValueError("no experts to route: pass --pack with the experts the router chooses between")
    unknown = [lang for lang in cfg.languages if base.multilingual and lang not in base.languages]
    if unknown or not cfg.languages:
        raise ValueError(f"unknown language(s) {', '.join(unknown)} for {base.name}" if unknown else
                         "no --languages given: the language mix the router learns to tell apart")
    slots = router_slots(bank, cfg.languages)
    own = {lang: next(i for i, (_, code) in enumerate(slots) if code == lang) for lang in cfg.languages}
    start = encoder_start(bank)  # None: no expert adapts the encoder
    soft = not bank.routed  # kinds living in the model's own layers (CLSR) route hard: no soft mixing to learn by
    if not soft:
        hard = ", ".join(e.name for e in bank.experts if e.kind in bank.routed)
        if not cfg.aux_weight:
            raise ValueError(f"experts {hard} route hard (one per sample), so the decoder's loss cannot be mixed "
                             "over the experts to train the router; give --aux-weight > 0 to train it on the "
                             "utterances' languages alone")
        log.warning("experts %s route hard: the router trains on the language loss (--aux-weight) alone", hard)
    if start is not None:
        log.info("an expert adapts encoder layers %d..: each step runs them under routing", start)

    device = next(model.parameters()).device
    with bank.route(None):  # the cache holds the base model's encoder output (or the input of layer `start`)
        data = ExpertDataModule(cfg.data, base.processor, cfg.languages, cfg.batch_size, cfg.max_train,
                                cfg.max_validation, encoder=None if start == 0 else model.model.encoder,
                                encoder_layer=start or None, cache_dir=cfg.cache_dir,
                                base_fingerprint=base.fingerprint, multilingual=base.multilingual, seed=cfg.seed,
                                progress=cfg.progress)
        data.setup("fit")
    train, val = _Split(data, "train"), _Split(data, "validation")

    torch.manual_seed(cfg.seed)
    router = LearnedRouter(slots, bank.names, model.config.d_model, cfg.hidden, cfg.dropout, bank.base).to(device)
    module = RouterModule(model, base.processor, bank, router, cfg, own, start, soft, train, val)
    module.oracle = _validate(model, base.processor, bank, router, val, module.base_states, module.encode, own,
                              module.memo, oracle=True)
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="32-true", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=cfg.progress, enable_model_summary=False,
                        deterministic=False, callbacks=progress_bar_callbacks(cfg.progress))
    router.train()  # the oracle pass left it in eval mode
    trainer.fit(module, train_dataloaders=train.loader)
    history, best, oracle, total = module.history, module.best, module.oracle, module.total_steps
    epoch, state, metrics = best
    router.load_state_dict(state)
    router = router.cpu().eval()
    summary = {"corpus": str(data.data), "languages": list(cfg.languages), "packs": [str(p) for p in cfg.pack],
               "utterances": {k: v["utterances"] for k, v in data.summary.items()},
               "hours": {k: v["hours"] for k, v in data.summary.items()}, "steps": total, "best_epoch": epoch,
               "encoder_start": start,
               **{k: v for k, v in asdict(cfg).items() if k in ("lr", "weight_decay", "aux_weight", "epochs",
                                                               "batch_size", "seed", "hidden", "dropout")}}
    router.manifest_extra.update(training=summary, metrics={"validation": {**metrics, "oracle_wer": oracle["wer"]}})
    report = {"history": history, "best_epoch": epoch, "validation": metrics, "oracle": oracle,
              "seconds": round(time.time() - t0, 1)}
    return router, report


class RouterModule(L.LightningModule):
    """The router's training as a LightningModule: the loss of the module docstring per step, and after each
    epoch the validation of :func:`_validate` (routing accuracy, WER of hard top-1 routing); the router with
    the lowest validation WER (ties: higher accuracy, then lower router cross-entropy) is kept in ``best``.

    Args:
        model: the frozen Whisper carrying ``bank`` (not a child module: it stays frozen and in eval mode).
        processor: its processor (validation decodes).
        bank: the experts routed between; router: the :class:`LearnedRouter` that trains.
        cfg: the run's options; own: language -> its own slot; start: the lowest encoder layer an expert adapts
            (None: none); soft: whether the decoder's loss can be mixed over the slots; train, val: the splits.
    """

    def __init__(self, model, processor, bank, router: LearnedRouter, cfg: RouterTrainConfig, own: dict,
                 start: int | None, soft: bool, train: "_Split", val: "_Split"):
        super().__init__()
        self.router = router
        self._frozen = {"model": model, "processor": processor, "bank": bank, "train": train, "val": val}
        self.cfg, self.own, self.start, self.soft = cfg, own, start, soft
        self.ids = router.slot_ids(bank)
        self.memo: dict = {}  # validation transcripts per (batch, slots)
        self.history: list[dict] = []
        self.best: tuple | None = None
        self._best_key = None
        self._sums = {"ce": 0.0, "aux": 0.0, "n": 0}
        self.oracle: dict | None = None
        self.total_steps = 1

    def encode(self, batch) -> torch.Tensor:
        """The encoder output under the routing in force, from what the batch holds."""
        model = self._frozen["model"]
        device = next(model.parameters()).device
        if "encoder_hidden_states" in batch:
            return batch["encoder_hidden_states"].to(device, model.dtype)
        if "encoder_layer_input" in batch:
            return encode_from(model.model.encoder, batch["encoder_layer_input"].to(device, model.dtype), self.start)
        return model.model.encoder(batch["input_features"].to(device, model.dtype)).last_hidden_state

    def base_states(self, batch) -> torch.Tensor:
        with self._frozen["bank"].route(None), torch.no_grad():
            return self.encode(batch)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.router.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        model, bank = self._frozen["model"], self._frozen["bank"]
        states = self.base_states(batch)
        logits = self.router(states, _frames(self._frozen["train"], batch))
        target = torch.tensor([self.own[lang] for lang in batch["language"]], device=logits.device)
        ce = torch.zeros((), device=logits.device)
        if self.soft:
            table = self.ids.to(logits.device).expand(len(target), -1)
            with bank.route(table, weights=logits.softmax(-1)):  # all slots, weighted: gradients reach the router
                routed = states if self.start is None else self.encode(batch)
                out = model(encoder_outputs=BaseModelOutput(last_hidden_state=routed),
                            decoder_input_ids=batch["decoder_input_ids"].to(logits.device)).logits
            ce = F.cross_entropy(out.float().transpose(1, 2), batch["labels"].to(logits.device), ignore_index=IGNORE)
        aux = F.cross_entropy(logits.float(), target)
        self._sums["ce"] += ce.item()
        self._sums["aux"] += aux.item()
        self._sums["n"] += 1
        self.log_dict({"ce": ce.detach(), "aux": aux.detach()}, prog_bar=True, on_step=True, on_epoch=False)
        return ce + self.cfg.aux_weight * aux if self.cfg.aux_weight else ce

    def on_train_epoch_end(self):
        f = self._frozen
        metrics = _validate(f["model"], f["processor"], f["bank"], self.router, f["val"], self.base_states,
                            self.encode, self.own, self.memo)
        n = max(1, self._sums["n"])
        self.history.append({"epoch": self.current_epoch, "train_ce": self._sums["ce"] / n,
                             "train_aux": self._sums["aux"] / n, **metrics})
        self._sums = {"ce": 0.0, "aux": 0.0, "n": 0}
        if self.cfg.progress:
            self.print(f"epoch {self.current_epoch}: validation routing accuracy "
                       f"{100 * metrics['routing_accuracy']:.1f}%, WER {100 * metrics['wer']:.1f}% "
                       f"(oracle {100 * self.oracle['wer']:.1f}%)")
        key = (metrics["wer"], -metrics["routing_accuracy"], metrics["router_ce"])
        if self._best_key is None or key < self._best_key:
            self._best_key, self.best = key, (self.current_epoch, copy.deepcopy(self.router.state_dict()), metrics)
        self.router.train()


@torch.no_grad()
def _validate(model, processor, bank, router: LearnedRouter, split: _Split, base_states, encode, own: dict,
              memo: dict, oracle: bool = False) -> dict:
    """Routing accuracy and WER of hard top-1 routing on the validation split (``oracle``: every utterance
    routed to its own slot instead; no accuracy). ``base_states(batch)``: the base model's encoder output;
    ``encode(batch)``: the encoder output under the routing in force. Greedy decoding is a function of the
    batch and its slots, so transcripts are kept in ``memo`` and a batch routed as before is not decoded again."""
    from inference.decoding import duration_bound, transcribe_batch
    from inference.evaluation import error_rates

    router.eval()
    ids = router.slot_ids(bank)
    refs, hyps, hits, langs, ce = [], [], [], [], []
    for batch in split.loader:
        states = base_states(batch)
        target = [own[lang] for lang in batch["language"]]
        chosen = target
        if not oracle:
            logits = router(states, _frames(split, batch)).float()
            ce.append(F.cross_entropy(logits, torch.tensor(target, device=logits.device), reduction="sum"))
            chosen = logits.argmax(-1).tolist()
            hits += [c == t for c, t in zip(chosen, target)]
        key = (tuple(batch["index"].tolist()), tuple(chosen))
        if key not in memo:
            with bank.route(ids[chosen].unsqueeze(1)):  # the encoder under routing if an expert adapts it
                routed = states if "encoder_hidden_states" in batch else encode(batch)
                memo[key] = transcribe_batch(model, processor, languages=[router.slots[c][1] for c in chosen],
                                             encoder_hidden_states=routed,
                                             max_new_tokens=duration_bound(
                                                 max(split.seconds[i] for i in batch["index"].tolist()))).texts
        refs += batch["text"]
        hyps += memo[key]
        langs += batch["language"]
    out = {"wer": error_rates(refs, hyps)["wer"], "per_language": {}}
    for lang in dict.fromkeys(langs):
        idx = [i for i, x in enumerate(langs) if x == lang]
        row = {"n": len(idx), "wer": error_rates([refs[i] for i in idx], [hyps[i] for i in idx])["wer"]}
        if hits:
            row["routing_accuracy"] = sum(hits[i] for i in idx) / len(idx)
        out["per_language"][lang] = row
    if hits:
        out["routing_accuracy"] = sum(hits) / len(hits)
        out["router_ce"] = float(torch.stack(ce).sum()) / len(hits)
    return out
