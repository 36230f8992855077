"""The engine's scheduling rules (``runtime/scheduler.py``), without any graph: slots, admission, prefix choice, the
prefill budget, the prompt's last token riding the decode step, cancellation, solo requests, queue room."""

from __future__ import annotations

import edgeroute as er
import numpy as np
import pytest
from edgeroute.request import Request
from edgeroute.scheduler import Plan, Running, Scheduler


class Tokens:
    """What the scheduler reads of a sequence: its ids and how many there are (the engine's is a TokenSequence)."""

    def __init__(self, prompt: list[int], capacity: int = 64) -> None:
        self.ids = np.zeros(capacity, np.int64)
        self.ids[: len(prompt)] = prompt
        self.n = len(prompt)

    def generate(self, token: int) -> None:
        self.ids[self.n] = token
        self.n += 1


def request(prompt: list[int], solo: bool = False, config: er.GenerationConfig | None = None) -> Request:
    r = Request(0, prompt, config or er.GenerationConfig(), er.Flows())
    if not solo:
        r._sequence = Tokens(prompt)  # type: ignore[assignment]
    return r


def scheduler(max_batch: int = 3, max_queue: int = 4, budget: int = 64, reuse: bool = True) -> Scheduler:
    return Scheduler(max_batch, max_queue, budget, reuse, context=64, batched=True)


def slots_of(plan: Plan) -> list[tuple[int, int]]:
    return [(run.slot.index, reused) for run, reused in plan.started]


def decoded(s: Scheduler, plan: Plan, token: int = 7) -> None:
    """What the engine does after the decode run: each decoding row fed its token, then chose the next."""
    for run in plan.decode:
        run.fed += 1
        run.seq.generate(token)  # type: ignore[attr-defined]


def test_admission_in_order_into_the_lowest_free_slots_then_the_queue_waits() -> None:
    s = scheduler(max_batch=2)
    a, b, c = request([1, 2]), request([3, 4]), request([5, 6])
    s.enqueue([a, b, c])
    plan = s.schedule()
    assert slots_of(plan) == [(0, 0), (1, 0)] and list(s.queue) == [c]
    assert [r.request for r in s.running()] == [a, b]
    s.release(s.slots[0].running, failed=False)  # type: ignore[arg-type]
    assert slots_of(s.schedule()) == [(0, 0)] and not s.queue


def test_a_prompt_sharing_a_free_slots_cached_prefix_takes_that_slot_and_reuses_it() -> None:
    s = scheduler()
    for slot, held in ((0, [9, 9, 9]), (1, [1, 2, 3, 4]), (2, [1, 2])):
        s.slots[slot].tokens[: len(held)] = held
        s.slots[slot].held = len(held)
    s.enqueue([request([1, 2, 3, 8, 8])])
    plan = s.schedule()
    assert slots_of(plan) == [(1, 3)]  # the longest shared prefix wins, and its positions are not prefilled
    assert [(c.run.slot.index, c.start, c.stop) for c in plan.prefill] == [(1, 3, 4)]  # not the last token


def test_a_fully_cached_prompt_still_feeds_its_last_token_in_the_decode_step() -> None:
    s = scheduler()
    s.slots[2].tokens[:4] = [1, 2, 3, 4]
    s.slots[2].held = 4
    s.enqueue([request([1, 2, 3, 4])])
    plan = s.schedule()
    assert slots_of(plan) == [(2, 3)] and not plan.prefill
    assert [r.slot.index for r in plan.decode] == [2]


def test_without_prefix_reuse_the_lowest_free_slot_and_nothing_reused() -> None:
    s = scheduler(reuse=False)
    s.slots[1].tokens[:3] = [1, 2, 3]
    s.slots[1].held = 3
    s.enqueue([request([1, 2, 3, 4])])
    assert slots_of(s.schedule()) == [(0, 0)]


def test_the_prefill_budget_chunks_prompts_in_slot_order_and_never_takes_a_last_token() -> None:
    s = scheduler(budget=8)
    s.enqueue([request(list(range(1, 11))), request(list(range(20, 26)))])  # 10 and 6 tokens
    plan = s.schedule()
    assert [(c.run.slot.index, c.start, c.stop) for c in plan.prefill] == [(0, 0, 8)]
    assert plan.decode == []  # nobody has exactly one token left
    plan = s.schedule()
    assert [(c.run.slot.index, c.start, c.stop) for c in plan.prefill] == [(0, 8, 9), (1, 0, 5)]
    assert [r.slot.index for r in plan.decode] == [0, 1]  # both prompts' last tokens ride one decode step
    decoded(s, plan)
    plan = s.schedule()
    assert not plan.prefill and [r.slot.index for r in plan.decode] == [0, 1]


