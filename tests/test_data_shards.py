"""Shard writer: written-then-read round trip, sizes.json, shards from canonical records, bad
samples skipped and counted."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from egma_fast.data.sample import GazeSample, SampleDecodeError, decode_sample, encode_sample, sanitize_key
from egma_fast.data.shards import iter_shard_samples, read_sizes, shard_urls, write_samples, write_shards_from_records
from egma_fast.gaze.egd_cxr import read_egd_cxr
from egma_fast.gaze.heatmaps import sentence_heatmaps

FIX = Path(__file__).parent / "fixtures" / "gaze"


def _samples(n: int, seed: int = 0) -> list[GazeSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        H, W = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        S = int(rng.integers(1, 5))
        gaze = i % 3 != 0
        hm = rng.integers(0, 256, size=(S, 9, 13)).astype(np.float32) / 255.0 if gaze else None
        out.append(GazeSample(
            key=f"s{i:03d}.v1",  # the dot is sanitised away
            image=rng.integers(0, 256, size=(H, W), dtype=np.uint8),
            sentences=[f"sentence {j} of {i}, with {{json}} \"chars\"." for j in range(S)],
            heatmaps=hm,
            labels=(rng.random(4) < 0.5).astype(np.float32),
            class_index=int(rng.integers(-1, 4)),
            meta={"source": "test", "i": i},
        ))
    return out


def test_written_then_read_round_trip_is_identical(tmp_path):
    samples = _samples(11)
    res = write_samples(samples, tmp_path, samples_per_shard=4, progress=False, info={"classes": list("abcd")})
    assert res["shards"] == {"shard-000000.tar": 4, "shard-000001.tar": 4, "shard-000002.tar": 3}
    assert res["total"] == 11 and res["pattern"].endswith("shard-{000000..000002}.tar")
    sizes = read_sizes(tmp_path)
    assert sizes == {"shards": res["shards"], "total": 11, "info": {"classes": list("abcd")}}
    assert shard_urls(tmp_path) == res["urls"]
    back = list(iter_shard_samples(res["urls"]))
    assert len(back) == len(samples)
    for a, b in zip(samples, back):
        assert b.key == sanitize_key(a.key) == a.key.replace(".", "_")
        assert np.array_equal(a.image, b.image) and b.image.dtype == np.uint8
        assert b.sentences == a.sentences
        if a.heatmaps is None:
            assert b.heatmaps is None and b.meta["has_gaze"] is False
        else:  # uint8 quantisation is exact for multiples of 1/255
            np.testing.assert_array_equal(b.heatmaps, a.heatmaps)
        assert np.array_equal(a.labels, b.labels) and a.class_index == b.class_index
        assert b.meta["source"] == "test" and b.meta["i"] == a.meta["i"]
        assert b.meta["image_size"] == list(a.image.shape)
    # the same samples give byte-identical shards
    res2 = write_samples(samples, tmp_path / "again", samples_per_shard=4, progress=False, info={"classes": list("abcd")})
    for u, v in zip(res["urls"], res2["urls"]):
        assert Path(u).read_bytes() == Path(v).read_bytes()


def test_quantisation_error_is_bounded_and_duplicate_keys_rejected(tmp_path):
    s = _samples(1, seed=3)[0]
    s.heatmaps = np.random.default_rng(0).random((len(s.sentences), 5, 5)).astype(np.float32)
    back = decode_sample(encode_sample(s))
    assert np.abs(back.heatmaps - s.heatmaps).max() <= 0.5 / 255 + 1e-7
    with pytest.raises(ValueError, match="duplicate key"):
        write_samples([s, s], tmp_path, progress=False)
    with pytest.raises(ValueError, match="heatmaps"):
        encode_sample(GazeSample("k", s.image, ["a"], np.zeros((2, 3, 3), np.float32)))


def test_decode_errors_name_the_member():
    good = encode_sample(_samples(2)[1])
    cases = {
        "png": dict(good, png=good["png"][: len(good["png"]) // 2]),
        "sentences.json": dict(good, **{"sentences.json": b"[\"unterminated"}),
        "meta.json": dict(good, **{"meta.json": b"[1, 2]"}),
        "heatmaps.npz": dict(good, **{"heatmaps.npz": b"not a zip"}),
        "cls": dict(good, cls=b"x"),
    }
    for field, raw in cases.items():
        with pytest.raises(SampleDecodeError) as e:
            decode_sample(raw)
        assert e.value.field == field
    missing = dict(good)
    del missing["png"]
    with pytest.raises(SampleDecodeError, match="png: missing"):
        decode_sample(missing)


def test_bad_samples_in_a_shard_are_skipped_and_counted(tmp_path, caplog):
    import webdataset as wds

    samples = _samples(6)
    encoded = [encode_sample(s) for s in samples]
    encoded[1]["png"] = encoded[1]["png"][:40]                       # truncated PNG
    encoded[2]["sentences.json"] = b"{not json"                        # bad JSON
    encoded[4]["sentences.json"] = json.dumps(["only one"]).encode()   # heatmaps no longer match
    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:
        for e in encoded:
            w.write(e)
    skipped = Counter()
    back = list(iter_shard_samples([tmp_path / "bad.tar"], skipped))
    assert [b.key for b in back] == [samples[i].key.replace(".", "_") for i in (0, 3, 5)]
    assert dict(skipped) == {"png": 1, "sentences.json": 1, "heatmaps.npz": 1}
    assert "bad sample" in caplog.text


def test_shards_from_canonical_records(tmp_path):
    readings, _ = read_egd_cxr(FIX / "egd_cxr", image_root=FIX / "egd_cxr" / "images",
                               image_sizes={"aaaa1111-0000-0000-0000-000000000001": (200, 300)})
    # reading A has no image file: skipped and counted; reading B is written
    res = write_shards_from_records(readings, tmp_path, class_names=["Normal", "CHF", "pneumonia"],
                                    heatmap_max_side=40, progress=False)
    assert res["total"] == 1 and res["info"]["skipped"] == {"image_unreadable": 1}
    assert read_sizes(tmp_path)["info"]["skipped"] == {"image_unreadable": 1}
    (s,) = list(iter_shard_samples(res["urls"]))
    b = readings[1]
    assert s.key == "egd-cxr-bbbb2222-0000-0000-0000-000000000002"
    assert s.image.shape == (200, 100) and s.sentences == ["Lungs are clear."]
    expected = sentence_heatmaps(b, max_side=40).heatmaps
    assert s.heatmaps.shape == (1, 40, 20)
    assert np.abs(s.heatmaps - expected).max() <= 0.5 / 255 + 1e-6
    assert s.labels.tolist() == [1.0, 0.0, 0.0] and s.class_index == 0
    assert s.meta["reading_id"] == b.reading_id and s.meta["fallback"] == [False]
