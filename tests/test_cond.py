"""`Cond`, the condition batch every family hands the sampler (memaudit/models/cond.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from memaudit.models.cond import Cond, as_cond


def sdxl_like(b: int, fill: float = 0.0) -> Cond:
    return Cond(emb=torch.full((b, 3, 4), fill), pooled=torch.full((b, 5), fill),
                time_ids=torch.arange(6.0).repeat(b, 1))


def test_cat_chunk_roundtrip_and_row_selection():
    a, b = sdxl_like(2, 1.0), sdxl_like(3, 2.0)
    both = Cond.cat([a, b])
    assert len(both) == 5 and both.keys() == ["emb", "pooled", "time_ids"]
    assert torch.equal(both.emb[:2], a.emb) and torch.equal(both.pooled[2:], b.pooled)
    x, y = Cond.cat([a, a]).chunk(2)
    assert torch.equal(x.emb, a.emb) and torch.equal(y.pooled, a.pooled)
    rows = both[torch.tensor([4, 0])]
    assert len(rows) == 2 and rows.emb[0, 0, 0] == 2.0 and rows.emb[1, 0, 0] == 1.0
    assert len(both[1:3]) == 2 and len(both[torch.tensor([True, False, True, False, False])]) == 2


def test_where_put_expand_and_replace_keep_other_rows():
    u, c = sdxl_like(3, 0.0), sdxl_like(3, 1.0)
    mixed = c.where(torch.tensor([True, False, True]), u)
    assert mixed.pooled[:, 0].tolist() == [1.0, 0.0, 1.0]
    put = u.put(torch.tensor([1]), sdxl_like(1, 7.0))
    assert put.emb[:, 0, 0].tolist() == [0.0, 7.0, 0.0]
    assert u.emb[1, 0, 0] == 0.0  # put copies
    one = sdxl_like(1, 5.0).expand(4)
    one.emb[0] += 1  # expand gives a copy: rows are independent
    assert one.emb[1, 0, 0] == 5.0
    r = u.replace(emb=torch.ones(3, 3, 4))
    assert torch.equal(r.emb, torch.ones(3, 3, 4)) and r.pooled is u.pooled


def test_to_casts_only_floating_tensors():
    c = Cond(emb=torch.zeros(2, 3), class_labels=torch.tensor([1, 2]))
    h = c.to(dtype=torch.float16)
    assert h.emb.dtype == torch.float16 and h.class_labels.dtype == torch.long


def test_empty_condition_of_an_unconditional_model_has_a_batch():
    e = Cond(batch=3)
    assert len(e) == 3 and len(Cond.cat([e, e])) == 6 and len(e[torch.tensor([0, 2])]) == 2
    assert [len(p) for p in Cond.cat([e, e]).chunk(2)] == [3, 3]


def test_mismatched_conditions_are_refused():
    with pytest.raises(ValueError, match="batch size"):
        Cond(emb=torch.zeros(2, 3), pooled=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="do not match"):
        Cond.cat([Cond(emb=torch.zeros(1, 3)), Cond(emb=torch.zeros(1, 4))])
    with pytest.raises(ValueError, match="do not match"):
        sdxl_like(2).where(torch.tensor([True, False]), Cond(emb=torch.zeros(2, 3, 4)))


def test_bare_tensor_is_a_text_only_condition_and_copy_works():
    t = torch.randn(2, 3, 4)
    assert torch.equal(as_cond(t).emb, t)
    c = sdxl_like(2)
    assert as_cond(c) is c
    d = copy.deepcopy(c)
    assert torch.equal(d.pooled, c.pooled) and d.pooled is not c.pooled
    with pytest.raises(AttributeError):
        _ = c.missing
