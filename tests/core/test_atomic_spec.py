"""Atomic and progressive writes, specified where mutation testing found them unspecified (issue 18):
the encoding asked for is the one written; a replaced file keeps its permissions."""
from core.atomic import PartialFile


def test_a_partial_file_writes_in_the_encoding_it_is_given(tmp_path):
    cases = (("utf-8", "é\n".encode()), ("latin-1", b"\xe9\n"), ("utf-16-le", "é\n".encode("utf-16-le")))
    for encoding, expected in cases:
        target = tmp_path / f"{encoding}.csv"
        out = PartialFile(target, encoding=encoding)
        out.write("é\n")
        out.commit()
        assert target.read_bytes() == expected


def test_a_replaced_file_keeps_its_permissions_and_a_new_one_gets_the_umasks(tmp_path):
    import os
    import stat

    from core.atomic import current_umask, write_bytes_atomic

    target = tmp_path / "model.okng"
    write_bytes_atomic(target, b"first")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()
    os.chmod(target, 0o640)
    write_bytes_atomic(target, b"second")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_bytes() == b"second"
    out = PartialFile(target)
    out.write("third")
    out.commit()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_text() == "third"