def test_a_new_prompt_joins_running_rows_in_the_next_decode_step() -> None:
    s = scheduler(budget=4)
    s.enqueue([request([1, 2])])
    decoded(s, s.schedule())
    s.enqueue([request([5, 6, 7])])
    plan = s.schedule()
    assert [(c.run.slot.index, c.start, c.stop) for c in plan.prefill] == [(1, 0, 2)]
    assert [r.slot.index for r in plan.decode] == [0, 1]


def test_cancelled_requests_leave_first_and_their_rows_stay_cached() -> None:
    s = scheduler(max_batch=1)
    running, queued = request([1, 2, 3]), request([4, 5])
    s.enqueue([running, queued])
    decoded(s, s.schedule())
    running.cancel()
    queued.cancel()
    plan = s.schedule()
    assert [r.request for r in plan.cancelled] == [running] and plan.cancelled_queued == [queued]
    assert s.slots[0].held == 3 and s.slots[0].tokens[:3].tolist() == [1, 2, 3]  # what the row holds
    assert not s.running() and not s.queue


def test_a_failed_run_leaves_nothing_to_reuse() -> None:
    s = scheduler()
    s.enqueue([request([1, 2, 3])])
    run: Running = s.schedule().started[0][0]
    assert s.release(run, failed=True) == 0 and s.slots[0].held == 0 and s.slots[0].running is None


def test_solo_requests_run_at_most_max_batch_at_once_in_submission_order() -> None:
    s = scheduler(max_batch=2)
    solos = [request([1], solo=True) for _ in range(3)]
    batched = request([2, 3])
    s.enqueue([*solos, batched])
    plan = s.schedule()
    assert plan.started_solo == solos[:2] and plan.solo == solos[:2] and list(s.queue) == [solos[2], batched]
    s.solo.remove(solos[0])  # one ended
    plan = s.schedule()
    assert plan.started_solo == [solos[2]] and slots_of(plan) == [(0, 0)]


@pytest.mark.parametrize(("queued", "ask", "room"), [(0, 4, None), (2, 2, None), (2, 3, 2), (5, 1, 5)])
def test_queue_room_counts_what_the_next_admission_leaves_waiting(queued: int, ask: int, room: int | None) -> None:
    s = scheduler(max_batch=1, max_queue=4)
    s.enqueue([request([1])])
    s.schedule()  # the one slot is taken
    s.enqueue([request([1]) for _ in range(queued)])
    assert s.room(ask) == room


def test_a_scored_prompt_is_prefilled_whole_reuses_nothing_then_decodes() -> None:
    """``prompt_logprobs``: no cached prefix is reused (a reused position has no logits to score), the prefill takes
    the prompt's last token too (in the budget's chunks), the request is not in that iteration's decode step (the
    engine chooses its first token from the prefill's last logits), and its generated tokens decode as usual."""
    s = scheduler(budget=4)
    first = request([1, 2, 3, 4, 5])
    s.enqueue([first])
    plan = s.schedule()
    for _ in range(2):
        plan = s.schedule()
        decoded(s, plan)
    s.release(s.slots[0].running, failed=False)  # type: ignore[arg-type]
    scored = request([1, 2, 3, 4, 5, 6], config=er.GenerationConfig(prompt_logprobs=1))
    s.enqueue([scored])
    plan = s.schedule()
    assert slots_of(plan) == [(0, 0)]  # the slot holding [1..5] is taken, nothing reused
    assert [(c.start, c.stop) for c in plan.prefill] == [(0, 4)] and not plan.decode
    plan = s.schedule()
    assert [(c.start, c.stop) for c in plan.prefill] == [(4, 6)] and not plan.decode  # the last token too
    run = s.slots[0].running
    assert run is not None and run.fed == 6
    run.seq.generate(9)  # type: ignore[attr-defined]  (the engine's choice from the prefill's logits)
    plan = s.schedule()
    assert not plan.prefill and plan.decode == [run]


