"""agent/mactable.py: the one merge rule (DESIGN.md), the order-independent digest, MAC text."""

from __future__ import annotations

from functools import reduce

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import wire
from agent.mactable import Entry, MacTable, entry_hash, format_mac, parse_mac

KEY = (100, 0x02_00_00_00_00_01)
HOSTS = ["h1", "h2", "h3", "h10", "h9"]  # "h10" < "h2" < "h9" as strings


@st.composite
def entries_for_one_key(draw, min_size=1):
    """Distinct entries for one key, one per (seq, host) rank (the controller is the single writer)."""
    ranks = draw(
        st.lists(st.tuples(st.integers(0, 6), st.sampled_from(HOSTS)), min_size=min_size, max_size=8, unique=True)
    )
    return [Entry(host, draw(st.sampled_from(["vEth1", "vEth2"])), seq, draw(st.booleans())) for seq, host in ranks]


@st.composite
def delivery(draw, entries):
    """Every entry at least once, in any order, some of them repeated."""
    order = list(draw(st.permutations(entries)))
    for dup in draw(st.lists(st.sampled_from(entries), max_size=6)):
        order.insert(draw(st.integers(0, len(order))), dup)
    return order


def apply_all(table: MacTable, key, entries) -> None:
    for e in entries:
        table.merge(key, e)


def xor_digest(table: MacTable) -> int:
    return reduce(lambda acc, kv: acc ^ entry_hash(kv[0][0], kv[0][1], kv[1]), table.items(), 0)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(data=st.data(), entries=entries_for_one_key())
def test_any_order_with_duplicates_yields_the_max_and_the_same_digest(data, entries):
    expected = max(entries, key=Entry.rank)
    digests = set()
    for _ in range(3):
        t = MacTable()
        apply_all(t, KEY, data.draw(delivery(entries)))
        assert t.get(KEY) == expected
        assert len(t) == 1
        assert t.digest == entry_hash(*KEY, expected)
        digests.add(t.digest)
    assert len(digests) == 1


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    data=st.data(),
    per_key=st.dictionaries(
        st.tuples(st.integers(1, 4094), st.integers(0, (1 << 48) - 1)), entries_for_one_key(), min_size=1, max_size=5
    ),
)
def test_digest_is_the_xor_of_final_entries_regardless_of_history(data, per_key):
    stream = [(k, e) for k, es in per_key.items() for e in es]
    a, b = MacTable(), MacTable()
    for k, e in data.draw(st.permutations(stream)):
        a.merge(k, e)
        assert a.digest == xor_digest(a)  # kept current after every step, not only at the end
    for k, e in data.draw(st.permutations(stream)) + data.draw(st.lists(st.sampled_from(stream), max_size=5)):
        b.merge(k, e)
    expected = {k: max(es, key=Entry.rank) for k, es in per_key.items()}
    assert dict(a.items()) == dict(b.items()) == expected
    assert a.digest == b.digest == xor_digest(a)
    # A fresh table holding only the final entries has that same digest: history leaves no trace.
    fresh = MacTable()
    for k, e in expected.items():
        fresh.merge(k, e)
    assert fresh.digest == a.digest


@settings(max_examples=80, deadline=None, derandomize=True)
@given(entries=entries_for_one_key(min_size=2))
def test_lower_rank_never_replaces_higher(entries):
    hi = max(entries, key=Entry.rank)
    t = MacTable()
    assert t.merge(KEY, hi).applied
    digest = t.digest
    for e in entries:
        if e is hi:
            continue
        assert not t.wins(KEY, e)
        res = t.merge(KEY, e)
        assert not res.applied and res.old == hi
        assert t.get(KEY) == hi and t.digest == digest


def test_merge_result_reports_the_replaced_entry():
    t = MacTable()
    a, b = Entry("h1", "vEth1", 0), Entry("h2", "vEth1", 1)
    r1 = t.merge(KEY, a)
    assert r1.applied and r1.old is None
    r2 = t.merge(KEY, b)
    assert r2.applied and r2.old == a


def test_equal_rank_keeps_the_incumbent():
    t = MacTable()
    t.merge(KEY, Entry("h1", "vEth1", 3))
    digest = t.digest
    assert not t.merge(KEY, Entry("h1", "vEth1", 3)).applied  # an exact duplicate
    assert not t.merge(KEY, Entry("h1", "other", 3, True)).applied  # same (seq, host), other value
    assert t.get(KEY) == Entry("h1", "vEth1", 3) and t.digest == digest


def test_seq_dominates_host_and_hosts_compare_as_strings():
    t = MacTable()
    t.merge(KEY, Entry("h9", "p", 1))
    assert t.merge(KEY, Entry("h1", "p", 2)).applied  # higher seq wins whatever the host
    assert not t.merge(KEY, Entry("h9", "p", 1)).applied
    # Same seq: the host order is string order, so "h2" > "h10".
    t2 = MacTable()
    t2.merge(KEY, Entry("h10", "p", 5))
    assert t2.merge(KEY, Entry("h2", "p", 5)).applied
    assert not t2.merge(KEY, Entry("h10", "p", 5)).applied
    assert t2.get(KEY).host == "h2"


