"""normlab._io.write_atomic: bytes, text and a writing function; a failure leaves the old file and no temporary."""

import os

import pytest
import torch

from normlab._io import write_atomic


def test_bytes_text_and_a_writer_function(tmp_path):
    write_atomic(tmp_path / "sub" / "a.bin", b"\x00\x01")
    write_atomic(tmp_path / "t.txt", "ä\n")
    write_atomic(tmp_path / "m.pt", lambda fh: torch.save({"w": torch.ones(2)}, fh))
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "ä\n"
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.ones(2))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failing_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    write_atomic(path, "old")

    def fail(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
