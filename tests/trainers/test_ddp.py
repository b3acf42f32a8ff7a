"""Distributed training (Lightning DDP, gloo on CPU): batch sharding, the validation gather, and a 2-process run
of `whisper-experts train --strategy ddp --devices 2` whose ranks must end with the same expert."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.data import LengthGroupedSampler

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rows,batch_size,ranks", [(24, 4, 2), (9, 3, 2), (10, 3, 3), (2, 4, 3)])
def test_ranks_get_disjoint_equal_shares_that_cover_every_batch(rows, batch_size, ranks):
    lengths = [(7 * i) % 5 for i in range(rows)]
    for epoch in (0, 1):
        whole = LengthGroupedSampler(lengths, batch_size, seed=3)
        whole.set_epoch(epoch)
        batches = [tuple(b) for b in whole]
        shards = []
        for rank in range(ranks):
            sampler = LengthGroupedSampler(lengths, batch_size, seed=3, num_replicas=ranks, rank=rank)
            sampler.set_epoch(epoch)
            shards.append([tuple(b) for b in sampler])
            assert len(shards[-1]) == len(sampler)
        steps = len(shards[0])
        assert all(len(s) == steps for s in shards)  # the same number of steps on every rank
        # Dealt round-robin from the one shuffled list every rank builds, padded with its first batches.
        dealt = [shards[r][i] for i in range(steps) for r in range(ranks)]
        assert dealt == (batches * ranks)[:steps * ranks]
        assert set(dealt) == set(batches)  # every batch is some rank's
        if len(batches) % ranks == 0:  # no padding: the shares are disjoint
            assert all(not set(shards[a]) & set(shards[b]) for a in range(ranks) for b in range(a + 1, ranks))
        if len(batches) >= ranks:  # a repeat goes to a rank that lacks that batch
            assert all(len(set(s)) == len(s) for s in shards)
        covered = sorted(i for b in set(dealt) for i in b)
        assert covered == list(range(rows))  # every row, once per distinct batch


def test_sampler_epochs_differ_and_repeat():
    lengths = list(range(40))
    s = LengthGroupedSampler(lengths, 4, seed=0, num_replicas=2, rank=1)
    e0, e1 = list(s), list(s)  # without set_epoch the next pass is the next epoch
    s.set_epoch(0)
    assert list(s) == e0 and e0 != e1
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        LengthGroupedSampler(lengths, 4, num_replicas=2, rank=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_validation_rows_are_gathered_into_one_union_on_every_rank(tmp_path):
    from tests.trainers.ddp_worker import gather_in_process

    torch.multiprocessing.spawn(gather_in_process, args=(_free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1] == {"0": ["a", "a"], "1": ["b", "b"], "2": ["c", "x"]}


def test_ddp_on_two_cpu_processes_gives_every_rank_the_same_expert(uk_corpus, tiny_whisper_dir, tmp_path):
    """`whisper-experts train --strategy ddp --devices 2` on CPU (gloo): Lightning re-runs the script per rank;
    both ranks return the same trained expert, and rank 0 alone stores it."""
    from safetensors.torch import load_file

    from registry.store import Registry

    home, dump = tmp_path / "home", tmp_path / "dump"
    env = {**os.environ, "WHISPER_EXPERTS_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    # 9 training utterances in batches of 3: 3 batches, padded to 4, 2 steps per rank; 1 validation utterance,
    # decoded on both ranks (the padding repeat) and counted once.
    cmd = [sys.executable, str(ROOT / "tests" / "trainers" / "ddp_worker.py"), str(dump), "train",
           "--base", str(tiny_whisper_dir), "--data", str(uk_corpus), "--language", "uk", "--name", "uk-ddp",
           "--strategy", "ddp", "--devices", "2", "--epochs", "1", "--batch-size", "3", "--rank", "2",
           "--lr", "0.01", "--warmup-steps", "0", "--test-limit", "1", "--quiet", "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distributed_backend=gloo" in done.stdout + done.stderr

    reports = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]
    assert reports[0]["history"] == reports[1]["history"]  # same validation WER, same best epoch
    assert reports[0]["history"][-1]["step"] == 2  # each rank took its 2 of the 4 (padded) batches

    experts = [load_file(str(dump / f"rank{r}.safetensors")) for r in (0, 1)]
    assert experts[0].keys() == experts[1].keys() and experts[0]
    for key in experts[0]:
        assert torch.equal(experts[0][key], experts[1][key]), key
    assert all(experts[0][k].abs().sum() > 0 for k in experts[0] if k.endswith("lora_B"))  # it trained (B0 = 0)

    records = Registry(home / "registry").records()
    assert [r.ref for r in records] == ["uk-ddp@1"]  # stored once, by rank 0
    stored = Registry(home / "registry").get("uk-ddp@1")
    assert all(torch.equal(stored.tensors[k], experts[0][k]) for k in experts[0])
    assert stored.manifest["metrics"]["uk"]["test"]["n"] == 1  # rank 0 tested it
