"""Checkpoints: exact round trips, atomic replacement, damaged files, incompatible configs."""

import json
import logging

import numpy as np
import pytest
from recstream.embeddings.model import MFConfig
from recstream.stream.checkpoint import FORMAT_VERSION, CheckpointStore, IncompatibleCheckpoint
from recstream.stream.config import EventsConfig
from recstream.stream.events import EventDecoder
from recstream.stream.state import RecState
from recstream.stream.synthetic import SyntheticClickstream

CFG = MFConfig(dim=8, seed=7)


def _batches(n_batches=6, size=2000, seed=0):
    gen = SyntheticClickstream(n_users=300, n_items=200, seed=seed)
    decoder = EventDecoder(EventsConfig())
    out = []
    for _ in range(n_batches):
        batch, bad = decoder.decode([v for _, v in gen.events(size).messages()])
        assert not bad
        out.append(batch)
    return out


def _assert_same_model(a: RecState, b: RecState):
    for (name, x), (_, y) in zip(sorted(a.model.state_arrays().items()), sorted(b.model.state_arrays().items())):
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.model.users.ids.ids == b.model.users.ids.ids and a.model.items.ids.ids == b.model.items.ids.ids


@pytest.mark.parametrize("config", [CFG, MFConfig(dim=8, seed=7, negative_pool=500)], ids=["ring-filling", "ring-wrapped"])
def test_restore_then_continue_equals_uninterrupted(tmp_path, config):
    batches = _batches()
    store = CheckpointStore(tmp_path)
    whole = RecState(config)
    for b in batches:
        whole.apply(b, "t", np.zeros(len(b), dtype=np.int64))
    part = RecState(config)
    for b in batches[:3]:
        part.apply(b, "t", np.zeros(len(b), dtype=np.int64))
    part.advance({"t/0": 6000})
    part.save(store)
    resumed = RecState.restore(store.load_latest(), config)
    assert resumed.positions == {"t/0": 6000} and resumed.applied == {"t/0": 6000}
    assert [list(resumed.history.items_of(u)) for u in range(50)] == [list(part.history.items_of(u)) for u in range(50)]
    for b in batches[3:]:
        resumed.apply(b, "t", np.zeros(len(b), dtype=np.int64))
    _assert_same_model(whole, resumed)
    np.testing.assert_array_equal(whole.model.ranking_biases(), resumed.model.ranking_biases())
    assert resumed.applied == {"t/0": 12000}


@pytest.mark.parametrize("where", [0.5, 0.02, 0.98])  # in an array's data, near the start, near the end
def test_keeps_the_newest_two_and_falls_back_when_the_newest_is_damaged(tmp_path, caplog, where):
    store = CheckpointStore(tmp_path, keep=2)
    state = RecState(CFG)
    for n, b in enumerate(_batches(3)):
        state.apply(b)
        state.advance({"t/0": n + 1})
        store_path = state.save(store)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000000002.json", "ckpt-000000000002.npz", "ckpt-000000000003.json", "ckpt-000000000003.npz"]
    data = store_path.with_suffix(".npz")
    raw = bytearray(data.read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF  # one flipped byte
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR):
        restored = store.load_latest()
    assert restored.meta["seq"] == 2 and restored.meta["positions"] == {"t/0": 2}
    assert "ckpt-000000000003.json is damaged (" in caplog.text and "falling back" in caplog.text


def test_a_checkpoint_written_with_a_sha256_is_still_checked_by_it(tmp_path, caplog):
    from recstream.stream.checkpoint import _sha256

    store = CheckpointStore(tmp_path)
    state = RecState(CFG)
    state.apply(_batches(1)[0])
    meta_path = state.save(store)
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "sha256": _sha256(meta_path.with_suffix(".npz"))}))
    assert store.load_latest().path == meta_path
    meta_path.write_text(json.dumps({**meta, "sha256": "0" * 64}))
    with caplog.at_level(logging.ERROR):
        assert store.load_latest() is None
    assert "damaged (checksum mismatch)" in caplog.text


def test_truncated_and_half_written_checkpoints_are_skipped(tmp_path):
    store = CheckpointStore(tmp_path)
    state = RecState(CFG)
    state.apply(_batches(1)[0])
    first = state.save(store)
    second = state.save(store)
    second.with_suffix(".npz").write_bytes(second.with_suffix(".npz").read_bytes()[:1000])  # truncated
    (tmp_path / "ckpt-000000000009.npz.tmp").write_bytes(b"partial")  # a crash mid-write leaves only a temp file
    assert store.load_latest().path == first
    second.with_suffix(".npz").unlink()
    first.write_text("{not json")
    assert store.load_latest() is None


def test_incompatible_dimension_stops_with_what_differs(tmp_path):
    store = CheckpointStore(tmp_path)
    state = RecState(CFG)
    state.apply(_batches(1)[0])
    state.save(store)
    with pytest.raises(IncompatibleCheckpoint, match=r"model.dim: config has 16, checkpoint has 8"):
        RecState.load_or_new(store, MFConfig(dim=16, seed=7))


def test_a_checkpoint_of_a_newer_format_stops_start_up_instead_of_being_misread(tmp_path):
    store = CheckpointStore(tmp_path)
    state = RecState(CFG)
    state.apply(_batches(1)[0])
    meta_path = state.save(store)
    assert RecState.load_or_new(store, CFG).model.events_applied == state.model.events_applied  # this format: read
    meta = json.loads(meta_path.read_text())
    meta["format"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IncompatibleCheckpoint, match=rf"has format {FORMAT_VERSION + 1}; this recstream reads format"):
        RecState.load_or_new(store, CFG)
