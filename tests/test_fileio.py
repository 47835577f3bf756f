"""minivlm.fileio on tiny files: a publish is all or nothing, readable as the umask allows, and the checksum is
hashlib's."""
import hashlib
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from minivlm.fileio import atomic_write, atomic_write_json, sha256_file


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = atomic_write_json(tmp_path / "a.json", {"v": 1})

    def half_then_fail(tmp):
        tmp.write_text('{"v": 2')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == '{\n  "v": 1\n}\n' and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_sha256_file_is_hashlibs_digest_across_read_blocks(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", block=1000) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_a_file_written_0600_is_published_as_the_umask_allows(tmp_path, mask, mode):
    """safetensors (as mkstemp) creates its file 0600; the published file gets what a plain open() would get."""
    old = os.umask(mask)
    try:
        path = atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": np.zeros(2)}, str(tmp)))
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == mode
