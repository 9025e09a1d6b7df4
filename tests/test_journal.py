"""controller/journal.py: per-record integrity, recovery of the sound prefix, the damaged tail
moved aside, the previous format, and `dvs controller check-journal` (no processes)."""

from __future__ import annotations

import json
import random

from controller import journal
from tests.conftest import run_dvs


def vm_record(n: int, host: str = "h1", seq: int = 0, state: str = "active") -> dict:
    return {"vm": f"vm{n}", "number": n, "profile": "default", "vlan": 100, "host": host, "seq": seq,
            "seq_issued": seq, "state": state}


def write(path, records) -> bytes:
    data = b"".join(journal.encode(r) for r in records)
    path.write_bytes(data)
    return data


def records(n: int) -> list[dict]:
    return [{"admit": "h1"}, {"host_incarnation": "h1", "incarnation": 7}] + [vm_record(i) for i in range(1, n + 1)]


def test_sound_journal_reads_back_every_record(tmp_path):
    path = tmp_path / "controller.journal"
    rs = records(20)
    data = write(path, rs)
    rec = journal.read(path)
    assert rec.records == rs and not rec.damaged and rec.size_bytes == len(data) and not rec.legacy
    assert journal.repair(rec) is None and path.read_bytes() == data


def test_one_flipped_byte_mid_file_keeps_every_record_before_it(tmp_path):
    path = tmp_path / "controller.journal"
    rs = records(20)
    data = bytearray(write(path, rs))
    offset = sum(len(journal.encode(r)) for r in rs[:10])  # the 11th record starts here
    data[offset + 20] ^= 0x01  # inside its JSON: the checksum catches it
    path.write_bytes(bytes(data))
    rec = journal.read(path)
    assert rec.damaged and rec.sound_bytes == offset and rec.records == rs[:10]
    assert "checksum" in rec.why
    moved = journal.repair(rec)
    assert moved == tmp_path / f"controller.journal.damaged-{offset}"
    assert moved.read_bytes() == bytes(data[offset:])  # nothing is thrown away
    assert path.read_bytes() == bytes(data[:offset])
    assert not journal.read(path).damaged  # what is left is sound, and appends go after it


def test_random_bytes_appended_are_moved_aside(tmp_path):
    path = tmp_path / "controller.journal"
    rs = records(5)
    data = write(path, rs)
    junk = random.Random(1).randbytes(256)
    path.write_bytes(data + junk)
    rec = journal.read(path)
    assert rec.records == rs and rec.sound_bytes == len(data) and rec.size_bytes == len(data) + 256
    moved = journal.repair(rec)
    assert moved.read_bytes() == junk and path.read_bytes() == data


def test_valid_json_that_is_no_record_counts_as_damage(tmp_path):
    path = tmp_path / "controller.journal"
    good = write(path, records(2))
    for bad in ([1, 2], {"vm": "vm9"}, {**vm_record(3), "vlan": 99_999}, {**vm_record(3), "state": "weird"},
                {**vm_record(3), "seq": 5, "seq_issued": 4}, {"admit": ""}, "text"):
        path.write_bytes(good + journal.encode(bad) + journal.encode(vm_record(4)))
        rec = journal.read(path)
        assert rec.damaged and rec.sound_bytes == len(good) and len(rec.records) == 4, bad


def test_length_that_lies_and_torn_last_write(tmp_path):
    path = tmp_path / "controller.journal"
    good = write(path, records(2))
    line = journal.encode(vm_record(3))
    length, rest = line.split(b" ", 1)
    for tail in (b"%d %s" % (int(length) + 1, rest), b"99999999 " + rest, line[:-1], line[: len(line) // 2]):
        path.write_bytes(good + tail)
        rec = journal.read(path)
        assert rec.damaged and rec.records == records(2), tail


def test_previous_plain_json_format_is_read_and_rewritten(tmp_path):
    path = tmp_path / "controller.journal"
    rs = [{"host_incarnation": "h2", "incarnation": 3}, vm_record(1, "h2"), vm_record(1, "h3", 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rs) + '{"torn": ')
    rec = journal.read(path)
    assert rec.legacy and rec.records == rs and rec.damaged
    moved = journal.repair(rec)
    assert moved.read_bytes() == b'{"torn": '
    again = journal.read(path)
    assert not again.legacy and not again.damaged and again.records == rs


def test_check_journal_command_reports_without_touching_it(tmp_path):
    path = tmp_path / "controller.journal"
    data = write(path, records(3))
    ok = run_dvs("controller", "check-journal", state_dir=tmp_path)
    assert ok.returncode == 0 and "sound, 5 records" in ok.stdout, ok
    path.write_bytes(data + b"\x00garbage")
    bad = run_dvs("controller", "check-journal", state_dir=tmp_path)
    assert bad.returncode == 1, bad
    assert f"damaged at byte {len(data)}" in bad.stdout and "5 records before it are sound" in bad.stdout
    assert f"controller.journal.damaged-{len(data)}" in bad.stdout
    assert path.read_bytes() == data + b"\x00garbage"  # only looked at
    missing = run_dvs("controller", "check-journal", state_dir=tmp_path / "nowhere")
    assert missing.returncode == 4 and missing.stderr.startswith("dvs: error: no journal at")
    assert "Traceback" not in missing.stderr


def test_headless_move_reads_the_sound_records_and_names_the_damage(tmp_path):
    import pytest

    from testbed import headless
    from testbed.client import ClusterError
    from testbed.cluster import Cluster
    from testbed.procs import Proc

    cluster = Cluster(tmp_path, agents={"h1": Proc("h1", 1, 0.0, "", {"rpc": "tcp://127.0.0.1:9"})})
    path = tmp_path / "controller.journal"
    data = write(path, [vm_record(1), vm_record(1, "h2", 1)])
    path.write_bytes(data + b"12 deadbeef {broken}\n" + journal.encode(vm_record(2)))
    assert headless.known_vms(cluster)["vm1"]["host"] == "h2"
    with pytest.raises(ClusterError, match=r"unknown VM 'vm2' .* damaged at byte \d+"):
        headless.move(cluster, "vm2", "h1")
    path.unlink()
    path.mkdir()  # unreadable as a file: one line, no traceback
    with pytest.raises(ClusterError, match="cannot read the controller's journal"):
        headless.move(cluster, "vm1", "h1")