def test_tombstone_is_an_entry_like_any_other():
    t = MacTable()
    t.merge(KEY, Entry("h1", "vEth1", 0))
    t.merge((100, 2), Entry("h1", "vEth2", 0))
    assert t.live_count() == 2
    assert t.merge(KEY, Entry("h1", "vEth1", 1, True)).applied
    assert t.live_count() == 1 and len(t) == 2
    assert t.as_placement()[KEY] == ("h1", 1, True)
    # A late update below the tombstone cannot resurrect the VM.
    assert not t.merge(KEY, Entry("h2", "vEth1", 0)).applied
    assert t.get(KEY).tombstone


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data(), entries=entries_for_one_key(min_size=2))
def test_reverse_merge_defect_keeps_the_min_instead(data, entries):
    lo, hi = min(entries, key=Entry.rank), max(entries, key=Entry.rank)
    bad, good = MacTable(reverse_merge_rule=True), MacTable()
    order = data.draw(delivery(entries))
    apply_all(bad, KEY, order)
    apply_all(good, KEY, order)
    assert bad.get(KEY) == lo
    assert good.get(KEY) == hi
    assert bad.get(KEY) != good.get(KEY)  # the defect is observable
    assert bad.digest == entry_hash(*KEY, lo)
    # And under the defect a higher rank never replaces a lower one.
    assert not bad.wins(KEY, hi)
    assert not bad.merge(KEY, hi).applied


def test_snapshot_travels_as_wire_entries():
    t = MacTable()
    t.merge(KEY, Entry("h1", "vEth1", 2, False))
    t.merge((4094, (1 << 48) - 1), Entry("h3", "vEth9", 0, True))
    snap = t.snapshot()
    body = ["h1", snap, []]
    assert wire.decode(wire.encode(wire.MsgType.SNAPSHOT, body))[1] == body
    rebuilt = MacTable()
    for vlan, mac, host, port, seq, tomb in snap:
        rebuilt.merge((vlan, mac), Entry(host, port, seq, tomb))
    assert dict(rebuilt.items()) == dict(t.items()) and rebuilt.digest == t.digest


def test_entry_hash_is_stable_and_covers_every_field():
    e = Entry("h1", "vEth1", 3, False)
    assert entry_hash(100, 5, e) == entry_hash(100, 5, Entry("h1", "vEth1", 3, False))
    assert 0 <= entry_hash(100, 5, e) < 1 << 64
    variants = [
        entry_hash(101, 5, e),
        entry_hash(100, 6, e),
        entry_hash(100, 5, e._replace(host="h2")),
        entry_hash(100, 5, e._replace(port="vEth2")),
        entry_hash(100, 5, e._replace(seq=4)),
        entry_hash(100, 5, e._replace(tombstone=True)),
    ]
    assert entry_hash(100, 5, e) not in variants
    assert len(set(variants)) == len(variants)


def test_empty_table():
    t = MacTable()
    assert t.digest == 0 and len(t) == 0 and t.get(KEY) is None and KEY not in t
    assert t.snapshot() == [] and t.as_placement() == {}


# ---------------------------------------------------------------- MAC text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, (1 << 48) - 1))
def test_format_parse_round_trip(mac):
    text = format_mac(mac)
    assert len(text) == 17 and text == text.lower()
    assert parse_mac(text) == mac
    assert parse_mac(text.upper()) == mac


@pytest.mark.parametrize(
    "mac,text",
    [(0, "00:00:00:00:00:00"), (0x02_00_00_00_00_01, "02:00:00:00:00:01"), ((1 << 48) - 1, "ff:ff:ff:ff:ff:ff"),
     (0x0A_1B_2C_3D_4E_5F, "0a:1b:2c:3d:4e:5f")],
)
def test_format_mac_examples(mac, text):
    assert format_mac(mac) == text
    assert parse_mac(text) == mac


@pytest.mark.parametrize(
    "text",
    ["", "00:00:00:00:00", "00:00:00:00:00:00:00", "0:00:00:00:00:00", "000:00:00:00:00:0",
     "zz:00:00:00:00:00", "00-00-00-00-00-00", "000000000000", "00:00:00:00:00:0g"],
)
def test_parse_mac_rejects_non_macs(text):
    with pytest.raises(ValueError):
        parse_mac(text)


@pytest.mark.parametrize("text", ["0x:00:00:00:00:01", "+1:00:00:00:00:00", " 1:00:00:00:00:00",
                                  "0_:00:00:00:00:01", "\uff11\uff11:00:00:00:00:00"])
def test_parse_mac_rejects_int_syntax(text):
    # Regression: the joined text once went to int(..., 16), which accepts all of these.
    with pytest.raises(ValueError):
        parse_mac(text)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(100, 101), st.integers(1, 4), st.sampled_from(HOSTS),
                          st.sampled_from(["vEth1", "vEth2"]), st.integers(0, 4), st.booleans()), max_size=30),
       st.booleans(), st.integers(0, 3))
def test_bulk_merge_of_gossip_rows_is_the_one_by_one_merge(rows, reverse, held):
    # merge_updates (the hot path) keeps exactly the one merge rule: same table, same digest,
    # same tombstone count and the same applied (key, old, new), in order. Both tables may
    # already hold some of the keys (none: the all-new path of a message of distinct keys).
    updates = [[i + 1, *r] for i, r in enumerate(rows)]
    bulk, single = MacTable(reverse_merge_rule=reverse), MacTable(reverse_merge_rule=reverse)
    for t in (bulk, single):
        for mac in range(1, held + 1):
            t.merge((100, mac), Entry("h2", "vEth1", 2, False))
    applied = list(bulk.merge_updates(updates))
    expected = []
    for _n, vlan, mac, host, port, seq, tomb in updates:
        e = Entry(host, port, seq, tomb)
        res = single.merge((vlan, mac), e)
        if res.applied:
            expected.append(((vlan, mac), res.old, e))
    assert applied == expected
    assert dict(bulk.items()) == dict(single.items()) and bulk.digest == single.digest == xor_digest(single)
    assert bulk.live_count() == single.live_count() == sum(1 for _, e in single.items() if not e.tombstone)
