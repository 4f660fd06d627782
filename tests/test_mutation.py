import random
from types import SimpleNamespace

import pytest

from avo.contract import set_tunables, tunables
from avo.lineage import sha256
from avo.operators.mutation import MutationOperator
from avo.types import ProposalError, StepContext, Version
from tests.conftest import DATA

SRC = (DATA / "tunable.cu").read_text()


def ctx(source, tried=(), seed=0):
    v = Version(0, "00000.00", source, None, [])
    return StepContext(1, 0, v, [v], [], None, None, None, random.Random(seed), set(tried))


def op(max_changes=2):
    return MutationOperator(SimpleNamespace(max_changes=max_changes, max_tries=64, ahead=0))


def test_tunables_are_parsed_and_set_in_place():
    t = tunables(SRC)
    assert t["BLOCK_N"].value == "64" and t["BLOCK_N"].choices == ("32", "64", "128")
    out = set_tunables(SRC, {"BLOCK_N": "128"})
    assert tunables(out)["BLOCK_N"].value == "128"
    assert out.replace("BLOCK_N 128", "BLOCK_N 64") == SRC
    with pytest.raises(KeyError):
        set_tunables(SRC, {"NOPE": "1"})


def test_mutation_changes_between_one_and_max_changes_to_declared_choices():
    base = tunables(SRC)
    for seed in range(30):
        p = op(2).propose(ctx(SRC, seed=seed))
        new = tunables(p.source)
        changed = [n for n in base if new[n].value != base[n].value]
        assert 1 <= len(changed) <= 2
        assert all(new[n].value in base[n].choices for n in changed)
        assert p.message.startswith("mutate ")


def test_mutation_never_repeats_a_tried_source_and_reports_exhaustion():
    src = "#include <avo/attention.cuh>\n#define X 1  // @tunable 1 2\n"
    other = set_tunables(src, {"X": "2"})
    with pytest.raises(ProposalError, match="exhausted"):
        op().propose(ctx(src, tried={sha256(other)}))


def test_source_without_tunables_is_a_proposal_error():
    with pytest.raises(ProposalError, match="no tunables"):
        op().propose(ctx("__global__ void k() {}"))


def test_redirect_widens_the_mutation():
    o = op(1)
    r = o.redirect(ctx(SRC), "no commit in 8 steps")
    assert "up to 2" in r.directive and r.llm_calls == 0 and r.prompt_tokens == 0
    seen = {len([n for n in tunables(SRC) if tunables(o.propose(ctx(SRC, seed=s)).source)[n].value
                 != tunables(SRC)[n].value]) for s in range(40)}
    assert seen == {1, 2}
