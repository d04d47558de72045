"""Seeded fuzz of the batch bookkeeping, driven the way vLLM's V1 InputBatch drives it.

A plain list (row -> request id) is the ground truth. Each step removes rows (finish or
preemption), adds requests into the lowest holes or at the end (new ones and re-admitted
preempted ones, carrying their output so far), condenses by one-way moves from the end into
holes, and swaps random rows; the resulting BatchUpdate, built with vLLM's own classes, goes to
RowTable. After every step: the table holds exactly the VAS requests at their rows, slots are
unique and none leaks, and the runtime's values for every row equal a full forward of that
request's history.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality

from fp_bounds import assert_within
from value_reference import RUNTIME_SLACK, Float64ValueModel, make_tiny_value_model
from vas_vllm.batch_state import RowTable
from vas_vllm.runtime import ValueRuntime

VOCAB = 101


@dataclass
class Entry:
    req_id: int
    slot: int
    prompt: list[int]
    output: list[int]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    make_tiny_value_model(folder, seed=11, layers=1, hidden=32, heads=2, kv_heads=1)
    return folder, Float64ValueModel(folder)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuzz_add_remove_move_swap_against_plain_list(tiny, seed):
    folder, model = tiny
    rng = random.Random(seed)
    rt = ValueRuntime.from_pretrained(folder, max_slots=12, max_len=400, max_candidates=4)
    released: dict[int, int] = {}
    admitted: dict[int, int] = {}

    def release(e: Entry) -> None:
        released[e.req_id] = released.get(e.req_id, 0) + 1
        rt.release(e.slot)

    table: RowTable[Entry] = RowTable(release)
    batch: list[int | None] = []           # ground truth: row -> request id
    requests: dict[int, tuple[SamplingParams, list[int], list[int]]] = {}
    preempted: list[int] = []
    next_id, checked_rows = 0, 0

    def make(params, prompt, output):
        if not params.extra_args.get("vas"):
            return None
        req_id = params.extra_args["id"]
        admitted[req_id] = admitted.get(req_id, 0) + 1
        return Entry(req_id, rt.allocate(), prompt, output)

    for step in range(300):
        removed, added, moved = [], [], []
        for row, req in enumerate(batch):
            if req is not None and rng.random() < 0.12:
                batch[row] = None
                removed.append(row)
                if rng.random() < 0.5:
                    preempted.append(req)  # comes back later with its output so far
        holes = sorted(r for r, req in enumerate(batch) if req is None)
        for _ in range(rng.randrange(0, 4)):
            live_vas = sum(1 for r in batch if r is not None and requests[r][0].extra_args["vas"])
            if preempted and rng.random() < 0.5:
                req = preempted.pop(rng.randrange(len(preempted)))
            else:
                req, next_id = next_id, next_id + 1
                vas = rng.random() < 0.7 and live_vas < 10
                prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))]
                requests[req] = (SamplingParams(extra_args={"vas": vas, "id": req}), prompt, [])
            if requests[req][0].extra_args["vas"] and live_vas >= 10:
                preempted.append(req)  # keep within the cache's slots, like a scheduler would
                continue
            row = holes.pop(0) if holes else len(batch)
            if row == len(batch):
                batch.append(None)
            removed = [r for r in removed if r != row]  # vLLM pops a reused row from `removed`
            batch[row] = req
            params, prompt, output = requests[req]
            added.append((row, params, prompt, output))
        while holes:  # condense: move the last live row into the lowest hole
            while batch and batch[-1] is None:
                batch.pop()
            hole = holes.pop(0)
            if hole >= len(batch):
                break
            batch[hole], batch[-1] = batch[-1], None
            moved.append((len(batch) - 1, hole, MoveDirectionality.UNIDIRECTIONAL))
            batch.pop()
        holes_left = [r for r, req in enumerate(batch) if req is None]
        assert not holes_left, f"simulator left holes {holes_left}"
        for _ in range(rng.randrange(0, 3)):
            if len(batch) >= 2:
                a, b = rng.sample(range(len(batch)), 2)
                batch[a], batch[b] = batch[b], batch[a]
                moved.append((a, b, MoveDirectionality.SWAP))
        update = BatchUpdate(batch_size=len(batch), removed=removed, added=added, moved=moved)
        table.apply(update if (removed or added or moved) else None, make)

        # Books against the ground truth.
        expect = {row: req for row, req in enumerate(batch) if requests[req][0].extra_args["vas"]}
        got = {row: e.req_id for row, e in table.items()}
        assert got == expect, f"step {step}: table {got} != batch {expect}"
        slots = [e.slot for _, e in table.items()]
        assert len(set(slots)) == len(slots), f"step {step}: a slot is shared: {slots}"
        assert set(slots) == set(rt.cache.used_slots), (
            f"step {step}: slots leaked or lost: table {sorted(slots)} vs allocated {sorted(rt.cache.used_slots)}")

        # Values for every VAS row, in row order, against the reference.
        rows = [e for _, e in table.items()]
        if rows:
            hists = [e.prompt + e.output for e in rows]
            cands = torch.tensor([rng.sample(range(VOCAB), 4) for _ in rows])
            values = rt.score([e.slot for e in rows], hists, cands)
            for b, e in enumerate(rows):
                if rng.random() < 0.12:   # float64, within the float32 bound of that computation (~270 rows)
                    want, bound, _, _ = model.bounded(hists[b], cands[b].tolist(), None)
                    assert_within(values[b], want[:, 0], RUNTIME_SLACK * bound[:, 0], f"step {step}, row {b}")
                    checked_rows += 1
                e.output.append(cands[b, rng.randrange(4)].item())
        for req in batch:  # non-VAS rows decode too
            if not requests[req][0].extra_args["vas"]:
                requests[req][2].append(rng.randrange(VOCAB))

    table.clear()
    assert rt.num_free_slots == 12, "slots leaked after clearing the table"
    # Every admission (first or after preemption) was released exactly once.
    assert released == admitted, f"release counts {released} != admission counts {admitted}"
    assert any(n > 1 for n in admitted.values()), "the fuzz never re-admitted a preempted request"
    assert checked_rows > 100
