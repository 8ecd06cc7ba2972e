"""launcher/host.py: OpenMP's spinning is bounded unless the user chose, and malloc is tuned only
where nothing asked otherwise."""
from strata.launcher import host


def test_omp_spinning_is_bounded_unless_the_environment_says_otherwise():
    env = {}
    host.short_omp_spinning(env)
    assert env == {"GOMP_SPINCOUNT": host.OMP_SPINCOUNT}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(chosen)
        host.short_omp_spinning(env)
        assert env == chosen


def test_malloc_left_alone_when_glibc_tunables_set_it():
    assert host.keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) is False
    assert host.keep_freed_memory({}) in (True, False)  # applied where glibc is, never an error
