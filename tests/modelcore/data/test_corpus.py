from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelcore.data import Corpus, build_corpus, chunk_text
from modelcore.data.sources import SourcePaths

from .conftest import SMALL_CAP

ALWAYS = ("python_stdlib", "python_docs", "licenses", "c_headers")


def _docs(ids: list[str]) -> set[str]:
    return {pid.rsplit("#", 1)[0] for pid in ids}


def test_build_is_deterministic(small_corpus: Corpus) -> None:
    again = build_corpus(max_bytes_per_domain=SMALL_CAP)
    assert again.fingerprint() == small_corpus.fingerprint()
    assert again.to_dict() == small_corpus.to_dict()
    other_seed = build_corpus(max_bytes_per_domain=SMALL_CAP, seed=1)
    assert other_seed.fingerprint() != small_corpus.fingerprint()


def test_domains_present_non_empty_disjoint_and_capped(small_corpus: Corpus) -> None:
    assert set(ALWAYS) <= set(small_corpus.domains)
    for name, dom in small_corpus.domains.items():
        sizes = dom.sizes()
        assert dom.train, name
        assert dom.heldout, name
        assert sizes["train_bytes"] + sizes["heldout_bytes"] <= SMALL_CAP
        assert sizes["heldout_bytes"] <= 0.1 * SMALL_CAP
        # Splits are by document: no document has passages on both sides.
        assert not _docs(dom.train_ids) & _docs(dom.heldout_ids), name
        ids = dom.train_ids + dom.heldout_ids
        assert len(set(ids)) == len(ids)
        assert all(pid.startswith(f"{name}:") for pid in ids)
        assert dom.train_ids == sorted(
            dom.train_ids, key=lambda p: (p.rsplit("#", 1)[0], int(p.rsplit("#", 1)[1]))
        )
    # Domains do not share documents either (licenses are near-deduplicated across packages).
    texts, _ = small_corpus.texts("train")
    assert len(set(texts)) > 0.95 * len(texts)


def test_heldout_never_leaks_into_another_builds_train(small_corpus: Corpus) -> None:
    bigger = build_corpus(max_bytes_per_domain=4 * SMALL_CAP, seed=3, domains=ALWAYS)
    for name in ALWAYS:
        small, big = small_corpus.domains[name], bigger.domains[name]
        assert not _docs(small.heldout_ids) & _docs(big.train_ids), name
        assert not _docs(small.train_ids) & _docs(big.heldout_ids), name


def test_domain_selection_and_errors() -> None:
    only = build_corpus(max_bytes_per_domain=20_000, domains=["python_docs"])
    assert list(only.domains) == ["python_docs"]
    with pytest.raises(ValueError, match="unknown domain"):
        build_corpus(domains=["poetry"])
    with pytest.raises(ValueError, match="heldout_fraction"):
        build_corpus(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="max_document_bytes"):
        build_corpus(passage_bytes=8192, max_document_bytes=4096)


def test_cache_round_trip_and_damaged_entry(tmp_path: Path) -> None:
    first = build_corpus(max_bytes_per_domain=30_000, cache_dir=tmp_path)
    [entry] = list(tmp_path.glob("corpus-*.json"))
    assert json.loads(entry.read_text())["format"] == "agora.corpus/1"
    assert (
        build_corpus(max_bytes_per_domain=30_000, cache_dir=tmp_path).fingerprint()
        == first.fingerprint()
    )
    entry.write_text('{"format": "agora.corpus/1", "domains": {"x": {}}}')
    assert (
        build_corpus(max_bytes_per_domain=30_000, cache_dir=tmp_path).fingerprint()
        == first.fingerprint()
    )
    assert json.loads(entry.read_text())["domains"].keys() == first.domains.keys()
    build_corpus(max_bytes_per_domain=31_000, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("corpus-*.json"))) == 2  # keyed by the parameters


def test_dict_round_trip(small_corpus: Corpus) -> None:
    back = Corpus.from_dict(json.loads(json.dumps(small_corpus.to_dict())))
    assert back.fingerprint() == small_corpus.fingerprint()
    with pytest.raises(ValueError, match=r"agora\.corpus/1"):
        Corpus.from_dict({"format": "other"})


def test_chunking_preserves_text_and_respects_size() -> None:
    text = "short line\n" * 50 + "é" * 3000 + "\n" + "tail without newline"
    passages = chunk_text(text, 256)
    assert "".join(passages) == text
    assert all(len(p.encode("utf-8")) <= 256 for p in passages)
    assert all(p.endswith("\n") for p in passages[:2])  # cut at line ends where possible


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_sources_skip_tests_site_packages_generated_and_binary(tmp_path: Path) -> None:
    lib, inc = tmp_path / "lib", tmp_path / "include"
    for i in range(12):
        _write(lib / f"mod{i}.py", f"def f{i}(x):\r\n    return x + {i}\r\n")
    _write(lib / "site-packages" / "pkg.py", "third party\n")
    _write(
        lib / "encodings" / "cp0.py", '""" Python Character Mapping Codec generated from \'X\'"""\n'
    )
    _write(lib / "_sysconfigdata__x.py", "build_time_vars = {}\n")
    _write(lib / "latin.py", b"# caf\xe9\n")
    _write(lib / "test" / "test_mod.py", "import unittest\n")
    _write(inc / "Python.h", "#define X 1\n")
    paths = SourcePaths(stdlib=lib, include=inc, system_include=None)
    corpus = build_corpus(
        domains=["python_stdlib", "python_tests", "c_headers"], paths=paths, heldout_fraction=0.3
    )
    stdlib = corpus.domains["python_stdlib"]
    docs = _docs(stdlib.train_ids + stdlib.heldout_ids)
    assert docs == {f"python_stdlib:mod{i}.py" for i in range(12)}
    assert all("\r" not in t for t in stdlib.train + stdlib.heldout)  # newlines normalised
    tests, headers = corpus.domains["python_tests"], corpus.domains["c_headers"]
    assert tests.train_ids + tests.heldout_ids == ["python_tests:test/test_mod.py#0"]
    assert headers.train_ids + headers.heldout_ids == ["c_headers:python/Python.h#0"]
    assert stdlib.train
    assert stdlib.heldout
    with pytest.raises(ValueError, match="no documents"):
        build_corpus(domains=["python_tests"], paths=SourcePaths(lib / "encodings", inc, None))


def test_a_pinned_distribution_list_keeps_other_packages_out_of_the_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AGORA_CORPUS_DISTRIBUTIONS (set by tests/conftest.py) names the only distributions
    whose licenses and READMEs feed the corpus: installing a tool changes nothing."""
    from modelcore.data.sources import DISTRIBUTIONS_ENV, list_sources

    listing = tmp_path / "dists.txt"
    listing.write_text("# only these\nPyYAML\nnumpy\n")
    monkeypatch.setenv(DISTRIBUTIONS_ENV, str(listing))
    paths = SourcePaths.current(system_include=None)
    assert paths.distributions == frozenset({"pyyaml", "numpy"})
    for domain in ("licenses", "package_readmes"):
        owners = {doc.id.split("/", 1)[0] for doc in list_sources(domain, paths)}
        assert owners, domain
        assert owners <= {"pyyaml", "numpy"}, (domain, owners)
    everything = SourcePaths(paths.stdlib, paths.include, None, None)
    assert len(list_sources("licenses", everything)) > len(list_sources("licenses", paths))

    monkeypatch.setenv(DISTRIBUTIONS_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="cannot read"):
        SourcePaths.current()
