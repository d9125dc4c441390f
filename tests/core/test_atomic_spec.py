"""Progressive atomic writes, specified where mutation testing found them unspecified (issue 18):
the encoding asked for is the one written."""
from core.atomic import PartialFile


def test_a_partial_file_writes_in_the_encoding_it_is_given(tmp_path):
    cases = (("utf-8", "é\n".encode()), ("latin-1", b"\xe9\n"), ("utf-16-le", "é\n".encode("utf-16-le")))
    for encoding, expected in cases:
        target = tmp_path / f"{encoding}.csv"
        out = PartialFile(target, encoding=encoding)
        out.write("é\n")
        out.commit()
        assert target.read_bytes() == expected
