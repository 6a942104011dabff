"""Streaming reader: Batch contents, node x worker splitting, exact resume, resampled epochs, bad
samples skipped and counted across worker processes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from egma_fast.data.collate import Batch
from egma_fast.data.errors import DataError
from egma_fast.data.reader import make_loader
from egma_fast.data.sample import encode_sample
from egma_fast.data.shards import iter_shard_samples, shard_urls
from egma_fast.data.simple_tokenizer import build_word_tokenizer
from egma_fast.data.synthetic import FINDING_CLASSES, synthetic_vocabulary, write_synthetic_shards
from egma_fast.data.transforms import pad_resize_heatmaps

N_SAMPLES, PER_SHARD = 48, 6
KW = dict(image_size=40, heatmap_size=16, max_sentences=4, max_sentence_tokens=12)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(out, N_SAMPLES, seed=11, samples_per_shard=PER_SHARD, image_size=48,
                           gaze_fraction=0.6, progress=False)
    return out


@pytest.fixture(scope="module")
def stored(shards) -> dict:
    return {s.key: s for s in iter_shard_samples(shard_urls(shards))}


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(synthetic_vocabulary())


def _keys(loader) -> list[str]:
    return [k for b in loader for k in b.keys]


def test_batch_contents(shards, stored, tok):
    loader = make_loader(shards, tok, batch_size=5, num_workers=0, shuffle=False, **KW)
    batches = list(loader)
    assert sum(len(b) for b in batches) == N_SAMPLES
    for b in batches:
        assert isinstance(b, Batch)
        B = len(b)
        M = b.sentence_mask.shape[1]
        assert b.images.shape == (B, 3, 40, 40) and b.images.dtype == torch.float32
        assert b.sentence_input_ids.shape == (B, M, 12) and b.sentence_input_ids.dtype == torch.long
        assert b.sentence_attention_mask.shape == (B, M, 12) and b.sentence_attention_mask.dtype == torch.long
        assert b.heatmaps.shape == (B, M, 16, 16) and b.heatmaps.dtype == torch.float32
        assert b.has_gaze.dtype == torch.bool and b.sentence_mask.dtype == torch.bool
        assert b.labels.shape == (B, len(FINDING_CLASSES)) and b.class_index.dtype == torch.long
        assert M == max(len(s) for s in b.sentences) <= 4
        assert 0.0 <= float(b.heatmaps.min()) and float(b.heatmaps.max()) <= 1.0
        for i, key in enumerate(b.keys):
            src = stored[key]
            n = min(len(src.sentences), 4)
            assert b.sentences[i] == src.sentences[:n]
            assert b.sentence_mask[i].tolist() == [True] * n + [False] * (M - n)
            assert not b.sentence_input_ids[i, n:].any() and not b.sentence_attention_mask[i, n:].any()
            assert b.sentence_attention_mask[i, :n, 0].all()  # [CLS] of every real sentence
            ids = b.sentence_input_ids[i, 0][b.sentence_attention_mask[i, 0].bool()]
            assert tok.decode(ids, skip_special_tokens=True).replace(" .", ".").replace(" ,", ",") == \
                src.sentences[0].lower()
            assert bool(b.has_gaze[i]) == src.has_gaze
            if src.has_gaze:
                exp = pad_resize_heatmaps(torch.from_numpy(src.heatmaps[:n]), src.image.shape, 16).clamp(0, 1)
                torch.testing.assert_close(b.heatmaps[i, :n], exp)
                assert b.heatmaps[i, :n].amax(dim=(1, 2)).min() > 0.5
            else:
                assert not b.heatmaps[i].any()
            assert not b.heatmaps[i, n:].any()
            assert torch.equal(b.labels[i], torch.from_numpy(src.labels))
            assert int(b.class_index[i]) == src.class_index
            # grey repeated over 3 channels, ImageNet-normalised
            mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
            raw = b.images[i] * std + mean
            torch.testing.assert_close(raw[0], raw[1]) and torch.testing.assert_close(raw[1], raw[2])
    moved = batches[0].to("meta")
    assert moved.images.device.type == "meta" and moved.keys == batches[0].keys


def test_two_ranks_with_two_workers_see_disjoint_samples_covering_the_data(shards):
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(shards, None, batch_size=4, num_workers=2, rank=rank, world_size=2, seed=3, **KW)
        keys = _keys(loader)
        assert len(keys) == len(set(keys))
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {f"synth-11-{i:08d}" for i in range(N_SAMPLES)}
    # every (rank, worker) reads its own shards
    ds = make_loader(shards, None, batch_size=4, rank=1, world_size=2, **KW).gaze_dataset
    parts = [set(ds.worker_shards(w, 2)) for w in (0, 1)]
    assert not parts[0] & parts[1] and len(parts[0]) == len(parts[1]) == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly_after_the_last_batch(shards, num_workers):
    kw = dict(batch_size=4, num_workers=num_workers, seed=5, shuffle_buffer=8, **KW)
    full = [b.keys for b in make_loader(shards, None, **kw)]
    first = make_loader(shards, None, **kw)
    it = iter(first)
    head = [next(it).keys for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    del it
    resumed = make_loader(shards, None, **kw)
    resumed.load_state_dict(state)
    tail = [b.keys for b in resumed]
    assert head + tail == full
    assert resumed.epoch == 1 and resumed.state_dict()["positions"] == [[0, 0]] * max(1, num_workers)
    # the next epoch reshuffles: same samples, another order
    nxt = [k for b in resumed for k in b.keys]
    assert sorted(nxt) == sorted(k for ks in full for k in ks) and nxt != [k for ks in full for k in ks]
    # leaving a `for` loop early and looping again continues the epoch too
    again = make_loader(shards, None, **kw)
    got = []
    for i, b in enumerate(again):
        got.append(b.keys)
        if i == 2:
            break
    again.set_epoch(0)  # the current epoch: keeps the position
    got += [b.keys for b in again]
    assert got == full
    bad = dict(state, num_workers=7)
    with pytest.raises(ValueError, match="num_workers"):
        resumed.load_state_dict(bad)


def test_resampled_mode_has_a_set_epoch_length_and_is_keyed_by_seed_and_epoch(shards):
    kw = dict(batch_size=3, num_workers=2, resampled=True, epoch_batches=7, seed=9, shuffle_buffer=20, **KW)
    a = make_loader(shards, None, **kw)
    assert len(a) == 7
    e0 = [b.keys for b in a]
    e1 = [b.keys for b in a]
    assert len(e0) == 7 and all(len(k) == 3 for k in e0)
    assert e0 == [b.keys for b in make_loader(shards, None, **kw)]
    assert e0 != e1 and a.epoch == 2
    # resume mid-epoch in resampled mode
    b = make_loader(shards, None, **kw)
    it = iter(b)
    head = [next(it).keys for _ in range(3)]
    state = b.state_dict()
    del it
    c = make_loader(shards, None, **kw)
    c.load_state_dict(state)
    assert head + [x.keys for x in c] == e0


def _write_bad_shards(folder: Path, stored: dict) -> list[str]:
    import webdataset as wds

    samples = sorted(stored.values(), key=lambda s: s.key)[:12]
    enc = [encode_sample(s) for s in samples]
    enc[2]["png"] = enc[2]["png"][:30]            # truncated PNG
    enc[9]["sentences.json"] = b"[broken"          # bad JSON
    urls = []
    for i, chunk in enumerate((enc[:6], enc[6:])):
        p = folder / f"bad-{i}.tar"
        with wds.TarWriter(str(p)) as w:
            for e in chunk:
                w.write(e)
        urls.append(str(p))
    # a third shard cut in the middle of its data
    full = folder / "full.tar"
    with wds.TarWriter(str(full)) as w:
        for s in sorted(stored.values(), key=lambda s: s.key)[12:18]:
            w.write(encode_sample(s))
    data = full.read_bytes()
    full.unlink()
    p = folder / "bad-2.tar"
    p.write_bytes(data[: len(data) // 2 + 100])
    urls.append(str(p))
    return urls


def test_corrupt_samples_are_skipped_and_counted_per_worker(tmp_path, stored, caplog):
    urls = _write_bad_shards(tmp_path, stored)
    good = {s.key for s in sorted(stored.values(), key=lambda s: s.key)[:12]} - {
        sorted(stored)[2], sorted(stored)[9]}
    for nw in (0, 2):
        loader = make_loader(urls, None, batch_size=4, num_workers=nw, shuffle=False, **KW)
        keys = set(_keys(loader))
        assert good <= keys  # all intact samples of the intact shards came through
        assert sorted(stored)[2] not in keys and sorted(stored)[9] not in keys
        stats = loader.skip_stats()
        assert stats["total"]["sentences.json"] == 1
        # the truncated PNG, plus the sample the cut shard left without its png
        assert stats["total"]["png"] == 2 and stats["total"].get("tar", 0) >= 1
        assert stats["count"] == sum(stats["total"].values())
        assert loader.state_dict()["skipped"] == stats["per_shard"]
        assert set(stats["per_shard"]) == set(urls)  # every bad shard named
        if nw == 2:
            assert set(stats["per_worker"]) == {0, 1}
    assert "bad sample" in caplog.text


def test_pad_sentences_and_bad_arguments(shards):
    loader = make_loader(shards, None, batch_size=4, pad_sentences_to=6, shuffle=False, epoch_batches=2, **KW)
    b = next(iter(loader))
    assert b.sentence_mask.shape == (4, 6) and b.heatmaps.shape == (4, 6, 16, 16)
    assert b.sentence_input_ids.shape == (4, 6, 0)  # no tokenizer: L = 0
    assert len(list(loader)) == 1  # the rest of the epoch (one batch was taken above)
    assert len(list(loader)) == 2 and loader.epoch == 2
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(shards, None, batch_size=0)
    with pytest.raises(ValueError, match="epoch_batches"):
        make_loader(shards, None, batch_size=2, resampled=True)
    with pytest.raises(ValueError, match="rank"):
        make_loader(shards, None, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no shards"):
        make_loader([], None, batch_size=2)
    with pytest.warns(UserWarning, match="no shard"):
        make_loader(shard_urls(shards)[:3], None, batch_size=2, num_workers=2, world_size=2, rank=0)


def test_unreadable_shards_are_counted_and_fail_loudly_when_resampled(tmp_path, shards, stored):
    urls = []
    for i in range(2):
        p = tmp_path / f"garbage-{i}.tar"
        p.write_bytes(np.random.default_rng(i).bytes(3000))
        urls.append(str(p))
    finite = make_loader(urls, None, batch_size=2, **KW)
    with pytest.raises(DataError, match="no readable sample"):
        list(finite)
    assert finite.skip_stats()["total"] == {"tar": 2}
    assert set(finite.skip_stats()["per_shard"]) == set(urls)
    endless = make_loader(urls, None, batch_size=2, resampled=True, epoch_batches=2, **KW)
    with pytest.raises(DataError, match="consecutive"):
        list(endless)
    # a sample whose label vector has another length than the stream's is skipped, not fatal
    import webdataset as wds

    good = sorted(stored.values(), key=lambda s: s.key)[:3]
    enc = [encode_sample(s) for s in good]
    enc[1]["labels.json"] = b"[1.0, 0.0]"
    with wds.TarWriter(str(tmp_path / "labels.tar")) as w:
        for e in enc:
            w.write(e)
    loader = make_loader([str(tmp_path / "labels.tar")], None, batch_size=4, shuffle=False, **KW)
    assert [k for b in loader for k in b.keys] == [good[0].key, good[2].key]
    assert loader.skip_stats()["total"] == {"labels.json": 1}


def test_options_object_and_keywords_give_the_same_loader(shards):
    from egma_fast.data.options import LoaderOptions

    options = LoaderOptions(batch_size=4, shuffle=True, shuffle_buffer=8, seed=5, **KW)
    a = [b.keys for b in make_loader(shards, None, options)]
    b = [b.keys for b in make_loader(shards, None, batch_size=4, shuffle=True, shuffle_buffer=8, seed=5, **KW)]
    c = [b.keys for b in make_loader(shards, None, options.replace(seed=6))]
    assert a == b and a != c
    with pytest.raises(ValueError, match="unknown loader option"):
        make_loader(shards, None, options, batch_sise=3)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(shards, None, shuffle=False)
