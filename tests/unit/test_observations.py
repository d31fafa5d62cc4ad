"""Observations: recorded chunk by chunk by every prefill row, kept per prompt, bounded."""

import torch

from casakv_vllm.observe.record import plan_record
from casakv_vllm.observe.store import ObservationStore, PromptObservations
from casakv_vllm.ops.probs import attention_probs, group_sum

H, HKV, D = 6, 2, 16
SCALE = D ** -0.5


def test_chunked_recording_matches_one_shot(observed):
    q, k, whole = observed(150, col_sums=True)
    _, _, parts = observed(150, chunks=(0.3, 0.5, 0.97, 1.0), col_sums=True)
    a, b = whole.layer(0), parts.layer(0)
    assert a.window_complete and b.window_complete
    torch.testing.assert_close(a.window_q, b.window_q)
    torch.testing.assert_close(b.window_q, q[:, -64:])
    direct = group_sum(attention_probs(q, k, 0, SCALE), HKV).sum(1)
    torch.testing.assert_close(b.col_sums, direct, rtol=1e-4, atol=1e-4)
    assert b.col_rows == 150
    torch.testing.assert_close(direct.sum(1), torch.full((HKV,), 150.0 * H / HKV), rtol=1e-4, atol=1e-3)


def test_plan_marks_only_the_window_rows_a_chunk_covers():
    obs = PromptObservations(200)
    assert plan_record(obs, 0, 0, 0, 100, False) is None  # rows 0..99: before the 64-row window
    job = plan_record(obs, 3, 40, 100, 120, False)  # rows 100..199; the batch's tokens 40..159
    assert (job.row, job.win_src, job.win_dst, job.win_n) == (3, 36, 0, 64)
    assert obs.window_seen == [True] * 64 and not job.col_sums
    # column sums only continue from where they stopped (a prefix-cache hit cannot add them)
    assert plan_record(PromptObservations(200), 0, 0, 50, 150, True).col_sums is False


def test_store_is_bounded_by_bytes_and_keeps_the_newest():
    store = ObservationStore(max_bytes=3 * 64 * 4 * 4)  # three prompts of one [1, 64, 4] fp32 layer
    for i in range(5):
        obs = store.get(f"p{i}", 100)
        obs.window_buffer(0, torch.zeros(1, 1, 4))
        store.trim()
    assert len(store) == 3 and store.peek("p0", 100) is None and store.peek("p4", 100) is not None
    assert store.get("p4", 100) is store.get("p4", 100)
    assert store.get("p4", 101).prompt_len == 101  # same key, other length: a new record


def test_a_policys_notes_count_towards_the_stores_bound():
    obs = PromptObservations(100)
    before = obs.nbytes
    obs.notes[("casakv", 0)] = (torch.zeros(3, 10), torch.zeros(5, dtype=torch.int64))
    assert obs.nbytes == before + 3 * 10 * 4 + 5 * 8
