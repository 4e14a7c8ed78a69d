"""The scheduler alone, with a fake pool: budgets, chunking, admission order, no starvation."""
import torch

from server.engine.scheduler import Scheduler
from server.engine.sequence import SamplingParams, Sequence


class FakePool:
    def __init__(self, n):
        self.num_total = n
        self.free_slots = list(range(n))

    def allocate(self):
        return self.free_slots.pop(0) if self.free_slots else None

    def free(self, slot):
        self.free_slots.append(slot)


def feed(batch):
    """A step ran. The scheduler booked what it does to each stream when it scheduled it: nothing to do here."""
    assert batch is not None


def test_chunks_respect_budget_and_carry_position():
    sched = Scheduler(FakePool(2), max_num_batched_tokens=8)
    long = Sequence(torch.arange(20))
    sched.add(long)
    starts = []
    while (batch := sched.schedule()) is not None:
        assert batch.num_tokens <= 8
        starts += [(c.start, c.num_tokens) for c in batch.chunks]
        feed(batch)
    assert starts == [(0, 8), (8, 8), (16, 4)]


def test_waiting_requests_queue_for_slots_in_order():
    pool = FakePool(2)
    sched = Scheduler(pool, max_num_batched_tokens=4)
    seqs = [Sequence(torch.arange(3)) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    assert [s.slot for s in seqs] == [0, 1, None, None]
    sched.finish(seqs[1], "done")
    sched.schedule()
    assert seqs[2].slot == 1 and seqs[3].slot is None
    for s in seqs[:1] + seqs[2:]:
        sched.finish(s, "done")
    assert sorted(pool.free_slots) == [0, 1]


def test_decodes_and_prefills_share_a_step_and_nobody_starves():
    sched = Scheduler(FakePool(4), max_num_batched_tokens=4)
    decoders = []
    for _ in range(3):
        s = Sequence(torch.zeros(0, dtype=torch.long), sampling=SamplingParams(max_tokens=100))
        s.pending_token = 1
        decoders.append(s)
        sched.add(s)
    long = Sequence(torch.arange(50))
    sched.add(long)
    for _ in range(10):
        batch = sched.schedule()
        kinds = {id(c.seq): c for c in batch.chunks}
        assert id(long) in kinds, "the prefill must get budget every step"
        assert batch.num_tokens <= 4
        feed(batch)
        for s in decoders:
            s.pending_token = 1
    assert long.num_fed == 10


def test_session_requests_skip_the_slot_queue():
    pool = FakePool(1)
    sched = Scheduler(pool, max_num_batched_tokens=4)
    a, b = Sequence(torch.arange(2)), Sequence(torch.arange(2))
    owned = Sequence(torch.arange(2), slot=7)
    for s in (a, b, owned):
        sched.add(s)
    batch = sched.schedule()
    assert {c.seq.slot for c in batch.chunks} == {0, 7}
    sched.finish(owned, "done")
    assert pool.free_slots == []  # a session's slot is not the request's to free


def test_prefill_only_steps_take_the_larger_budget_until_someone_decodes():
    sched = Scheduler(FakePool(2), max_num_batched_tokens=4, max_num_prefill_tokens=16)
    long = Sequence(torch.arange(40))
    sched.add(long)
    batch = sched.schedule()
    assert batch.num_tokens == 16  # nobody decodes: the big budget
    feed(batch)
    gen = Sequence(torch.arange(2), sampling=SamplingParams(max_tokens=4))
    sched.add(gen)
    while gen.num_fed < 2:
        feed(sched.schedule())
    gen.pending_token = 7  # gen now decodes: steps shrink back to the latency budget
    batch = sched.schedule()
    assert batch.num_tokens <= 4 and any(c.is_decode for c in batch.chunks)


def _decoders(sched, n):
    seqs = []
    for _ in range(n):
        s = Sequence(torch.zeros(0, dtype=torch.long), sampling=SamplingParams(max_tokens=100))
        s.pending_token = 1
        seqs.append(s)
        sched.add(s)
    return seqs


def _decode_again(decoders):
    for s in decoders:
        s.pending_token = 1


def test_small_prompts_wait_a_few_decode_steps_then_enter_together():
    sched = Scheduler(FakePool(8), max_num_batched_tokens=64, max_prefill_wait_steps=3)
    decoders = _decoders(sched, 4)
    feed(sched.schedule())  # decode-only: nothing waits yet
    _decode_again(decoders)
    prompts = []
    kinds = []
    for step in range(6):
        if step < 2:  # a new short prompt arrives on each of the first two steps
            prompts.append(Sequence(torch.arange(5)))
            sched.add(prompts[-1])
        batch = sched.schedule()
        assert sum(c.is_decode for c in batch.chunks) == 4, "decoders run every step"
        kinds.append(sorted(c.num_tokens for c in batch.chunks if not c.is_decode))
        feed(batch)
        _decode_again(decoders)
    assert kinds == [[], [], [], [5, 5], [], []]  # both prompts in one mixed step, after 3 decode-only steps
    assert all(p.num_fed == 5 for p in prompts)


def test_large_prefill_work_and_idle_batches_do_not_wait():
    sched = Scheduler(FakePool(8), max_num_batched_tokens=64, max_prefill_wait_steps=4)
    alone = Sequence(torch.arange(5))
    sched.add(alone)
    assert [c.num_tokens for c in sched.schedule().chunks] == [5], "nobody decodes: nothing to wait for"
    sched2 = Scheduler(FakePool(8), max_num_batched_tokens=64, max_prefill_wait_steps=4)
    decoders = _decoders(sched2, 2)
    feed(sched2.schedule())
    _decode_again(decoders)
    big = Sequence(torch.arange(40))  # at least half of what the step has left: in at once
    sched2.add(big)
    batch = sched2.schedule()
    assert [c.num_tokens for c in batch.chunks if c.seq is big] == [40]



def test_beside_decodes_short_prompts_go_in_graph_chunks_and_long_ones_whole():
    sched = Scheduler(FakePool(4), max_num_batched_tokens=2048)
    sched.graph_chunk = 64  # the runner replays mixed steps of chunks this short (server/engine/prefill_graphs.py)
    decoder = Sequence(torch.zeros(0, dtype=torch.long), sampling=SamplingParams(max_tokens=100))
    decoder.pending_token = 1
    short, long = Sequence(torch.arange(150)), Sequence(torch.arange(1000))
    for s in (decoder, short, long):
        sched.add(s)
    sizes = {id(short): [], id(long): []}
    while short.num_fed < 150 or long.num_fed < 1000:
        decoder.pending_token = 1  # as the sampler leaves it after every step
        batch = sched.schedule()
        assert batch.num_decodes == 1
        for c in batch.chunks[batch.num_decodes:]:
            sizes[id(c.seq)].append(c.num_tokens)
        feed(batch)
    assert sizes[id(short)] == [64, 64, 22]  # 150 <= 8 chunks of 64: split beside the decode
    assert sizes[id(long)] == [1000]  # longer: in whole, one eager step
    alone = Scheduler(FakePool(1), max_num_batched_tokens=2048)
    alone.graph_chunk = 64
    alone.add(Sequence(torch.arange(150)))
    assert [c.num_tokens for c in alone.schedule().chunks] == [150]  # nothing decodes: no reason to split


def test_prompts_that_go_in_graph_chunks_do_not_wait():
    def step_with_one_prompt(graph_chunk: int) -> int:
        sched = Scheduler(FakePool(4), max_num_batched_tokens=64, max_prefill_wait_steps=4)
        sched.graph_chunk = graph_chunk
        decoder = Sequence(torch.zeros(0, dtype=torch.long), sampling=SamplingParams(max_tokens=100))
        decoder.pending_token = 1
        sched.add(decoder)
        feed(sched.schedule())
        sched.add(Sequence(torch.arange(10)))
        decoder.pending_token = 1
        return len(sched.schedule().chunks)

    assert step_with_one_prompt(0) == 1  # mixed steps run eager: the prompt waits for company
    assert step_with_one_prompt(16) == 2  # its step replays a graph: it goes in at once


def test_a_prompt_longer_than_the_step_goes_in_long_graph_chunks_alone():
    sched = Scheduler(FakePool(4), max_num_batched_tokens=2048)
    sched.graph_chunk = 64
    sched.long_graph_chunk, sched.long_graph_max = 256, 2048  # the runner replays one sequence of 256k tokens
    decoder = Sequence(torch.zeros(0, dtype=torch.long), sampling=SamplingParams(max_tokens=100))
    decoder.pending_token = 1
    long, short = Sequence(torch.arange(5000)), Sequence(torch.arange(30))
    for s in (decoder, long, short):
        sched.add(s)
    steps = []
    while long.num_fed < 5000 or short.num_fed < 30:
        decoder.pending_token = 1
        batch = sched.schedule()
        steps.append([(c.seq is long, c.num_tokens) for c in batch.chunks[batch.num_decodes:]])
        feed(batch)
    # beside the decode 2047 tokens fit a step: cut to 1792, the step's only prompt; the short prompt goes next, in
    # graph chunks, with the long one waiting rather than sharing its step; the last 1416 end in their step and are
    # not cut (that would add a step)
    assert steps == [[(True, 1792)], [(False, 30)], [(True, 1792)], [(True, 1416)]]
    alone = Scheduler(FakePool(1), max_num_batched_tokens=2048)
    alone.long_graph_chunk, alone.long_graph_max = 256, 2048
    alone.add(Sequence(torch.arange(5000)))
    sizes = []
    while (batch := alone.schedule()) is not None:
        sizes.append(batch.chunks[0].num_tokens)
    assert sizes == [2048, 2048, 904]  # whole steps are a captured length already
    big = Scheduler(FakePool(1), max_num_batched_tokens=2048, max_num_prefill_tokens=65536)
    big.long_graph_chunk, big.long_graph_max = 256, 2048
    big.add(Sequence(torch.arange(100_000)))
    assert big.schedule().chunks[0].num_tokens == 65536  # past the graphs' lengths: one large eager step
