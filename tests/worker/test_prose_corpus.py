"""The prose corpus builder: one client per distribution's long description, largest first."""

import pytest

from fedmla.worker.apps.prose_corpus import build, readme_bodies


def _dist(root, name, body, headers="Metadata-Version: 2.1\nName: x\n"):
    d = root / f"{name}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_bytes(headers.encode() + b"\n" + body)


def test_build_picks_the_largest_descriptions(tmp_path):
    site = tmp_path / "site"
    _dist(site, "alpha_pkg-1.0", b"A" * 300)
    _dist(site, "beta-2.0", b"B" * 100)
    _dist(site, "gamma-0.1", b"G" * 200)
    _dist(site, "fedmla-0.1.0", b"F" * 999)                 # our own README is not a client
    _dist(site, "binary-1.0", b"\xff\xfe" * 400)            # not UTF-8: skipped
    assert sorted(readme_bodies([site])) == ["alpha-pkg", "beta", "gamma"]
    names = build(tmp_path / "out", clients=2, min_bytes=150, roots=[site])
    assert names == ["alpha-pkg", "gamma"]
    assert (tmp_path / "out" / "alpha-pkg" / "README.txt").read_bytes() == b"A" * 300 + b"\n"
    assert not (tmp_path / "out" / "beta").exists()
    with pytest.raises(ValueError, match="only 2 installed distributions"):
        build(tmp_path / "out2", clients=3, min_bytes=150, roots=[site])
