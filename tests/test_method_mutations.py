"""bench/method_mutations.py stays in step with the source. Not marked `method`: the mutation check runs
`pytest -m method` on mutated copies, where this test would fail on every mutation and hide what the method's own
tests catch."""

from __future__ import annotations

from pathlib import Path


def test_every_mutation_of_the_mutation_check_still_changes_one_line_of_the_source(monkeypatch):
    """bench/method_mutations.py proves these tests catch one-line changes to the method (BENCHMARKS.md, "The
    method's tests"); a refactor of a line it changes must update it, or the check would stop checking that line."""
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.syspath_prepend(str(repo))  # bench scripts import as `bench.*`, as tests/test_load.py does
    from bench.method_mutations import MUTATIONS

    assert len(MUTATIONS) >= 20
    for mutation in MUTATIONS:
        source = (repo / mutation.path).read_text()
        assert mutation.apply(source) != source, mutation.what