def test_the_idle_budget_applies_while_no_request_generates_and_scored_chunks_are_bounded() -> None:
    """While no request is generating (nothing streams, so a long chunk stalls no one) the prefill takes
    ``idle_budget`` tokens; once a request decodes, ``prefill_budget`` again; a scored prompt's chunks (every
    position's logits kept) never exceed ``scored_chunk``."""
    s = Scheduler(3, 4, 4, True, context=64, batched=True, idle_budget=10, scored_chunk=3)
    s.enqueue([request(list(range(1, 16)))])  # 15 tokens
    plan = s.schedule()
    assert [(c.start, c.stop) for c in plan.prefill] == [(0, 10)]  # idle: 10, not 4
    plan = s.schedule()
    assert [(c.start, c.stop) for c in plan.prefill] == [(10, 14)] and plan.decode
    decoded(s, plan)
    s.enqueue([request(list(range(30, 45)))])
    plan = s.schedule()
    assert [(c.run.slot.index, c.start, c.stop) for c in plan.prefill] == [(1, 0, 4)]  # slot 0 generates: 4
    s.release(s.slots[0].running, failed=False)  # type: ignore[arg-type]
    s.release(s.slots[1].running, failed=False)  # type: ignore[arg-type]
    s.enqueue([request(list(range(50, 60)), config=er.GenerationConfig(prompt_logprobs=1))])
    plan = s.schedule()
    assert [(c.start, c.stop) for c in plan.prefill] == [(0, 3)]  # idle, but scored: 3
    for _ in range(3):
        plan = s.schedule()
    scored = s.slots[0].running
    assert scored is not None and scored.fed == 10 and not plan.decode  # prefilled whole, last token included
    scored.seq.generate(9)  # type: ignore[attr-defined]  (its first token: from now on it generates)
    s.enqueue([request(list(range(70, 85)))])
    plan = s.schedule()
    assert [(c.run.slot.index, c.start, c.stop) for c in plan.prefill] == [(1, 0, 4)]  # a scored stream: 4


def test_chunks_of_neighbouring_slots_share_a_run_on_a_ragged_graph() -> None:
    """``prefill_runs``: one run per chunk unless the graph runs ragged rows; then neighbouring chunks share a run
    while they are all scored or all not, the run's rows times its longest chunk stay within twice its tokens (a
    slot between them counts as a row), and a scored run keeps at most ``scored_positions`` positions' logits."""
    from edgeroute.scheduler import Chunk, Slot, prefill_runs

    def chunk(slot: int, n: int, scored: bool = False) -> Chunk:
        config = er.GenerationConfig(prompt_logprobs=1) if scored else None
        r = request(list(range(1, n + 2)), config=config)
        run = Running(r, Slot(slot, np.zeros(64, np.int64)), r._sequence, 0)  # type: ignore[arg-type]
        return Chunk(run, 0, n)

    def shape(runs: list[list[Chunk]]) -> list[list[int]]:
        return [[c.run.slot.index for c in run] for run in runs]

    plain = [chunk(0, 8), chunk(1, 6), chunk(2, 7)]
    assert shape(prefill_runs(plain, ragged=False)) == [[0], [1], [2]]
    assert shape(prefill_runs(plain, ragged=True)) == [[0, 1, 2]]
    mixed = [chunk(0, 8), chunk(1, 6, scored=True), chunk(2, 7, scored=True), chunk(3, 5)]
    assert shape(prefill_runs(mixed, ragged=True)) == [[0], [1, 2], [3]]
    assert shape(prefill_runs(mixed, ragged=True, scored_positions=13)) == [[0], [1], [2], [3]]  # 2 x 7 > 13
    padded = [chunk(0, 20), chunk(2, 2), chunk(3, 2)]  # slots 0-2: 3 x 20 > 2 x 22; slots 2-3: 2 x 2 <= 2 x 4
    assert shape(prefill_runs(padded, ragged=True)) == [[0], [2, 3]]
    assert prefill_runs([], ragged=True) == []
    s = Scheduler(3, 4, 64, False, context=64, batched=True, ragged=True)
    s.enqueue([request([1, 2, 3, 4, 5]), request([6, 7, 8, 9]), request([10, 11, 12, 13, 14, 15])])
    plan = s.schedule()
    runs = [[(c.run.slot.index, c.start, c.stop) for c in run] for run in plan.runs]
    assert runs == [[(0, 0, 4), (1, 0, 3), (2, 0, 5)]]  # every prompt but its last token, in one run
